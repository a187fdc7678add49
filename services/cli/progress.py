"""A progress callback drawn as a bar on a terminal and silent anywhere else (logs, CI)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import Progress, TaskID


class ProgressBar:
    """`with ProgressBar() as progress: build_index(..., progress=progress)`"""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.bar = Progress(console=self.console, transient=True, disable=not self.console.is_terminal)
        self.tasks: dict[str, TaskID] = {}

    def __call__(self, task: str, done: int, total: int, note: str = "") -> None:
        if task not in self.tasks:
            self.tasks[task] = self.bar.add_task(task, total=total)
        self.bar.update(self.tasks[task], completed=done, total=total, description=f"{task} ({note})" if note else task)

    def __enter__(self) -> ProgressBar:
        self.bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.bar.stop()
