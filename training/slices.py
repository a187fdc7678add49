"""Labels cut into the slices a training run uses: train (fine-tuning and the feedback memory), tune
(the score mix) and gate (held out for the verdict), each aggregated per query; plus the probe queries
kept out of fine-tuning."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

from training.config import GateConfig, TrainConfig
from training.labels.feedback import (
    QueryFeedback,
    aggregate,
    sources_of_query,
    split_by_identity,
    split_by_time,
    top_identity_share,
    trusted_sources,
)
from training.labels.rules import LabelRules
from training.labels.store import Lineage
from training.ranking.reranker import Evidence

Debias = Literal["naive", "ips"]


@dataclass(frozen=True)
class Slices:
    """Labels cut by time into train | tune | gate, aggregated per query."""

    labels: int
    lineage: Lineage
    rules: LabelRules  # with the examination curve the propensities were computed from
    train_frame: pd.DataFrame
    train: list[QueryFeedback]
    tune: list[QueryFeedback]  # queries with at least one positive
    gate: list[QueryFeedback]  # likewise
    gate_requests: list[tuple[str, QueryFeedback]]  # the gate slice per request (request_id, its feedback); empty
    # when it has gate.min_queries queries (the gate then compares queries; one aggregation per request cost ~30 s at 45k labels)
    trained_until: float  # newest label timestamp in the train slice
    top_identity_share: dict[str, float]  # per slice: share of labels from its 10 most prolific identities
    probe: list[QueryFeedback] = field(default_factory=list)  # train queries kept out of fine-tuning (`probe_queries`)
    support: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # query -> doc -> signed sources behind its positives
    untrusted_gate_queries: int = 0  # held-out queries left out of the verdict: fewer than gate.min_trusted_sources
    every: list[QueryFeedback] = field(default_factory=list)  # every label, train | tune | gate, aggregated per query

    def queries(self) -> list[str]:
        return [fb.query for fbs in (self.train, self.tune, self.gate) for fb in fbs]

    def memory(self) -> dict[str, Evidence]:
        """The feedback memory a challenger is measured with: the train slice's. Tuning and the gate
        judge it on the tune and gate slices, so their feedback must not be in it yet."""
        return remembered(self.train)

    def served_memory(self) -> dict[str, Evidence]:
        """The feedback memory a version serves with once measured: every label it was trained at.
        The tune and gate slices are the newest feedback (a third of it, by time); held out of the
        memory for good, they would reach users only a round later, or never when the gate refuses the
        next challenger (SciFact, six final versions: test NDCG@10 +0.0009 to +0.0070, docs/ranking.md)."""
        return remembered(self.every)


def remembered(feedback: list[QueryFeedback]) -> dict[str, Evidence]:
    return {fb.query: {d: round(v, 4) for d, v in fb.evidence.items()} for fb in feedback}


def make_slices(
    df: pd.DataFrame,
    lineage: Lineage,
    cfg: TrainConfig,
    gate: GateConfig,
    rules: LabelRules,
    examination: list[float] | None = None,
) -> Slices:
    """`examination`: a curve estimated from our own logs; the labels' propensities are recomputed
    from it (their logged ones came from the configured curve)."""
    if examination is not None:
        rules = rules.model_copy(update={"examination": list(examination)})
        df = df.assign(propensity=[rules.propensity(int(p)) for p in df["position"]])
    frames = (
        split_by_identity(df, gate.tune_fraction, gate.fraction, gate.split_seed)
        if gate.split == "identity"
        else split_by_time(df, gate.tune_fraction, gate.fraction)
    )
    mode: Debias = "ips" if cfg.debias == "ips" else "naive"  # `auto` slices once per mode (train_once)
    agg = {k: list(aggregate(v, mode, cfg.max_ips, cfg.unverified_weight).values()) for k, v in frames.items()}
    train = frames["train"]
    support = trusted_sources(df)
    gate_support = trusted_sources(frames["gate"])

    def vouched(fb: QueryFeedback) -> bool:  # the verdict counts queries whose held-out positives signed users sent
        return sources_of_query(gate_support, fb.query) >= gate.min_trusted_sources

    held_out = [fb for fb in agg["gate"] if fb.positives()]
    per_request = []
    if sum(vouched(fb) for fb in held_out) < gate.min_queries:  # only then does the gate compare requests
        gate_requests = frames["gate"].groupby("request_id", sort=False)  # in order of arrival (labels are read so)
        per_request = [
            (str(rid), fb)
            for rid, rows in gate_requests
            for fb in aggregate(rows, mode, cfg.max_ips, cfg.unverified_weight).values()
            if fb.positives() and vouched(fb)
        ]
    tune = [fb for fb in agg["tune"] if fb.positives()]
    return Slices(
        len(df),
        lineage,
        rules,
        train,
        agg["train"],
        tune,
        [fb for fb in held_out if vouched(fb)],
        per_request,
        float(train["timestamp"].max()) if len(train) else 0.0,
        {k: round(top_identity_share(v), 4) for k, v in frames.items()},
        probe_queries(agg["train"], tune, cfg.probe_fraction, gate.min_queries, cfg.seed),
        support,
        sum(not vouched(fb) for fb in held_out),
        list(aggregate(df, mode, cfg.max_ips, cfg.unverified_weight).values()),
    )


def probe_queries(
    train: list[QueryFeedback], tune: list[QueryFeedback], fraction: float, min_queries: int, seed: int
) -> list[QueryFeedback]:
    """Train queries to keep out of fine-tuning, so the tune slice can say how the model does on queries
    it never saw (the unfamiliar mix). Needed when the tune slice has fewer than `min_queries` queries
    the train slice lacks (users repeat the same queries); none when fewer than that many are drawn
    (head traffic: too few to measure, unfamiliar queries get the first stage). A seeded hash of the
    query draws about `fraction` of them, the same ones every round, so a model warm-started from the
    last champion never saw them either. They stay in the feedback memory: only the model does without."""
    trained = {fb.query for fb in train}
    if fraction <= 0 or sum(fb.query not in trained for fb in tune) >= min_queries:
        return []

    def drawn(fb: QueryFeedback) -> bool:
        digest = hashlib.blake2b(f"{seed}:{fb.query}".encode(), digest_size=8).digest()
        return int.from_bytes(digest) / 2**64 < fraction

    probes = [fb for fb in train if fb.positives() and drawn(fb)]
    return probes if len(probes) >= min_queries else []


def binary(feedback: list[QueryFeedback]) -> list[QueryFeedback]:
    """The same feedback with every positive as strong as any other: how the naive and the debiased
    learner are compared (each one's own weights would favour it)."""
    return [QueryFeedback(fb.query, {d: (1.0 if v > 0 else v) for d, v in fb.evidence.items()}) for fb in feedback]
