"""The model registry: train now, list versions, promote, approve, roll back. Every move goes through
`services.control.promotion`, as the control process's admin API does."""

from __future__ import annotations

import getpass
from collections.abc import Callable

import typer
from rich.table import Table

from schemas import FIRST_STAGE, InvalidInput
from services.cli.base import app, console, settings, setup_process


@app.command()
def train(once: bool = typer.Option(False, "--once", help="train one challenger now")) -> None:
    """Train a challenger from the label store now, gate it, and promote it (or nominate it) as the
    deployment's policy says."""
    from services.control.scheduler import retrain

    if not once:
        raise InvalidInput("`rankloop train --once` trains one challenger; `rankloop schedule` retrains continuously")
    s = settings()
    setup_process(s)
    console.print(retrain(s).summary)


def _move(change: Callable) -> None:
    from services.control.promotion import Promotions
    from services.storage import open_registry
    from services.storage.health import require

    s = settings()
    require(s, "mlflow")  # the broker may be down: the move stands and workers see it at their next poll
    moved = change(Promotions.connect(s, open_registry(s, reader=True)), f"cli:{getpass.getuser()}")
    event = moved.event
    console.print(f"{event.action}: version {event.version} (was {event.previous_version})")
    if not moved.announced:
        console.print("[yellow]the model event was not published; serving workers pick the change up at their next poll[/]")


@app.command()
def promote(version: str, reason: str = "manual promotion") -> None:
    """Make VERSION the champion (the old one becomes `previous`) and tell the serving workers."""
    _move(lambda promotions, actor: promotions.promote(version, reason, actor))


@app.command()
def approve(version: str, reason: str = "approved on review") -> None:
    """Promote VERSION, the challenger that passed the gate and awaits approval (`retrain.auto_promote` off)."""
    _move(lambda promotions, actor: promotions.approve(version, reason, actor))


@app.command()
def rollback(reason: str = "manual rollback") -> None:
    """Put the `previous` version back as champion."""
    _move(lambda promotions, actor: promotions.rollback(reason, actor))


@app.command()
def models() -> None:
    """List registered versions, their aliases and stage, and what users did with each one's rankings."""
    from services.online import OnlineMetrics
    from services.storage import open_activity, open_registry
    from services.storage.health import require
    from training.interleave import STAGE_TAG

    s = settings()
    require(s, "mlflow")
    activity = open_activity(s.redis_url, s.keys)

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    t = Table("version", "aliases", "stage", "requests", "CTR@10", "MRR clicks", "abandoned", "run")
    for v in [None, *open_registry(s, reader=True).versions()]:
        name = v.version if v else FIRST_STAGE
        try:
            m = OnlineMetrics.of(activity.online(name))
        except Exception as e:  # Redis away: the registry's part still shows
            console.print(f"[yellow]online metrics unavailable: {e}[/]")
            m, activity = OnlineMetrics.of({}), open_activity("memory://", s.keys)
        if v is None and not m.requests:
            continue
        stage = v.tags.get(STAGE_TAG, "") if v else ""
        aliases = ", ".join(v.aliases) if v else ""
        row = (str(m.requests), fmt(m.ctr_at_10), fmt(m.mrr_of_clicks), fmt(m.abandonment))
        t.add_row(name, aliases, stage, *row, v.run_id or "" if v else "")
    console.print(t)
