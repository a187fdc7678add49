"""The label store as training sees it: the stream writes labels, the scheduler counts them, training
reads them. The protocol and the rules every store follows live here (a read keeps the highest
revision of each `label_id`, so a label is never counted twice; purges are recorded, then applied to
every read); the stores themselves are adapters in `services.storage` (a Delta Lake table, memory).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel

from schemas import LabelledExample
from training.ranking.query import normalise_query

Lineage = dict[str, Any]
"""Where a set of labels came from: table and version, offsets per partition, counts by grade and signal."""


class Purge(BaseModel):
    """Labels taken out of training (poisoned, or a user's data to delete): every filter set must
    match. Recorded, not silently applied: who, when and why stay with the store."""

    identity: str | None = None  # "user:<id>" or "session:<id>", as on the labels
    api_key: str | None = None  # the name of a key that ranked or sent events for the label's request
    query: str | None = None  # labels of this query (compared in normal form) ...
    doc_id: str | None = None  # ... and/or this document (a purged hold sets both)
    since: float | None = None  # label time (server time), inclusive
    until: float | None = None
    reason: str
    actor: str
    at: float

    @property
    def whole_identity(self) -> bool:
        """A quarantine: every label of the identity, past and future, whatever key or time."""
        return self.identity is not None and (self.api_key, self.since, self.until, self.query, self.doc_id) == (None,) * 5

    def matches(self, df: pd.DataFrame) -> pd.Series:
        hit = pd.Series(True, index=df.index)
        if self.identity is not None:
            hit &= df["identity"] == self.identity if "identity" in df.columns else False
        if self.api_key is not None:
            keys = df["api_keys"] if "api_keys" in df.columns else pd.Series([[]] * len(df), index=df.index)
            hit &= keys.map(lambda ks: isinstance(ks, list | tuple | np.ndarray) and self.api_key in list(ks))
        if self.since is not None:
            hit &= df["timestamp"] >= self.since
        if self.until is not None:
            hit &= df["timestamp"] <= self.until
        if self.doc_id is not None:
            hit &= df["doc_id"] == self.doc_id
        if self.query is not None and hit.any():
            hit &= df["query"].astype(str).map(normalise_query) == normalise_query(self.query)
        return hit


def apply_purges(df: pd.DataFrame, purges: list[Purge]) -> pd.DataFrame:
    for purge in purges:
        df = df[~purge.matches(df)]
    return df.reset_index(drop=True)


def unverified(df: pd.DataFrame) -> pd.Series:
    """Labels whose source the server could not vouch for (`trusted` False; None counts as before)."""
    if "trusted" not in df.columns:
        return pd.Series(False, index=df.index)
    return df["trusted"].map(lambda v: v is False or v is np.False_)


HoldStatus = Literal["held", "released", "purged"]


class Hold(BaseModel):
    """A (query, doc) whose positives jumped far above what its positions predict, from many
    identities nobody vouches for: its labels from `since` on stay out of training until someone
    releases (they train again) or purges them (a `Purge` of the pair from `since`, for good).
    The stream records holds (`services.stream.anomaly`); `rankloop labels holds` lists them."""

    hold_id: str
    query: str  # in normal form
    doc_id: str
    since: float  # label time (server time) from which the pair's labels are held
    reason: str
    actor: str
    at: float
    status: HoldStatus = "held"
    decided_by: str | None = None
    decided_at: float | None = None
    decision: str | None = None

    def matches(self, df: pd.DataFrame) -> pd.Series:
        """The pair's labels, and every unsigned label of the query (the skips a fake click implies
        on the documents above it), from `since` on."""
        hit = ((df["doc_id"] == self.doc_id) | unverified(df)) & (df["timestamp"] >= self.since)
        if hit.any():
            hit &= df["query"].astype(str).map(normalise_query) == self.query
        return hit

    def as_purge(self, actor: str, reason: str, at: float) -> Purge:
        """The pair's labels from `since` on, for good (the query's other unsigned labels train again)."""
        return Purge(query=self.query, doc_id=self.doc_id, since=self.since, reason=reason, actor=actor, at=at)


def hold_id(query: str, doc_id: str, since: float) -> str:
    return hashlib.blake2b(f"{normalise_query(query)}|{doc_id}|{since:.0f}".encode(), digest_size=6).hexdigest()


def latest_holds(rows: list[Hold]) -> list[Hold]:
    """Holds are appended, never rewritten, and a table need not read its rows back in order: a hold's
    state is its decided row if it has one (a hold is decided once), else the held one."""
    latest: dict[str, Hold] = {}
    for h in rows:
        seen = latest.get(h.hold_id)
        if seen is None or (h.decided_at or 0.0) > (seen.decided_at or 0.0):
            latest[h.hold_id] = h
    return sorted(latest.values(), key=lambda h: h.at)


def apply_holds(df: pd.DataFrame, holds: list[Hold]) -> tuple[pd.DataFrame, int]:
    """The labels no hold in force covers, and how many were held."""
    held = pd.Series(False, index=df.index)
    for h in holds:
        if h.status == "held":
            held |= h.matches(df)
    return df[~held].reset_index(drop=True), int(held.sum())


class LabelStore(Protocol):
    """Where labels live between the stream and training (`services.storage.delta.DeltaLabelStore`;
    `services.storage.memory.MemoryLabelStore` in tests and the benchmark's skyline)."""

    uri: str

    def write(self, labels: list[LabelledExample], positions: dict[str, int]) -> bool:
        """Stores labels made from input messages up to `positions` (source -> last offset), recording
        the positions in the same transaction; False, storing nothing, when every one was already."""

    def stored_revisions(self, labels: list[LabelledExample], since: float) -> set[tuple[str, int]]:
        """Which of `labels` are stored already, as (label_id, revision), looking at rows from `since`."""

    def stored_offset(self, source: str) -> int | None:
        """The last offset of an input partition (`label_source`) whose labels are stored, or None."""

    def read(self, version: int | None = None) -> tuple[pd.DataFrame, Lineage]:
        """The latest revision of every label (at `version`: time travel), purges applied, and its
        lineage (with `contributions`: `count()` then)."""

    def count(self) -> int:
        """Label contributions (revisions) ever stored: grows with every write, never by compaction."""

    def version(self) -> int | None:
        """The store's current version (None before the first write): a run records the one it read."""

    def files(self) -> int:
        """Data files now: compaction is due when there are many."""

    def compact(self) -> dict[str, int]:
        """Keeps the latest revision of each label in few files: files_before, files_after, rows_removed."""

    def purges(self) -> list[Purge]:
        """Every purge in force, oldest first."""

    def purge(self, purge: Purge, count: bool = True) -> int:
        """Takes the matching labels out of every later read (and of labels written later, as a
        redelivered shard); returns how many it took out now (0 without `count`, which costs a read)."""

    def holds(self) -> list[Hold]:
        """Every hold ever recorded, in its latest state, oldest first."""

    def hold(self, hold: Hold) -> None:
        """Records a hold (or a new state of one): reads leave out what a hold in force covers."""


def frame(rows: list[dict]) -> pd.DataFrame:
    """Label rows (`LabelledExample` dumps) as a frame with every column, even when there are none."""
    return pd.DataFrame(rows, columns=list(LabelledExample.model_fields))


CANONICAL_ORDER = ["timestamp", "position", "doc_id"]
"""How a read orders labels: by when they happened, not by how the stream's partitions and batches
happened to interleave when writing them, so the same traffic trains the same model."""


def latest_revisions(df: pd.DataFrame) -> pd.DataFrame:
    latest = df.sort_values("revision", kind="stable").drop_duplicates("label_id", keep="last")
    order = [c for c in CANONICAL_ORDER if c in latest.columns]
    return (latest.sort_values(order, kind="stable") if order else latest).reset_index(drop=True)


def describe(df: pd.DataFrame) -> Lineage:
    """Counts a reviewer wants next to a training run."""
    if df.empty:
        return {"labels": 0}
    signals = df["signals"].explode().value_counts().to_dict()
    return {
        "labels": len(df),
        "requests": int(df["request_id"].nunique()),
        "queries": int(df["query"].nunique()),
        "by_grade": {str(k): int(v) for k, v in df["grade"].value_counts().items()},
        "by_signal": {str(k): int(v) for k, v in signals.items()},
    }


def label_source(topic: str, topic_id: str, partition: int) -> str:
    """The name under which the store records how far it holds the labels of an input partition: with
    the topic's id, so a topic made anew (its offsets from 0 again) is not mistaken for a replay."""
    return f"{topic}@{topic_id}-p{partition}"
