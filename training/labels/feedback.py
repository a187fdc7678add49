"""From labels to what training learns from: per-query feedback, sliced by time.

The slices are by request, oldest first (train | tune | gate), so the gate asks the production
question: would the challenger have served the latest users better than the champion did?
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from training.labels.store import unverified
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


SOURCE_CAP = 2.0  # the weight of the strongest single label: one source's say on one (query, doc)


def source_column(df: pd.DataFrame) -> pd.Series:
    """Who vouches for each label (`training.labels.rules.source_of`): its source, else (labels from
    before sources, or written past the server) its identity, else the label itself."""
    fallback = (
        "label:" + df["label_id"].astype(str)
        if "label_id" in df.columns
        else pd.Series([f"row:{i}" for i in range(len(df))], index=df.index)
    )
    out = fallback
    if "identity" in df.columns:
        out = df["identity"].where(df["identity"].map(lambda v: isinstance(v, str)), out)
    if "source" in df.columns:
        out = df["source"].where(df["source"].map(lambda v: isinstance(v, str)), out)
    return out


def aggregate(
    df: pd.DataFrame, debias: Literal["naive", "ips"] = "naive", max_ips: float = 5.0, unverified_weight: float = 1.0
) -> dict[str, QueryFeedback]:
    """Sums signed label weights per (query, doc) across sources, each source's share capped.

    debias="ips" multiplies each *positive* label by min(1/propensity, max_ips): a click at a rarely
    examined position is stronger evidence. Negatives are not reweighted (an unexamined skip was
    never a skip), and clipping bounds the variance the issue measured as harmful.

    One source (a signed user, else the network the feedback came from) adds at most +-SOURCE_CAP to
    a (query, doc), however many requests or user ids it brought: 2,000 clicks from one user, or
    from 500 ids minted on one network, weigh like one user's. So a (query, doc)'s evidence grows
    with the distinct sources agreeing, and a source the server could not vouch for counts
    `unverified_weight` of a signed user's (`train.unverified_weight`).
    """
    if df.empty:
        return {}
    sign = np.where(df["grade"].astype(int) > 0, 1.0, -1.0)
    w = df["weight"].astype(float).to_numpy() * sign
    if debias == "ips":
        boost = np.minimum(1.0 / df["propensity"].astype(float).to_numpy(), max_ips)
        w = np.where(sign > 0, w * boost, w)
    rows = pd.DataFrame(
        {
            "query": df["query"].astype(str).map(normalise_query),
            "doc": df["doc_id"].astype(str),
            "source": source_column(df),
            "w": w,
            "trust": np.where(unverified(df), unverified_weight, 1.0),
        }
    )
    shares = rows.groupby(["query", "doc", "source"], sort=False).agg(w=("w", "sum"), trust=("trust", "min"))
    shares["say"] = shares["w"].clip(-SOURCE_CAP, SOURCE_CAP) * shares["trust"]
    out: dict[str, QueryFeedback] = {}
    for (query, doc), say in shares.groupby(level=["query", "doc"], sort=False)["say"].sum().items():
        fb = out.setdefault(str(query), QueryFeedback(str(query)))
        fb.evidence[str(doc)] = float(say)
    return out


def trusted_sources(df: pd.DataFrame) -> dict[str, dict[str, set[str]]]:
    """Per (normalised) query and doc: the distinct sources the server vouches for that sent a positive
    label for it. What the gate asks before it believes a document rose, or counts a query's verdict."""
    pos = df[(df["grade"].astype(int) > 0) & ~unverified(df)] if len(df) else df
    out: dict[str, dict[str, set[str]]] = {}
    for query, doc, source in zip(pos["query"].astype(str), pos["doc_id"].astype(str), source_column(pos), strict=True):
        out.setdefault(normalise_query(query), {}).setdefault(doc, set()).add(str(source))
    return out


def sources_of_query(support: dict[str, dict[str, set[str]]], query: str) -> int:
    """Distinct vouched-for sources behind a query's positives."""
    return len(set().union(*support.get(normalise_query(query), {}).values()))


def top_identity_share(df: pd.DataFrame, top: int = 10) -> float:
    """Share of the labels that come from the `top` most prolific identities (0 when none has one):
    what the gate and the model card show, so a flood from a few identities is visible at review."""
    if "identity" not in df.columns or not len(df):
        return 0.0
    counts = df["identity"].dropna().value_counts()
    return float(counts.head(top).sum() / len(df))
