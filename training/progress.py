"""Progress as a callback (as Feast does): library code reports, the caller decides how to show it.
The CLI draws a bar on a terminal; a deployed process passes nothing and stays quiet in its logs."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]
"""progress(task, done, total): `done` of `total` units of `task` are finished."""


def silent(task: str, done: int, total: int) -> None:
    """The default: report nothing."""
