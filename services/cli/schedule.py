"""The control process, `rankloop schedule` (retraining, the champion watch, the admin API), and how
an operator steers the schedule: status, pause, resume."""

from __future__ import annotations

import getpass
import time

import typer
from rich.table import Table

from services.cli.base import app, console, settings, setup_process

schedule_app = typer.Typer(
    help="Retrain continuously (no subcommand), or look at and steer the schedule.", invoke_without_command=True
)
app.add_typer(schedule_app, name="schedule")


@schedule_app.callback()
def schedule(
    ctx: typer.Context,
    host: str = typer.Option(None, help="default: control.host"),
    port: int = typer.Option(None, help="default: control.port"),
) -> None:
    """Run the control process: retrain on N new labels or on the interval (inside `retrain.windows`,
    one run at a time), roll back a champion no worker can load, and serve the admin API, /status and
    /metrics on control.host:control.port."""
    if ctx.invoked_subcommand:
        return
    import uvicorn

    from services.control.app import create_app
    from services.storage.health import require

    s = settings()
    setup_process(s)
    require(s, "kafka", "redis", "mlflow")
    s.control = s.control.model_copy(update={"host": host or s.control.host, "port": port or s.control.port})
    uvicorn.run(create_app(s), host=s.control.host, port=s.control.port, log_level="warning")


def _client(writer: bool = False):
    """MLflow's client; a `writer` makes the experiment if missing (a pause before the first training)."""
    from services.storage import open_registry
    from services.storage.health import require

    s = settings()
    require(s, "mlflow")
    return s, open_registry(s, reader=not writer).client


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else "-"


@schedule_app.command("status")
def status(as_json: bool = typer.Option(False, "--json", help="the status as JSON")) -> None:
    """Paused or not, windows, the last training and its outcome, labels pending, what the next check will do."""
    from services.control.schedule import schedule_status
    from services.storage import open_labels, open_registry, open_schedule_state
    from services.storage.health import require

    s = settings()
    require(s, "mlflow")  # Redis may be down: the status says so and reads MLflow instead
    registry = open_registry(s, reader=True)
    st = schedule_status(s, open_schedule_state(s.redis_url, s.keys), open_labels(s.label_store_url), registry)
    if as_json:
        console.print_json(st.model_dump_json())
        return
    t = Table(show_header=False, box=None)
    p = st.paused
    t.add_row("state", f"[yellow]paused[/] by {p.by} at {_when(p.at)}: {p.reason}" if p else "running")
    windows = ", ".join(st.windows) + (" (now inside)" if st.in_window else " (now outside)")
    t.add_row("windows (UTC)", windows if st.windows else "any time")
    t.add_row("training now", "unknown" if st.training_now is None else "yes" if st.training_now else "no")
    if st.progress:
        t.add_row("progress", st.progress.describe())
    t.add_row("labels", f"{st.labels:,} ({st.labels_pending:,} since the last training)")
    t.add_row("next check", st.next)
    t.add_row(
        "last training",
        f"{st.last_outcome} at {_when(st.last_run_at)}"
        + (f" in {st.last_duration_s:.0f}s" if st.last_duration_s else "")
        + (f", version {st.last_version}" if st.last_version else "")
        if st.last_outcome
        else "none yet",
    )
    if st.last_message:
        t.add_row("", st.last_message)
    if st.failures_in_a_row:
        t.add_row("failures in a row", f"{st.failures_in_a_row} (backing off until {_when(st.backoff_until)})")
    console.print(t)
    for problem in st.problems:
        console.print(f"[yellow]{problem}[/]")


@schedule_app.command("pause")
def pause(reason: str = typer.Option("paused by an operator", help="shown in status and MLflow")) -> None:
    """No training starts until `rankloop schedule resume` (one already running finishes)."""
    from services.control import schedule

    s, client = _client(writer=True)
    p = schedule.pause(client, s.keys.experiment, by=f"cli:{getpass.getuser()}", reason=reason)
    console.print(f"schedule paused by {p.by}: {p.reason}")


@schedule_app.command("resume")
def resume() -> None:
    """Lift a pause: the next check trains if labels or the interval say so."""
    from services.control import schedule

    s, client = _client()
    was = schedule.resume(client, s.keys.experiment)
    console.print(f"schedule resumed (was paused by {was.by}: {was.reason})" if was else "schedule was not paused")
