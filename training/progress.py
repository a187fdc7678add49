"""Progress as a callback (as Feast does): library code reports, the caller decides how to show it.
The CLI draws a bar on a terminal; a deployed process passes nothing and stays quiet in its logs,
or records it where operators look (`services.control.scheduler`: the schedule state, its log)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol


class Progress(Protocol):
    def __call__(self, task: str, done: int, total: int, note: str = "") -> None:
        """`done` of `total` units of `task` are finished; `note` says how it goes (a loss)."""


def silent(task: str, done: int, total: int, note: str = "") -> None:
    """The default: report nothing."""


@dataclass
class Tracked:
    """The latest report of one task, with its estimated time left from its own pace so far."""

    task: str
    done: int = 0
    total: int = 0
    note: str = ""
    started: float = field(default_factory=lambda: time.time())
    first_done: int | None = None  # units already done at the first report: the pace counts from there

    def eta_s(self, now: float | None = None) -> float | None:
        """None until a unit finished after the first report (a pace of nothing is no estimate)."""
        if self.first_done is None or self.done <= self.first_done or self.total <= 0 or self.done > self.total:
            return None
        elapsed = (now or time.time()) - self.started
        return round(elapsed / (self.done - self.first_done) * (self.total - self.done), 1)

    def describe(self) -> str:
        eta = self.eta_s()
        return (
            f"{self.task} {self.done}/{self.total}"
            + (f", {self.note}" if self.note else "")
            + (f", about {eta:.0f} s left" if eta is not None else "")
        )


class Tracker:
    """A Progress that keeps the current task (a new task name starts a new clock)."""

    def __init__(self) -> None:
        self.current: Tracked | None = None

    def __call__(self, task: str, done: int, total: int, note: str = "") -> None:
        if self.current is None or self.current.task != task:
            self.current = Tracked(task, first_done=done)
        self.current.done, self.current.total, self.current.note = done, total, note
