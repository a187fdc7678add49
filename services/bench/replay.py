"""`rankloop bench replay`: a loop benchmark's rounds trained again on the labels the run stored,
under the current settings. What a training change would have done to those rounds, in minutes per
round, without simulating users again.

Each round reads the run's label store as it stood when the round trained (the first table version
holding the round's label count from the run's JSON: Delta Lake time travel), trains, gates and, when
the challenger passes, promotes it in a registry of the replay's own, as the scheduler does; every
champion is rated on the eval split as served and as its parts (`evaluate_designs`). The feedback
is the run's: its users were shown the run's champions, not the replay's, so a replay answers "the
same feedback, another training" only. The run's broker is gone, so a debiased learner weighs clicks
by the label rules' examination curve, not by one estimated from the run's impressions;
`RANKLOOP_TRAIN__DEBIAS=naive` leaves it out.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from pydantic import BaseModel
from rich.console import Console

from services.config import Settings
from services.control.promotion import MlflowAliases, Promotions
from services.control.scheduler import training_job
from services.storage import open_registry
from services.storage.delta import DeltaLabelStore
from services.storage.memory import MemoryPublisher
from training import beir
from training.evaluate import evaluate_designs, evaluate_ranker
from training.labels.store import Lineage
from training.pipeline import train_once
from training.ranking.embedding_cache import MemoryEmbeddingCache
from training.ranking.first_stage import FirstStage
from training.ranking.rank import candidates_for
from training.ranking.reranker import Reranker

console = Console()


class ReplayRound(BaseModel):
    round: int
    labels: int
    status: str  # passed (promoted), rejected, skipped
    gate: str
    seconds: float  # train_and_gate
    model_version: str | None  # the champion after the round
    eval_ndcg_at_10: float | None  # the champion as served (None: the first stage still serves)
    designs: dict[str, dict]  # `evaluate_designs` of the champion: NDCG@10 and NDCG@10 on unfamiliar queries


class ReplayResult(BaseModel):
    run: str
    run_state: str
    eval_split: str
    train: dict  # the settings trained under
    rounds: list[ReplayRound]


class LabelsAsOf:
    """A label store read as it stood at one table version, as a training reads a store."""

    def __init__(self, store: DeltaLabelStore, version: int):
        self.store, self.version = store, version

    def read(self, version: int | None = None, columns: list[str] | None = None) -> tuple[pd.DataFrame, Lineage]:
        return self.store.read(self.version, columns)


def version_holding(store: DeltaLabelStore, labels: int) -> int:
    """The first table version with at least `labels` labels (a run's labels only grow)."""
    lo, hi = 0, store.version() or 0
    while lo < hi:
        mid = (lo + hi) // 2
        if len(store.read(mid)[0]) >= labels:
            hi = mid
        else:
            lo = mid + 1
    return lo


def run_replay(s: Settings, run: Path, run_state: Path, out: Path) -> ReplayResult:
    """`s`: the replay's own state (registry, MLflow) and the settings to train under."""
    bench = json.loads(run.read_text())
    eval_split = bench["eval_split"]
    ds = beir.load(s.dataset, s.state_dir / "datasets")
    fs = FirstStage.current(run_state)
    store = DeltaLabelStore(run_state / "labels" / s.deployment)
    registry = open_registry(s)
    # the replay's own registry; no serving worker listens, so its model events go nowhere
    promotions = Promotions(registry, MlflowAliases(registry), MemoryPublisher(), s.keys.model_events)
    job = training_job(s)
    cands = candidates_for(fs, [ds.queries[q] for q in ds.qrels(eval_split)])
    rounds = []
    for r in bench["rounds"]:
        labels = LabelsAsOf(store, version_holding(store, int(r["labels"])))
        started = time.time()
        outcome = train_once(registry, labels, fs, job)  # type: ignore[arg-type]
        seconds = time.time() - started
        if outcome.status == "passed":
            promotions.promote(str(outcome.version), outcome.message, "bench replay")
        champion = registry.champion()
        served, designs = None, {}
        if champion is not None:
            reranker = Reranker(registry.fetch(champion), champion.version, MemoryEmbeddingCache()).warm(fs)
            served = round(evaluate_ranker(ds, eval_split, cands, reranker, fs.text, s.serving.rerank_depth)["ndcg@10"], 4)
            rated = evaluate_designs(ds, eval_split, cands, reranker, fs.text, s.serving.rerank_depth)
            designs = {k: {m: v[m] for m in ("ndcg@10", "ndcg@10 unfamiliar") if m in v} for k, v in rated.items()}
        rounds.append(
            ReplayRound(
                round=r["round"],
                labels=len(labels.read()[0]),
                status=outcome.status,
                gate=outcome.message,
                seconds=round(seconds, 1),
                model_version=champion.version if champion else None,
                eval_ndcg_at_10=served,
                designs=designs,
            )
        )
        console.print(
            f"round {r['round']}: {r['labels']} labels, {outcome.status} ({outcome.message}); "
            f"champion {champion.version if champion else 'first stage'}: {eval_split} NDCG@10 {served}, {seconds:.0f} s"
        )
    result = ReplayResult(
        run=str(run), run_state=str(run_state), eval_split=eval_split, train=s.train.model_dump(mode="json"), rounds=rounds
    )
    out.write_text(result.model_dump_json(indent=2))
    return result
