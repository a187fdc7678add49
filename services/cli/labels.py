"""The label store: take poisoned (or deleted users') labels out of training, then retrain; compact it."""

from __future__ import annotations

import getpass
import time
from datetime import datetime

import typer

from schemas import InvalidInput, InvalidState, NotFound
from services.cli.base import app, console, parse_when, settings, setup_process
from training.labels.store import Hold, HoldStatus, LabelStore

labels_app = typer.Typer(help="the label store: purge labels and retrain, compact, describe", no_args_is_help=True)
app.add_typer(labels_app, name="labels")


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t).isoformat(timespec="seconds") if t is not None else ""


@labels_app.command("purge")
def purge(
    user: str = typer.Option(None, help="labels of this user"),
    session: str = typer.Option(None, help="labels of this session"),
    key: str = typer.Option(None, help="labels of requests this API key (by name) ranked or sent events for"),
    since: str = typer.Option(None, help="labels from this time on (server time; unix seconds or ISO)"),
    until: str = typer.Option(None, help="labels up to this time"),
    hold: str = typer.Option(None, help="the labels a hold covers (`rankloop labels holds`), for good"),
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
    if identity is None and key is None and since is None and until is None and hold is None:
        raise InvalidInput("a purge needs --user, --session, --key, --since, --until or --hold: it never empties the store")
    s = settings()
    setup_process(s)
    store = open_labels(s.label_store_url)
    if hold is not None:
        if (identity, key, since, until) != (None, None, None, None):
            raise InvalidInput("--hold purges what the hold covers; give no other filter with it")
        found = decide_hold(store, hold, "purged", reason)
        order = found.as_purge(f"cli:{getpass.getuser()}", reason, time.time())
    else:
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
    """Lists every purge in force: operators', purged holds and the stream's click-burst quarantines."""
    from rich.table import Table

    from services.storage import open_labels

    s = settings()
    setup_process(s)

    table = Table("at", "by", "identity", "key", "query", "doc", "since", "until", "reason")
    for p in open_labels(s.label_store_url).purges():
        table.add_row(
            _when(p.at),
            p.actor,
            p.identity or "",
            p.api_key or "",
            p.query or "",
            p.doc_id or "",
            _when(p.since),
            _when(p.until),
            p.reason,
        )
    console.print(table)


def decide_hold(store: LabelStore, hold_id: str, status: HoldStatus, reason: str) -> Hold:
    """Records an operator's decision on a hold in force (NotFound / InvalidState otherwise)."""
    found = next((h for h in store.holds() if h.hold_id == hold_id), None)
    if found is None:
        raise NotFound(f"no hold {hold_id!r}; `rankloop labels holds` lists them")
    if found.status != "held":
        raise InvalidState(f"hold {hold_id} was {found.status} already ({found.decision})")
    decided = found.model_copy(
        update={"status": status, "decided_by": f"cli:{getpass.getuser()}", "decided_at": time.time(), "decision": reason}
    )
    store.hold(decided)
    return decided


@labels_app.command("holds")
def holds(every: bool = typer.Option(False, "--all", help="released and purged holds too")) -> None:
    """(query, doc) pairs the stream held for review: clicked far above what their positions predict
    by many unsigned identities. Their labels stay out of training until released or purged."""
    from rich.table import Table

    from services.storage import open_labels

    s = settings()
    setup_process(s)
    store = open_labels(s.label_store_url)
    _, lineage = store.read()
    table = Table("hold", "at", "status", "query", "doc", "reason", "decision")
    for h in store.holds():
        if every or h.status == "held":
            decision = f"{h.decided_by}: {h.decision}" if h.decided_by else ""
            table.add_row(h.hold_id, _when(h.at), h.status, h.query, h.doc_id, h.reason, decision)
    console.print(table)
    console.print(f"{lineage.get('held', 0)} labels held now")
    console.print("release: rankloop labels release HOLD --reason ...; purge: rankloop labels purge --hold HOLD --reason ...")


@labels_app.command("release")
def release(
    hold: str = typer.Argument(..., help="the hold's id (`rankloop labels holds`)"),
    reason: str = typer.Option(..., help="why the clicks are real, recorded with the hold"),
) -> None:
    """Lets a held (query, doc)'s labels train again: the next training reads them."""
    from services.storage import open_labels

    s = settings()
    setup_process(s)
    done = decide_hold(open_labels(s.label_store_url), hold, "released", reason)
    console.print(f"released hold {done.hold_id}: labels of doc {done.doc_id!r} on {done.query!r} train again")


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
