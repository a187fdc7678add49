"""The model registry: train now, list versions, promote, roll back."""

from __future__ import annotations

import getpass
from collections.abc import Callable

import typer
from rich.table import Table

from schemas import FIRST_STAGE, DependencyUnavailable, InvalidInput, ModelEvent
from services.cli.base import app, console, settings, setup_process
from services.config import Settings


@app.command()
def train(once: bool = typer.Option(False, "--once", help="train one challenger now")) -> None:
    """Train a challenger from the label store now, gate it and promote it if it is better."""
    from services.schedule.scheduler import retrain

    if not once:
        raise InvalidInput("`rankloop train --once` trains one challenger; `rankloop schedule` retrains continuously")
    s = settings()
    setup_process(s)
    outcome = retrain(s)
    console.print(f"[bold]{outcome.status}[/]: {outcome.message}" + (f" (version {outcome.version})" if outcome.version else ""))


@app.command()
def promote(version: str, reason: str = "manual promotion") -> None:
    """Make VERSION the champion (the old one becomes `previous`) and tell the serving workers."""
    _registry_change(lambda registry: registry.promote(version, reason, actor=f"cli:{getpass.getuser()}"))


@app.command()
def approve(version: str, reason: str = "approved on review") -> None:
    """Promote VERSION, the challenger that passed the gate and awaits approval (`retrain.auto_promote` off)."""
    from training.registry import approve as approve_challenger

    _registry_change(lambda registry: approve_challenger(registry, version, reason, actor=f"cli:{getpass.getuser()}"))


@app.command()
def rollback(reason: str = "manual rollback") -> None:
    """Put the `previous` version back as champion."""
    _registry_change(lambda registry: registry.rollback(reason, actor=f"cli:{getpass.getuser()}"))


def _registry(s: Settings):
    from services.registry import connect_registry

    return connect_registry(s)


def _registry_change(change: Callable[..., ModelEvent]) -> None:
    from services.storage import open_publisher

    s = settings()
    event = change(_registry(s))
    try:
        publisher = open_publisher(s.kafka.address)
        publisher.publish(s.keys.model_events, s.keys.model_name, event)
        publisher.flush(timeout=10)
    except DependencyUnavailable as e:
        console.print(
            f"[yellow]registry updated, but the model event was not published ({e}); "
            "serving workers will still pick it up by polling[/]"
        )
    console.print(f"{event.action}: version {event.version} (was {event.previous_version})")


@app.command()
def models() -> None:
    """List registered versions, their aliases and stage, and what users did with each one's rankings."""
    from services.online import OnlineMetrics
    from services.storage import open_activity
    from training.interleave import STAGE_TAG

    s = settings()
    activity = open_activity(s.redis_url, s.keys)

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    t = Table("version", "aliases", "stage", "requests", "CTR@10", "MRR clicks", "abandoned", "run")
    for v in [None, *_registry(s).versions()]:
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
