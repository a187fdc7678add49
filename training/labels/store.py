"""The durable label store: the stream writes labels, the scheduler counts them, training reads them.

`ParquetLabelStore` keeps one Parquet shard per write, named by topic partition and offset range, so
a rewrite after a redelivery replaces the same file and the lineage of a training run is a set of
offset ranges. Reading keeps the highest revision of each `label_id`: a label is never counted twice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from pydantic import BaseModel

from schemas import LabelledExample

SHARD_RE = re.compile(r"labels-p(\d+)-(\d+)-(\d+)\.parquet$")
Lineage = dict[str, Any]
"""Where a set of labels came from: shards, offset ranges per partition, counts by grade and signal."""


class Purge(BaseModel):
    """Labels taken out of training (poisoned, or a user's data to delete): every filter set must
    match. Recorded, not silently applied: who, when and why stay with the store."""

    identity: str | None = None  # "user:<id>" or "session:<id>", as on the labels
    api_key: str | None = None  # the name of a key that ranked or sent events for the label's request
    since: float | None = None  # label time (server time), inclusive
    until: float | None = None
    reason: str
    actor: str
    at: float

    @property
    def whole_identity(self) -> bool:
        """A quarantine: every label of the identity, past and future, whatever key or time."""
        return self.identity is not None and (self.api_key, self.since, self.until) == (None, None, None)

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
        return hit


def apply_purges(df: pd.DataFrame, purges: list[Purge]) -> pd.DataFrame:
    for purge in purges:
        df = df[~purge.matches(df)]
    return df.reset_index(drop=True)


class LabelStore(Protocol):
    def write(self, labels: list[LabelledExample], partition: int, first: int, last: int) -> None:
        """Stores the labels read from offsets first..last of a labels-topic partition (idempotent)."""

    def read(self) -> tuple[pd.DataFrame, Lineage]:
        """The latest revision of every label, and its lineage."""

    def count(self) -> int:
        """How many distinct labels there are now."""

    def purge(self, purge: Purge, count: bool = True) -> int:
        """Takes the matching labels out of every later read (and of labels written later, as a
        redelivered shard); returns how many it took out now (0 without `count`, which costs a read)."""


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(LabelledExample.model_fields))


def latest_revisions(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("revision", kind="stable").drop_duplicates("label_id", keep="last").reset_index(drop=True)


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


class ParquetLabelStore:
    """Parquet shards in a folder (local disk or a shared volume)."""

    PURGES = "purges.jsonl"

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def purges(self) -> list[Purge]:
        path = self.folder / self.PURGES
        return [Purge.model_validate_json(line) for line in path.read_text().splitlines() if line] if path.exists() else []

    def purge(self, purge: Purge, count: bool = True) -> int:
        before = len(self.read()[0]) if count else 0
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / self.PURGES).open("a") as f:
            f.write(purge.model_dump_json() + "\n")
        return before - len(self.read()[0]) if count else 0

    def stored_offsets(self) -> dict[int, int]:
        """labels-topic partition -> the highest offset stored (from shard names: no read)."""
        out: dict[int, int] = {}
        for p in self.shards():
            if m := SHARD_RE.search(p.name):
                out[int(m.group(1))] = max(out.get(int(m.group(1)), -1), int(m.group(3)))
        return out

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("labels-p*.parquet")) if self.folder.exists() else []

    def write(self, labels: list[LabelledExample], partition: int, first: int, last: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"labels-p{partition}-{first:012d}-{last:012d}.parquet"
        tmp = path.with_suffix(".tmp")
        _frame([lab.model_dump(mode="json") for lab in labels]).to_parquet(tmp, index=False)
        tmp.replace(path)  # atomic: a reader never sees half a shard

    def read(self) -> tuple[pd.DataFrame, Lineage]:
        shards = self.shards()
        if not shards:
            return _frame([]), {"shards": 0, "labels": 0}
        purges = self.purges()
        df = apply_purges(latest_revisions(pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)), purges)
        offsets: dict[str, list[int]] = {}
        for p in shards:
            m = SHARD_RE.search(p.name)
            if m is None:
                continue
            part, lo, hi = m.group(1), int(m.group(2)), int(m.group(3))
            cur = offsets.setdefault(f"p{part}", [lo, hi])
            offsets[f"p{part}"] = [min(cur[0], lo), max(cur[1], hi)]
        lineage = {"location": str(self.folder), "shards": len(shards), **describe(df), "offsets": offsets}
        return df, {**lineage, "purges": len(purges)}

    def count(self) -> int:
        return len(self.read()[0])


class MemoryLabelStore:
    """Labels in a list: unit tests and the benchmark's skyline."""

    def __init__(self, labels: list[LabelledExample] | None = None):
        self.rows: list[dict] = [lab.model_dump(mode="json") for lab in labels or []]
        self.purges: list[Purge] = []

    def purge(self, purge: Purge, count: bool = True) -> int:
        before = len(self.read()[0]) if count else 0
        self.purges.append(purge)
        return before - len(self.read()[0]) if count else 0

    def write(self, labels: list[LabelledExample], partition: int, first: int, last: int) -> None:
        self.rows += [lab.model_dump(mode="json") for lab in labels]

    def read(self) -> tuple[pd.DataFrame, Lineage]:
        df = apply_purges(latest_revisions(_frame(self.rows)), self.purges) if self.rows else _frame([])
        return df, {"shards": 0, **describe(df), "purges": len(self.purges)}

    def count(self) -> int:
        return len(self.read()[0])
