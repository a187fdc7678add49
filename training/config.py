"""Settings of a training run and of the promotion gate. Plain pydantic models with no heavy imports,
so the configuration object (and `rankloop --help`) never loads torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainConfig(BaseModel):
    """How a challenger is fine-tuned from labels."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=2)
    lr: float = Field(
        2e-4,
        gt=0,
        description="peak learning rate (warm-up, then linear decay): 2e-4 learns more in 2 epochs than 5e-5 in 4",
    )
    hard_negatives: int = Field(2, ge=0)
    retriever_negatives_from_top: int = Field(20, ge=1)
    debias: Literal["auto", "naive", "ips"] = Field(
        "auto",
        description="ips: clicks weighted by 1/examination; auto: fit both, keep the one better on the tune slice's clicks "
        "(which wins depends on the deployment's traffic)",
    )
    debias_recheck_growth: float = Field(
        4.0,
        ge=1.0,
        description="with auto: once a run has compared both learners, later runs fit only the one it chose (half the "
        "time) until the labels have grown this many times; 1: compare in every run",
    )
    max_ips: float = Field(5.0, ge=1.0)
    max_weight: float = Field(4.0, gt=0)
    replay_fraction: float = Field(0.5, ge=0.0, description="old queries replayed per new one when warm-starting")
    max_examples: int = Field(
        1500, ge=1, description="bounds a run's time (~60 examples/s/epoch on 2 CPU cores with the frozen document tower)"
    )
    seed: int = 13
    probe_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="share of the train slice's queries kept out of fine-tuning (not out of the feedback memory) "
        "when the tune slice has too few queries training never saw: the unfamiliar mix is tuned on them as unseen",
    )
    document_tower: Literal["frozen", "tuned"] = Field(
        "frozen",
        description="frozen: fine-tune the query side only, scored against the index's own document vectors, so a new "
        "version is servable in seconds at any corpus size; tuned: fine-tune both sides, which re-embeds every document "
        "per version (docs/scale.md)",
    )
    memory_max_queries: int = Field(
        100_000,
        ge=0,
        description="queries a version's feedback memory keeps (those with the most evidence); bounds its size and the "
        "encoding each version does for it",
    )
    combiner: Literal["auto", "off"] = Field(
        "auto",
        description="auto: learn a LightGBM lambdarank combiner on the tune slice and keep it when it beats the tuned mixes",
    )
    max_seq_length: int = Field(128, ge=16, description="training length; 4x faster than 256 on CPU, inference uses 256")
    unverified_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="what a source the server cannot vouch for (a network, not a signed user) counts next to a signed "
        "user, in training and in the gate (docs/security.md)",
    )


InterleaveMethod = Literal["optimized", "team_draft"]


class InterleaveConfig(BaseModel):
    """The online stage: interleaving of challenger and champion on live traffic."""

    model_config = ConfigDict(extra="forbid")

    method: InterleaveMethod = Field(
        "optimized",
        description="optimized: fair merges drawn so random clicks earn nothing, a like credits by rank difference "
        "(fewer sessions on most benchmark pairs); team_draft: a like credits 1 to the team that picked the document "
        "(fewer on the loop's own closest decisions): docs/online-evaluation.md",
    )

    share: float = Field(0.0, ge=0.0, le=1.0, description="share of requests interleaved while a challenger waits (0: off)")
    min_sessions: int = Field(100, ge=10, description="sessions before the first look; looks double from here")
    max_sessions: int = Field(50_000, ge=10, description="sessions after which no significance means no difference")
    p_value: float = Field(0.05, gt=0.0, le=1.0, description="the rule's false-positive rate over all its looks")

    @model_validator(mode="after")
    def _max_after_min(self) -> InterleaveConfig:
        if self.max_sessions < self.min_sessions:
            raise ValueError("max_sessions must be at least min_sessions")
        return self


class GateConfig(BaseModel):
    """How labels are sliced by time and when a challenger counts as better than the champion."""

    model_config = ConfigDict(extra="forbid")

    split: Literal["time", "identity"] = Field(
        "time",
        description="time: the latest requests are held out (the production question); identity: a seeded hash of "
        "the user (else session, else request) picks them, so the same traffic gives the same slices however its "
        "requests interleaved (benchmarks)",
    )
    split_seed: int = Field(0, description="seeds the identity split")
    fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of requests held out for the gate (the latest, by default)")
    tune_fraction: float = Field(0.15, ge=0.0, lt=1.0, description="share before it that tunes the score mix")
    margin: float = Field(0.005, ge=0.0, description="minimum mean NDCG@10 gain")
    p_value: float = Field(0.05, gt=0.0, le=1.0, description="one-sided Wilcoxon p-value to beat")
    min_queries: int = Field(30, ge=1, description="held-out queries for a per-query verdict; with fewer, requests are compared")
    min_requests: int = Field(200, ge=1, description="held-out requests for a per-request verdict (few distinct queries)")
    min_clustered_queries: int = Field(5, ge=2, description="distinct queries those requests must come from")
    min_trusted_sources: int = Field(
        1, ge=0, description="signed users (distinct) a held-out query's positives need to count in the verdict"
    )
    max_query_share: float = Field(
        0.5, gt=0.0, le=1.0, description="most of the gain one query may carry while fewer than min_queries decide"
    )
    max_unsupported_rise: int = Field(
        5,
        ge=1,
        description="places a document may climb into a query's top 10 without rise_sources signed users' positives on it",
    )
    rise_sources: int = Field(1, ge=1, description="distinct signed users that make a document's rise believable")


@dataclass(frozen=True)
class AnnSettings:
    """When the snapshot turns approximate, how good it must stay, and how often it is rewritten."""

    ann_from: int = 50_000
    recall: float = 0.97
    rebuild_after: int = 20_000  # documents changed since the snapshot (the in-memory part's size)
