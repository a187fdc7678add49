"""The durable label store (Parquet shards) and the training examples built from it.

Shards are named by topic partition and offset range, so a rewrite after a redelivery replaces the
same file and the lineage of a training run is a set of offset ranges. Reading keeps the highest
revision of each `label_id`: a label is never counted twice.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from schemas import LabelledExample

SHARD_RE = re.compile(r"labels-p(\d+)-(\d+)-(\d+)\.parquet$")


def write_shard(labels: list[LabelledExample], folder: Path, partition: int, first: int, last: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"labels-p{partition}-{first:012d}-{last:012d}.parquet"
    tmp = path.with_suffix(".tmp")
    pd.DataFrame([lab.model_dump(mode="json") for lab in labels]).to_parquet(tmp, index=False)
    tmp.replace(path)  # atomic: a reader never sees half a shard
    return path


def read_labels(folder: Path) -> tuple[pd.DataFrame, dict]:
    """Latest revision of every label, and the lineage (shards, offset ranges, counts)."""
    shards = sorted(folder.glob("labels-p*.parquet")) if folder.exists() else []
    if not shards:
        return pd.DataFrame(columns=list(LabelledExample.model_fields)), {"shards": 0, "labels": 0}
    df = pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)
    df = df.sort_values("revision").drop_duplicates("label_id", keep="last").reset_index(drop=True)
    offsets: dict[str, list[int]] = {}
    for p in shards:
        m = SHARD_RE.search(p.name)
        part, lo, hi = m.group(1), int(m.group(2)), int(m.group(3))
        cur = offsets.setdefault(f"p{part}", [lo, hi])
        offsets[f"p{part}"] = [min(cur[0], lo), max(cur[1], hi)]
    signals = df["signals"].explode().value_counts().to_dict()
    lineage = {
        "shards": len(shards),
        "labels": int(len(df)),
        "requests": int(df["request_id"].nunique()),
        "queries": int(df["query"].nunique()),
        "by_grade": {str(k): int(v) for k, v in df["grade"].value_counts().items()},
        "by_signal": {str(k): int(v) for k, v in signals.items()},
        "offsets": offsets,
    }
    return df, lineage


def normalise_query(query: str) -> str:
    """The form under which queries are cached and their feedback is remembered."""
    return " ".join(query.lower().split())


def query_key(query: str) -> str:
    return hashlib.sha1(normalise_query(query).encode()).hexdigest()[:16]


def split_by_time(df: pd.DataFrame, tune_fraction: float, gate_fraction: float) -> dict[str, pd.DataFrame]:
    """Splits labels by request, oldest first: train | tune | gate. The gate slice is the most recent
    traffic, so the gate asks the production question: would the challenger have served the latest
    users better than the champion did? No request is in two slices."""
    first_seen = df.groupby("request_id")["timestamp"].min().sort_values(kind="stable")
    n = len(first_seen)
    n_gate, n_tune = int(round(n * gate_fraction)), int(round(n * tune_fraction))
    order = list(first_seen.index)
    parts = {"train": order[: n - n_gate - n_tune], "tune": order[n - n_gate - n_tune : n - n_gate], "gate": order[n - n_gate :]}
    return {k: df[df["request_id"].isin(set(v))] for k, v in parts.items()}


@dataclass
class QueryFeedback:
    """Aggregated evidence for one query: doc_id -> signed strength (positive = relevant)."""

    query: str
    evidence: dict[str, float] = field(default_factory=dict)

    def positives(self) -> dict[str, float]:
        return {d: s for d, s in self.evidence.items() if s > 0}

    def negatives(self) -> list[str]:
        return [d for d, s in sorted(self.evidence.items(), key=lambda kv: kv[1]) if s < 0]

    def qrels(self) -> dict[str, int]:
        """Graded relevance for evaluation on feedback: strong evidence counts 2, any other 1."""
        return {d: (2 if s >= 2 else 1) for d, s in self.positives().items()}


def aggregate(df: pd.DataFrame, debias: str = "naive", max_ips: float = 5.0) -> dict[str, QueryFeedback]:
    """Sums signed label weights per (query, doc) across requests.

    debias="ips" multiplies each *positive* label by min(1/propensity, max_ips): a click at a rarely
    examined position is stronger evidence. Negatives are not reweighted (an unexamined skip was
    never a skip), and clipping bounds the variance the issue measured as harmful.
    """
    out: dict[str, QueryFeedback] = {}
    for row in df.itertuples(index=False):
        w = float(row.weight) * (1 if row.grade > 0 else -1)
        if debias == "ips" and row.grade > 0:
            w *= min(1.0 / float(row.propensity), max_ips)
        fb = out.setdefault(normalise_query(row.query), QueryFeedback(normalise_query(row.query)))
        fb.evidence[row.doc_id] = fb.evidence.get(row.doc_id, 0.0) + w
    return out
