"""From labels to what training learns from: per-query feedback, sliced by time.

The slices are by request, oldest first (train | tune | gate), so the gate asks the production
question: would the challenger have served the latest users better than the champion did?
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

from training.ranking.query import normalise_query
from training.ranking.reranker import Evidence


def split_by_time(df: pd.DataFrame, tune_fraction: float, gate_fraction: float) -> dict[str, pd.DataFrame]:
    """Splits labels by request, oldest first: train | tune | gate. No request is in two slices."""
    first_seen = df.groupby("request_id")["timestamp"].min().sort_values(kind="stable")
    n = len(first_seen)
    n_gate, n_tune = round(n * gate_fraction), round(n * tune_fraction)
    order = list(first_seen.index)
    parts = {"train": order[: n - n_gate - n_tune], "tune": order[n - n_gate - n_tune : n - n_gate], "gate": order[n - n_gate :]}
    return {k: df[df["request_id"].isin(set(v))] for k, v in parts.items()}


def split_by_identity(df: pd.DataFrame, tune_fraction: float, gate_fraction: float, seed: int) -> dict[str, pd.DataFrame]:
    """Splits labels by who sent them (user, else session, else the request), a seeded hash of it
    deciding the slice: the slices depend on the traffic, not on how its requests interleaved in time,
    and no identity is in two slices. The fractions hold for identities, about so for requests."""
    fallback = "request:" + df["request_id"].astype(str)
    owner = (
        df["identity"].where(df["identity"].map(lambda v: isinstance(v, str)), fallback) if "identity" in df.columns else fallback
    )
    unit = {o: int.from_bytes(hashlib.blake2b(f"{seed}:{o}".encode(), digest_size=8).digest()) / 2**64 for o in owner.unique()}
    u = owner.map(unit)
    gate, tune = u >= 1 - gate_fraction, (u >= 1 - gate_fraction - tune_fraction) & (u < 1 - gate_fraction)
    return {"train": df[~gate & ~tune], "tune": df[tune], "gate": df[gate]}


@dataclass
class QueryFeedback:
    """Aggregated evidence for one query: doc_id -> signed strength (positive = relevant)."""

    query: str
    evidence: Evidence = field(default_factory=dict)

    def positives(self) -> dict[str, float]:
        return {d: s for d, s in self.evidence.items() if s > 0}

    def negatives(self) -> list[str]:
        return [d for d, s in sorted(self.evidence.items(), key=lambda kv: kv[1]) if s < 0]

    def qrels(self) -> dict[str, int]:
        """Graded relevance for evaluation on feedback: strong evidence counts 2, any other 1."""
        return {d: (2 if s >= 2 else 1) for d, s in self.positives().items()}


IDENTITY_CAP = 2.0  # the weight of the strongest single label: one identity's say on one (query, doc)


def aggregate(df: pd.DataFrame, debias: Literal["naive", "ips"] = "naive", max_ips: float = 5.0) -> dict[str, QueryFeedback]:
    """Sums signed label weights per (query, doc) across requests, each identity's share capped.

    debias="ips" multiplies each *positive* label by min(1/propensity, max_ips): a click at a rarely
    examined position is stronger evidence. Negatives are not reweighted (an unexamined skip was
    never a skip), and clipping bounds the variance the issue measured as harmful.

    One identity (a user, else a session) adds at most +-IDENTITY_CAP to a (query, doc), however
    many requests it made: 2,000 clicks from one user weigh like one user's. Labels without an
    identity count one by one (nothing to group them by).
    """
    shares: dict[tuple[str, str, str], float] = {}
    unattributed = 0
    has_identity = "identity" in df.columns
    for row in df.itertuples(index=False):
        w = float(row.weight) * (1 if int(row.grade) > 0 else -1)
        if debias == "ips" and int(row.grade) > 0:
            w *= min(1.0 / float(row.propensity), max_ips)
        who = row.identity if has_identity and isinstance(row.identity, str) else None
        if who is None:
            who, unattributed = f"#{unattributed}", unattributed + 1
        key = (normalise_query(str(row.query)), str(row.doc_id), who)
        shares[key] = shares.get(key, 0.0) + w
    out: dict[str, QueryFeedback] = {}
    for (query, doc, _who), w in shares.items():
        fb = out.setdefault(query, QueryFeedback(query))
        fb.evidence[doc] = fb.evidence.get(doc, 0.0) + max(-IDENTITY_CAP, min(IDENTITY_CAP, w))
    return out


def top_identity_share(df: pd.DataFrame, top: int = 10) -> float:
    """Share of the labels that come from the `top` most prolific identities (0 when none has one):
    what the gate and the model card show, so a flood from a few identities is visible at review."""
    if "identity" not in df.columns or not len(df):
        return 0.0
    counts = df["identity"].dropna().value_counts()
    return float(counts.head(top).sum() / len(df))
