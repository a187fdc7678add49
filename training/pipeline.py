"""One training run, as stages with typed inputs and outputs:

    labels -> `training.slices` -> `fit_challenger` (`training.train`) -> `training.tuning`
           -> `training.gate` -> MLflow (`training.tracking`) -> a registered version

`train_once` runs them in order and says whether the version passed the gate; it never moves an
alias. What becomes of a version that passed (promoted, interleaved, left for a person) is the control
plane's decision (`services.control.promotion`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from pydantic import BaseModel, ConfigDict, Field
from sentence_transformers import SentenceTransformer

from schemas import FIRST_STAGE
from training import tracking
from training.config import GateConfig, TrainConfig
from training.gate import AsServed, GateResult, run_gate
from training.labels.rules import LabelRules
from training.labels.store import LabelStore
from training.metrics import feedback_ndcg
from training.model_card import CarriedLearner, ModelCard
from training.progress import Progress, silent
from training.ranking.combiner import COMBINER_FILE, WITHOUT_MEMORY_FILE
from training.ranking.encoder import load_encoder
from training.ranking.feedback_memory import prune
from training.ranking.first_stage import FirstStage
from training.ranking.model_files import MEASURED_PRIOR_FILE, PRIOR_FILE
from training.ranking.query import normalise_query
from training.ranking.rank import Candidates, candidates_for, rank_queries
from training.ranking.reranker import FAMILIAR_AT, MemoryEmbeddingCache, Mix, Reranker, save_memory, save_model_folder, write_meta
from training.registry import MlflowRegistry
from training.slices import Debias, Slices, binary, make_slices
from training.train import Example, FitStats, build_examples, fit, select_for_training
from training.tuning import CombinerChoice, TunedMixes, learn_combiner, tune_mixes

log = logging.getLogger("rankloop.training")


class TrainingJob(BaseModel):
    """Everything one run is told, as one object: how to fine-tune, how to gate, how labels were
    graded, how deep serving reranks and where the run may write. The control plane builds it from
    the deployment's settings; a benchmark builds its own."""

    model_config = ConfigDict(frozen=True)

    work_dir: Path = Field(description="scratch space for the model folders of a run")
    depth: int = Field(50, ge=1, description="the serving rerank depth: tuning and the gate rank exactly as serving will")
    train: TrainConfig = TrainConfig()
    gate: GateConfig = GateConfig()
    rules: LabelRules = LabelRules()
    examination: list[float] | None = Field(None, description="a curve estimated from our own logs (None: the rules' one)")


@dataclass(frozen=True)
class Incumbent:
    """The champion at the start of a run (None: the first stage serves)."""

    version: str | None = None
    reranker: Reranker | None = None

    @property
    def seen_until(self) -> float:
        return float(self.reranker.meta.get("trained_until", 0.0)) if self.reranker else 0.0


@dataclass
class Fitted:
    model: SentenceTransformer
    stats: FitStats
    seconds: float
    warm_start: str | None  # the version it started from (None: the base model)


@dataclass
class TrainOutcome:
    """What a run did. "passed": registered and better than the champion on held-out feedback; what
    happens to it next is not training's decision."""

    status: Literal["skipped", "rejected", "passed"]
    message: str
    run_id: str | None = None
    version: str | None = None
    gate: GateResult | None = None
    labels: int = 0  # label contributions the run read (the scheduler counts new ones from here)
    card: ModelCard | None = None  # the version's card, rendered again once its fate is decided

    def record_fate(self, client: MlflowClient, model_name: str, fate: str) -> None:
        """What became of the version (its run's name, outcome tag and card), once it is decided."""
        if not (self.version and self.run_id and self.gate and self.card):
            raise ValueError(f"only a registered version has a fate to record (this run was {self.status})")
        tracking.describe_version(client, model_name, self.version, self.run_id, self.gate, self.card, fate)


def load_incumbent(registry: MlflowRegistry, first_stage: FirstStage) -> Incumbent:
    """The champion, warmed like serving warms it, so the gate ranks both models as users see them."""
    current = registry.champion()
    if current is None:
        return Incumbent()
    champion = Reranker(registry.fetch(current), current.version, MemoryEmbeddingCache()).warm(first_stage)
    return Incumbent(current.version, champion)


@dataclass(frozen=True)
class LearnerPlan:
    """Which debias modes a run fits, and the label count at which both were last compared."""

    modes: list[Debias]
    compared_at: int
    carried_from: str | None = None  # the champion whose comparison chose the one mode (None: decided now)


def plan_learners(cfg: TrainConfig, labels: int, champion: Mapping[str, Any] | None, version: str | None) -> LearnerPlan:
    """`auto` compares the naive and the debiased learner, which costs a second fine-tune; which one
    wins is a property of the deployment's traffic, so the champion's choice is carried until the
    labels have grown `debias_recheck_growth` times since that comparison."""
    if cfg.debias != "auto":
        return LearnerPlan([cfg.debias], 0)
    meta = champion or {}
    chosen, compared_at = meta.get("debias"), int(meta.get("debias_compared_at", 0))
    growth = cfg.debias_recheck_growth
    if chosen in ("naive", "ips") and compared_at > 0 and growth > 1 and labels < growth * compared_at:
        return LearnerPlan([chosen], compared_at, version)
    return LearnerPlan(["naive", "ips"], labels)


def choose_examples(
    slices: Slices, candidates: Candidates, incumbent: Incumbent, cfg: TrainConfig
) -> tuple[list[Example], dict[str, int]]:
    """Queries with labels the champion has not seen plus a replay sample of older ones, as examples."""
    train = slices.train_frame
    fresh = {normalise_query(q) for q in train.loc[train["timestamp"] > incumbent.seen_until, "query"]}
    probes = {fb.query for fb in slices.probe}
    chosen, selection = select_for_training([fb for fb in slices.train if fb.query not in probes], fresh, cfg)
    return build_examples(chosen, candidates, cfg), selection | {"probe_queries": len(probes)}


def fit_challenger(
    examples: list[Example], incumbent: Incumbent, first_stage: FirstStage, cfg: TrainConfig, progress: Progress = silent
) -> Fitted:
    """Fine-tunes from the champion when it has the same kind of document tower, else from the base
    model. A frozen tower trains the query side against the index's vectors."""
    started = time.time()
    champion = incumbent.reranker
    frozen = cfg.document_tower == "frozen"
    warm_start = champion is not None and champion.frozen_documents == frozen
    model = load_encoder(champion.folder if champion is not None and warm_start else None, cfg.max_seq_length)
    cache = MemoryEmbeddingCache()
    vectors = (lambda ids: first_stage.base_vectors(ids, first_stage.text, cache)) if frozen else None
    stats = fit(model, examples, first_stage.text, cfg, progress, document_vectors=vectors)
    return Fitted(model, stats, time.time() - started, incumbent.version if warm_start else None)


@dataclass
class Learner:
    """One debias mode's challenger, fitted and tuned, before the gate."""

    mode: Debias
    slices: Slices
    examples: list[Example]
    selection: dict[str, int]
    fitted: Fitted
    folder: Path
    mixes: TunedMixes
    combiner: CombinerChoice | None  # None: `train.combiner` off
    reranker: Reranker  # as measured: the learned combiner when kept, else the tuned mixes; the train slice's memory
    held_out: float = 0.0  # NDCG@10 on the tune slice's clicks, the yardstick both modes share


def learn(
    mode: Debias,
    slices: Slices,
    incumbent: Incumbent,
    candidates: Candidates,
    first_stage: FirstStage,
    folder: Path,
    job: TrainingJob,
    plan: LearnerPlan,
    progress: Progress = silent,
) -> Learner:
    """Fits, saves (with its document embeddings, so serving swaps to it warm) and tunes one challenger:
    the mixes, then the learned combiner, kept when it beats them on held-out tune queries."""
    cfg = job.train.model_copy(update={"debias": mode})
    examples, selection = choose_examples(slices, candidates, incumbent, cfg)
    fitted = fit_challenger(examples, incumbent, first_stage, cfg, progress)
    tower = {"document_tower": cfg.document_tower}
    memory = prune(slices.memory(), cfg.memory_max_queries)
    save_model_folder(fitted.model, folder, Mix(1.0), memory, extra=tower)
    draft = Reranker(folder, "challenger", MemoryEmbeddingCache()).warm(first_stage, progress=progress)
    draft.embed_queries(slices.queries())  # in batches, once: tuning, the combiner and the gate ask for them many times
    progress("tuning the score mix", 0, 1)
    mixes = tune_mixes(draft, slices.tune, candidates, first_stage.text, job.depth, job.gate.min_queries, slices.probe)
    tuned = mixes.familiar
    mixed = draft.with_mix(tuned.mix, mixes.unfamiliar)
    progress("tuning the score mix", 1, 1)
    choice = None
    if cfg.combiner == "auto":
        progress("learning a combiner", 0, 1)
        choice = learn_combiner(
            mixed, slices.tune, slices.train, candidates, first_stage.text, job.depth, job.gate.min_queries, cfg.seed
        )
        progress("learning a combiner", 1, 1)
        if choice.combiner is not None and choice.without_memory is not None:  # both kept for review and comparison
            choice.combiner.save(folder / COMBINER_FILE)
            choice.without_memory.save(folder / WITHOUT_MEMORY_FILE)
    write_meta(
        folder,
        tuned.mix,
        extra={
            "trained_on_labels": slices.labels,
            "trained_until": slices.trained_until,
            "warm_start": fitted.warm_start,
            "rerank_depth": job.depth,
            "debias": mode,
            "debias_compared_at": plan.compared_at,
            "familiar_at": FAMILIAR_AT,
            "scorer": "combiner" if choice and choice.kept else "mix",
            "designs": mixes.designs(),
            **tower,
        },
        unfamiliar=mixes.unfamiliar,
    )
    served = mixed.with_combiner(choice.combiner) if choice and choice.combiner and choice.kept else mixed
    return Learner(mode, slices, examples, selection, fitted, folder, mixes, choice, served)


def serve_every_label(chosen: Learner, max_queries: int) -> Reranker:
    """Gives the chosen challenger's folder the memory it will serve with, every label's
    (`Slices.served_memory`), once it has been measured with the train slice's (kept beside it: a
    later gate compares it as measured, `Reranker.as_measured`); returns it as served."""
    (chosen.folder / PRIOR_FILE).replace(chosen.folder / MEASURED_PRIOR_FILE)  # what a later gate measures it with
    served = prune(chosen.slices.served_memory(), max_queries)
    return chosen.reranker.with_memory(served, save_memory(chosen.fitted.model, chosen.folder, served))


def in_corpus(df: pd.DataFrame, first_stage: FirstStage) -> pd.DataFrame:
    """The labels of documents that exist now (in the index, or kept from a /rerank call): a deleted
    document leaves the training data, and with it the feedback memory built from it."""
    if df.empty:
        return df
    known = first_stage.content_keys(df["doc_id"].unique().tolist())
    kept = df[df["doc_id"].isin(known)]
    if len(kept) < len(df):
        gone = df.loc[~df["doc_id"].isin(known), "doc_id"].nunique()
        log.info("left out %d labels of %d documents no longer in the corpus", len(df) - len(kept), gone)
    return kept


def train_once(
    registry: MlflowRegistry, labels: LabelStore, first_stage: FirstStage, job: TrainingJob, progress: Progress = silent
) -> TrainOutcome:
    """Trains, gates, logs and registers one challenger; says whether it passed. With `train.debias`
    auto, a naive and a debiased learner are both fitted and the one better on the tune slice's clicks
    goes to the gate, or the champion's choice is carried (`plan_learners`)."""
    cfg, gate, depth = job.train, job.gate, job.depth
    df, lineage = labels.read()
    df = in_corpus(df, first_stage)
    if df.empty:
        return TrainOutcome("skipped", "no labels yet")
    incumbent = load_incumbent(registry, first_stage)
    plan = plan_learners(cfg, len(df), incumbent.reranker.meta if incumbent.reranker else None, incumbent.version)
    modes = plan.modes
    per_mode = {
        m: make_slices(df, lineage, cfg.model_copy(update={"debias": m}), gate, job.rules, job.examination) for m in modes
    }
    slices = per_mode[modes[0]]
    log.info(
        "training on %d labels: %d train / %d tune / %d gate queries with positives",
        slices.labels,
        len(slices.train),
        len(slices.tune),
        len(slices.gate),
    )
    text = first_stage.text
    progress("retrieving candidates", 0, 1)
    candidates = candidates_for(first_stage, slices.queries())
    examples, selection = choose_examples(slices, candidates, incumbent, cfg)
    contributions = int(lineage.get("contributions", slices.labels))
    if not examples:
        why = "no training query has a positive label yet"
        if selection.get("fresh_queries") == 0 and selection.get("older_queries"):
            why = "nothing new: no query has a positive label newer than the champion's training data"
        return TrainOutcome("skipped", why, labels=contributions)

    job.work_dir.mkdir(parents=True, exist_ok=True)
    with (
        mlflow.start_run(run_name=f"challenger-{time.strftime('%Y%m%d-%H%M%S')}") as run,
        tempfile.TemporaryDirectory(dir=job.work_dir) as tmp,
    ):
        learners = [learn(m, per_mode[m], incumbent, candidates, first_stage, Path(tmp) / m, job, plan, progress) for m in modes]
        yardstick = binary(per_mode[modes[0]].tune)
        for learner in learners:  # both modes judged on the same held-out clicks, weighted by neither
            rankings = rank_queries([fb.query for fb in yardstick], candidates, learner.reranker, text, depth)
            learner.held_out = float(np.mean(list(feedback_ndcg(yardstick, rankings).values()) or [0.0]))
        chosen = max(learners, key=lambda c: c.held_out)  # a tie keeps the first (naive: fewer assumptions)
        slices, examples, selection, folder = chosen.slices, chosen.examples, chosen.selection, chosen.folder
        tuned = chosen.mixes.familiar
        tracking.log_inputs(
            df,
            registry.name,
            cfg,
            gate,
            slices.rules,
            lineage,
            slices.labels,
            len(examples),
            selection,
            incumbent.version or "all-MiniLM-L6-v2",
            job.examination is not None,
        )
        tracking.log_debias({c.mode: c.held_out for c in learners}, chosen.mode, plan.carried_from)
        mlflow.log_metrics({f"{k}_top10_identity_share": v for k, v in slices.top_identity_share.items()})
        mlflow.set_tag("champion_at_start", incumbent.version or FIRST_STAGE)
        tracking.log_fit(chosen.fitted.stats, chosen.fitted.seconds)
        served = serve_every_label(chosen, cfg.memory_max_queries)
        tracking.log_tuning(chosen.mixes, len(chosen.reranker.memory), len(served.memory))
        if chosen.combiner is not None:
            tracking.log_combiner(chosen.combiner)
        progress("gating against the champion", 0, 1)
        measured = incumbent.reranker.as_measured() if incumbent.reranker else None
        as_served = AsServed(incumbent.reranker, served)
        report = run_gate(measured, chosen.reranker, slices, candidates, text, depth, gate, as_served)
        progress("logging to MLflow", 0, 1)
        changes = tracking.log_gate(slices.gate, report, slices.rules)
        tracking.log_history(registry.client, registry.name, run.info.run_id, report.result)
        card = ModelCard(
            model_name=registry.name,
            gate=report.result,
            champion_version=incumbent.version,
            lineage=lineage,
            examples=len(examples),
            selection=selection,
            identity_share=slices.top_identity_share,
            trained_until=slices.trained_until,
            changes=changes,
            mix={**tuned.mix.as_dict(), "unfamiliar": chosen.mixes.unfamiliar.as_dict()},
            depth=depth,
            debias={c.mode: c.held_out for c in learners} if len(learners) > 1 else None,
            debias_carried=CarriedLearner(chosen.mode, plan.carried_from, plan.compared_at, cfg.debias_recheck_growth)
            if plan.carried_from
            else None,
            combiner=chosen.combiner.summary() if chosen.combiner else None,
            memory=(len(chosen.reranker.memory), len(served.memory)),
        )
        result = report.result
        (folder / "README.md").write_text(card.render("passed the gate" if result.passed else "rejected by the gate"))
        tracking.write_mlmodel(folder)
        mlflow.log_artifacts(str(folder), "model")
        model_id = tracking.log_model_entity(run.info.run_id, registry.name, tuned.mix.as_dict(), result)
        version = registry.register(run.info.run_id, model_id=model_id)
        registry.tag(version, "gate", result.reason)

    status: Literal["rejected", "passed"] = "passed" if result.passed else "rejected"
    outcome = TrainOutcome(status, result.reason, run.info.run_id, version, result, contributions, card)
    outcome.record_fate(registry.client, registry.name, status)
    log.info("%s version %s: %s", status, version, result.reason)
    return outcome
