"""The label store: take poisoned (or deleted users') labels out of training, then retrain; compact it."""

from __future__ import annotations

import getpass
import time
from datetime import datetime

import typer

from schemas import InvalidInput
from services.cli.base import app, console, parse_when, settings, setup_process

labels_app = typer.Typer(help="the label store: purge labels and retrain, compact, describe", no_args_is_help=True)
app.add_typer(labels_app, name="labels")


@labels_app.command("purge")
def purge(
    user: str = typer.Option(None, help="labels of this user"),
    session: str = typer.Option(None, help="labels of this session"),
    key: str = typer.Option(None, help="labels of requests this API key (by name) ranked or sent events for"),
    since: str = typer.Option(None, help="labels from this time on (server time; unix seconds or ISO)"),
    until: str = typer.Option(None, help="labels up to this time"),
    reason: str = typer.Option(..., help="why, recorded with the purge"),
    retrain: bool = typer.Option(True, help="train a challenger on what is left now (gated as always)"),
) -> None:
    """Takes matching labels out of every later training (recorded in the store with who, when and
    why), then retrains so a model that learned from them is replaced through the gate."""
    from services.storage import open_labels
    from training.labels.store import Purge

    if user and session:
        raise InvalidInput("give --user or --session, not both (a label has one identity)")
    identity = f"user:{user}" if user else f"session:{session}" if session else None
    if identity is None and key is None and since is None and until is None:
        raise InvalidInput("a purge needs --user, --session, --key, --since or --until: it never empties the store")
    s = settings()
    setup_process(s)
    store = open_labels(s.label_store_url)
    order = Purge(
        identity=identity,
        api_key=key,
        since=parse_when(since),
        until=parse_when(until),
        reason=reason,
        actor=f"cli:{getpass.getuser()}",
        at=time.time(),
    )
    removed = store.purge(order)
    console.print(f"purged {removed} labels ({len(store.read()[0])} left); recorded with the labels at {store.uri}")
    if retrain and removed:
        from services.control.scheduler import retrain as train_now

        console.print(train_now(s, labels=store).summary)


@labels_app.command("purges")
def purges() -> None:
    """Lists every purge in force: operators' and the stream's click-burst quarantines."""
    from rich.table import Table

    from services.storage import open_labels

    s = settings()
    setup_process(s)

    def when(t: float | None) -> str:
        return datetime.fromtimestamp(t).isoformat(timespec="seconds") if t is not None else ""

    table = Table("at", "by", "identity", "key", "since", "until", "reason")
    for p in open_labels(s.label_store_url).purges():
        table.add_row(when(p.at), p.actor, p.identity or "", p.api_key or "", when(p.since), when(p.until), p.reason)
    console.print(table)


@labels_app.command("compact")
def compact() -> None:
    """Rewrites the labels stored so far with the latest revision of each label in few large files,
    checkpoints the table's log and removes files past the retention (the scheduler also does this
    after each training)."""
    from services.storage import open_labels

    s = settings()
    setup_process(s)
    store = open_labels(s.label_store_url)
    t = time.time()
    done = store.compact()
    console.print(
        f"compacted {store.uri} in {time.time() - t:.1f}s: {done['files_before']} → {done['files_after']} files, "
        f"{done['rows_removed']:,} superseded revisions removed, table version {store.version()}"
    )


@labels_app.command("show")
def show(version: int = typer.Option(None, help="the table as of this version (time travel), e.g. a run's lineage")) -> None:
    """Counts of the labels now (or at a version): what a training run would read."""
    from services.storage import open_labels

    s = settings()
    setup_process(s)
    store = open_labels(s.label_store_url)
    _, lineage = store.read(version=version)
    console.print_json(data={**lineage, "latest_version": store.version()})
