"""One retraining, as stages with typed inputs and outputs:

    labels -> `make_slices` -> `fit_challenger` -> `tune_mix` -> `compare_on_feedback` (gate)
           -> MLflow (`training.tracking`) -> register -> promote (or leave it for a human)

`train_once` runs them in order; each stage is usable (and tested) on its own.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import mlflow
import numpy as np
import pandas as pd
from sentence_transformers import SentenceTransformer

from schemas import FIRST_STAGE, ModelEvent
from training import tracking
from training.config import GateConfig, TrainConfig
from training.gate import GateResult, decide, decide_clustered
from training.interleave import INTERLEAVING, STAGE_TAG
from training.labels.feedback import QueryFeedback, aggregate, split_by_identity, split_by_time, top_identity_share
from training.labels.rules import LabelRules
from training.labels.store import LabelStore, Lineage
from training.metrics import per_query, ranking_to_run
from training.model_card import model_card
from training.progress import Progress, silent
from training.ranking.encoder import load_encoder
from training.ranking.first_stage import Candidate, FirstStage, fuse
from training.ranking.query import normalise_query, query_key
from training.ranking.rank import Ranking, candidates_for, rank, rank_queries
from training.ranking.reranker import (
    FAMILIAR_AT,
    Evidence,
    MemoryEmbeddingCache,
    Mix,
    Reranker,
    save_model_folder,
    write_meta,
)
from training.registry import MlflowRegistry
from training.train import Example, FitStats, build_examples, fit, select_for_training

log = logging.getLogger("rankloop.training")
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]  # weight of the model similarity vs the first-stage score
BETAS = [0.0, 0.25, 0.5, 1.0, 2.0]  # weight of the feedback memory
TAUS = [0.3, 0.5, 0.7]  # similarity below which a past query's feedback is not borrowed
FUSIONS = [None, 0.0, 0.25, 0.75, 1.0]  # the first stage's BM25 weight (None: the index's, 0.5 by default)
Text = Callable[[str], str]
Debias = Literal["naive", "ips"]
Candidates = dict[str, list[Candidate]]


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
    gate_requests: list[tuple[str, QueryFeedback]]  # the gate slice per request (request_id, its feedback)
    trained_until: float  # newest label timestamp in the train slice
    top_identity_share: dict[str, float]  # per slice: share of labels from its 10 most prolific identities
    probe: list[QueryFeedback] = field(default_factory=list)  # train queries kept out of fine-tuning (`probe_queries`)

    def queries(self) -> list[str]:
        return [fb.query for fbs in (self.train, self.tune, self.gate) for fb in fbs]

    def memory(self) -> dict[str, Evidence]:
        """The feedback memory a model trained on these slices serves with."""
        return {fb.query: {d: round(v, 4) for d, v in fb.evidence.items()} for fb in self.train}


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


@dataclass(frozen=True)
class Tuned:
    mix: Mix
    grid: dict[Mix, float]


@dataclass(frozen=True)
class TunedMixes:
    """The familiar mix (queries near ones with feedback) and the unfamiliar one (the rest)."""

    familiar: Tuned
    unfamiliar: Mix
    unfamiliar_grid: dict[Mix, float]  # empty when too few unfamiliar tune queries: the safe mix then
    familiar_queries: int
    unfamiliar_queries: int
    probe_queries: int = 0  # train queries not fine-tuned on, tuned on as unseen beside the unfamiliar ones


@dataclass(frozen=True)
class GateReport:
    champion: dict[str, float]  # per-query NDCG@10 on the gate slice
    challenger: dict[str, float]
    result: GateResult
    champion_order: dict[str, list[str]]  # per query: the judged documents as each model ranks them
    challenger_order: dict[str, list[str]]


@dataclass
class TrainOutcome:
    status: Literal["skipped", "rejected", "passed", "promoted"]  # "passed": better, left for a human
    message: str
    run_id: str | None = None
    version: str | None = None
    gate: GateResult | None = None
    event: ModelEvent | None = None
    labels: int = 0


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
    agg = {k: list(aggregate(v, mode, cfg.max_ips).values()) for k, v in frames.items()}
    train = frames["train"]
    gate_requests = frames["gate"].groupby("request_id", sort=False)  # in order of arrival (labels are read so)
    per_request = [
        (str(rid), fb) for rid, rows in gate_requests for fb in aggregate(rows, mode, cfg.max_ips).values() if fb.positives()
    ]
    tune = [fb for fb in agg["tune"] if fb.positives()]
    return Slices(
        len(df),
        lineage,
        rules,
        train,
        agg["train"],
        tune,
        [fb for fb in agg["gate"] if fb.positives()],
        per_request,
        float(train["timestamp"].max()) if len(train) else 0.0,
        {k: round(top_identity_share(v), 4) for k, v in frames.items()},
        probe_queries(agg["train"], tune, cfg.probe_fraction, gate.min_queries, cfg.seed),
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


def load_incumbent(registry: MlflowRegistry, first_stage: FirstStage) -> Incumbent:
    """The champion, warmed like serving warms it, so the gate ranks both models as users see them."""
    current = registry.champion()
    if current is None:
        return Incumbent()
    champion = Reranker(registry.fetch(current), current.version, MemoryEmbeddingCache()).warm(first_stage)
    return Incumbent(current.version, champion)


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
    examples: list[Example], incumbent: Incumbent, text: Text, cfg: TrainConfig, progress: Progress = silent
) -> Fitted:
    """Fine-tunes from the champion (or the base model)."""
    started = time.time()
    model = load_encoder(incumbent.reranker.folder if incumbent.reranker else None, cfg.max_seq_length)
    stats = fit(model, examples, text, cfg, progress)
    return Fitted(model, stats, time.time() - started)


def _feedback_ndcg(feedback: list[QueryFeedback], rankings: dict[str, Ranking]) -> dict[str, float]:
    qrels = {query_key(fb.query): fb.qrels() for fb in feedback}
    run = ranking_to_run({query_key(q): r for q, r in rankings.items()})
    return per_query(qrels, run, "ndcg@10")


def tune_mix(
    reranker: Reranker,
    feedback: list[QueryFeedback],
    candidates: Candidates,
    text: Text,
    depth: int,
    fusions: list[float | None] = FUSIONS,
    unseen: frozenset[str] = frozenset(),
) -> Tuned:
    """Mean NDCG@10 on the tune slice for every mix, the first stage's fusion included (ties go to the
    first fusion listed); the head's features are computed once per query and fusion. `unseen` queries
    are ranked as if the feedback memory knew nothing near them (probe queries)."""
    grid: dict[Mix, float] = {}
    for fusion in fusions:
        heads = {fb.query: candidates[fb.query] if fusion is None else fuse(candidates[fb.query], fusion) for fb in feedback}
        feats = [(fb, reranker.features(fb.query, heads[fb.query][:depth], text, unseen=fb.query in unseen)) for fb in feedback]
        for a, b, t in itertools.product(ALPHAS, BETAS, TAUS):
            if b == 0 and t != TAUS[0]:
                continue  # tau only matters when the memory is used
            mix = Mix(a, b, t, fusion)
            rankings = {fb.query: rank(fb.query, candidates[fb.query], reranker, text, depth, mix, f) for fb, f in feats}
            grid[mix] = float(np.mean(list(_feedback_ndcg(feedback, rankings).values()) or [0.0]))
    return Tuned(max(grid, key=lambda m: grid[m]), grid)


def tune_fusion(
    reranker: Reranker, feedback: list[QueryFeedback], candidates: Candidates, text: Text, depth: int
) -> float | None:
    """The BM25 weight under which the first stage *alone* ranks the tune slice best (ties: the
    index's). Learned on the first stage alone because the feedback memory answers repeated queries
    whatever the fusion: tuned inside the whole mix, the fusion stayed the index's on a corpus where
    dense alone beat it by 0.054 (docs/benchmark.md)."""
    scores = {}
    for fusion in FUSIONS:
        mix = Mix(0.0, 0.0, TAUS[0], fusion)
        rankings = {fb.query: rank(fb.query, candidates[fb.query], reranker, text, depth, mix) for fb in feedback}
        scores[fusion] = float(np.mean(list(_feedback_ndcg(feedback, rankings).values()) or [0.0]))
    return max(scores, key=lambda f: scores[f])


SAFE_MIX = Mix(0.0)  # the first stage alone: what a query no feedback resembles gets (under the learned fusion)


def tune_mixes(
    reranker: Reranker,
    feedback: list[QueryFeedback],
    candidates: Candidates,
    text: Text,
    depth: int,
    min_queries: int,
    probe: list[QueryFeedback] | None = None,
) -> TunedMixes:
    """Learns the first stage's fusion on the whole tune slice, then tunes a mix on its familiar
    queries (`FAMILIAR_AT`) and one on its unfamiliar ones, joined by the `probe` queries (train queries
    the model was not fine-tuned on, ranked as if the memory knew nothing near them) when too few.
    With fewer than `min_queries` of both (a few head queries make all the traffic) nothing says how the
    model does away from them, and unfamiliar queries get the first stage alone (`SAFE_MIX`, under the
    learned fusion)."""
    fusion = tune_fusion(reranker, feedback, candidates, text, depth)
    near = {fb.query: reranker.familiarity(reranker.embed_query(fb.query)) >= FAMILIAR_AT for fb in feedback}
    familiar = [fb for fb in feedback if near[fb.query]]
    unfamiliar = [fb for fb in feedback if not near[fb.query]]
    probe = (probe or []) if len(unfamiliar) < min_queries else []
    pool, unseen = unfamiliar + probe, frozenset(fb.query for fb in probe)
    tuned = tune_mix(reranker, familiar or feedback, candidates, text, depth, [fusion])
    other = tune_mix(reranker, pool, candidates, text, depth, [fusion], unseen) if len(pool) >= min_queries else None
    return TunedMixes(
        tuned,
        other.mix if other else replace(SAFE_MIX, bm25_weight=fusion),
        other.grid if other else {},
        len(familiar),
        len(unfamiliar),
        len(probe),
    )


def compare_on_feedback(
    champion: Reranker | None,
    challenger: Reranker,
    feedback: list[QueryFeedback],
    candidates: Candidates,
    text: Text,
    depth: int,
    gate: GateConfig,
) -> GateReport:
    """Per-query NDCG@10 of both rankers on held-out feedback, and the gate's decision.

    Both rank only the documents users judged for the query (clicked, skipped, rejected): the
    feedback was collected under the champion, so a document it never showed has no label and would
    count as irrelevant, a bias that favours the champion whatever the challenger is worth. Measured
    in a loop benchmark: on all candidates the gate rejected a challenger that was +0.026 NDCG@10
    better on SciFact test; on judged documents it found +0.022, p=4e-5 (docs/retraining.md)."""
    queries = [f.query for f in feedback]
    judged = {f.query: [c for c in candidates[f.query] if c.doc_id in f.evidence] for f in feedback}
    before = rank_queries(queries, judged, champion, text, depth)
    after = rank_queries(queries, judged, challenger, text, depth)
    base, new = _feedback_ndcg(feedback, before), _feedback_ndcg(feedback, after)
    return GateReport(
        base,
        new,
        decide(base, new, gate.margin, gate.p_value, gate.min_queries),
        {q: [d for d, _ in r] for q, r in before.items()},
        {q: [d for d, _ in r] for q, r in after.items()},
    )


def compare_on_requests(
    champion: Reranker | None,
    challenger: Reranker,
    requests: list[tuple[str, QueryFeedback]],
    candidates: Candidates,
    text: Text,
    depth: int,
    gate: GateConfig,
) -> GateReport:
    """The gate for few distinct queries: NDCG@10 of both rankers per held-out request (on the
    documents judged in that request), decided by a cluster bootstrap over queries. The per-query
    figures it reports are the means of their requests."""
    units = []
    orders: dict[str, tuple[Ranking, Ranking]] = {}  # per query: the first request's two rankings
    for rid, fb in requests:
        judged = [c for c in candidates[fb.query] if c.doc_id in fb.evidence]
        units.append((rid, fb, judged))
    rankings: dict[str, dict[str, Ranking]] = {"before": {}, "after": {}}
    seen: dict[tuple[str, tuple[str, ...]], tuple[Ranking, Ranking]] = {}
    for rid, fb, judged in units:  # requests of one query usually show the same documents: rank those once
        key = (fb.query, tuple(sorted(c.doc_id for c in judged)))
        if key not in seen:
            seen[key] = (rank(fb.query, judged, champion, text, depth), rank(fb.query, judged, challenger, text, depth))
        rankings["before"][rid], rankings["after"][rid] = seen[key]
        orders.setdefault(fb.query, seen[key])
    qrels = {rid: fb.qrels() for rid, fb, _ in units}
    before = per_query(qrels, ranking_to_run(rankings["before"]), "ndcg@10")
    after = per_query(qrels, ranking_to_run(rankings["after"]), "ndcg@10")
    rids = [rid for rid, _, _ in units if rid in before and rid in after]
    query_of = {rid: fb.query for rid, fb, _ in units}
    result = decide_clustered(
        [query_key(query_of[r]) for r in rids],
        [before[r] for r in rids],
        [after[r] for r in rids],
        gate.margin,
        gate.p_value,
        gate.min_requests,
        gate.min_clustered_queries,
    )
    by_query: dict[str, tuple[list[float], list[float]]] = {}
    for r in rids:
        a, b = by_query.setdefault(query_key(query_of[r]), ([], []))
        a.append(before[r])
        b.append(after[r])
    return GateReport(
        {q: float(np.mean(a)) for q, (a, _) in by_query.items()},
        {q: float(np.mean(b)) for q, (_, b) in by_query.items()},
        result,
        {q: [d for d, _ in o[0]] for q, o in orders.items()},
        {q: [d for d, _ in o[1]] for q, o in orders.items()},
    )


def run_gate(
    champion: Reranker | None,
    challenger: Reranker,
    slices: Slices,
    candidates: Candidates,
    text: Text,
    depth: int,
    gate: GateConfig,
) -> GateReport:
    """Per query while there are `gate.min_queries` distinct held-out queries; with fewer, per request
    clustered by query (a few head queries asked many times still get a verdict)."""
    if len(slices.gate) >= gate.min_queries:
        return compare_on_feedback(champion, challenger, slices.gate, candidates, text, depth, gate)
    return compare_on_requests(champion, challenger, slices.gate_requests, candidates, text, depth, gate)


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
    reranker: Reranker  # under the tuned mixes
    held_out: float = 0.0  # NDCG@10 on the tune slice's clicks, the yardstick both modes share


def learn(
    mode: Debias,
    slices: Slices,
    incumbent: Incumbent,
    candidates: Candidates,
    first_stage: FirstStage,
    folder: Path,
    depth: int,
    cfg: TrainConfig,
    min_queries: int,
    progress: Progress = silent,
) -> Learner:
    """Fits, saves (with its document embeddings, so serving swaps to it warm) and tunes one challenger."""
    cfg = cfg.model_copy(update={"debias": mode})
    examples, selection = choose_examples(slices, candidates, incumbent, cfg)
    fitted = fit_challenger(examples, incumbent, first_stage.text, cfg, progress)
    save_model_folder(fitted.model, folder, Mix(1.0), slices.memory())
    draft = Reranker(folder, "challenger", MemoryEmbeddingCache()).warm(first_stage, progress=progress)
    mixes = tune_mixes(draft, slices.tune, candidates, first_stage.text, depth, min_queries, slices.probe)
    tuned = mixes.familiar
    write_meta(
        folder,
        tuned.mix,
        extra={
            "trained_on_labels": slices.labels,
            "trained_until": slices.trained_until,
            "warm_start": incumbent.version,
            "rerank_depth": depth,
            "debias": mode,
            "familiar_at": FAMILIAR_AT,
        },
        unfamiliar=mixes.unfamiliar,
    )
    return Learner(mode, slices, examples, selection, fitted, folder, mixes, draft.with_mix(tuned.mix, mixes.unfamiliar))


def binary(feedback: list[QueryFeedback]) -> list[QueryFeedback]:
    """The same feedback with every positive as strong as any other: how the naive and the debiased
    learner are compared (each one's own weights would favour it)."""
    return [QueryFeedback(fb.query, {d: (1.0 if v > 0 else v) for d, v in fb.evidence.items()}) for fb in feedback]


def train_once(
    registry: MlflowRegistry,
    labels: LabelStore,
    first_stage: FirstStage,
    work_dir: Path,
    depth: int,
    cfg: TrainConfig | None = None,
    gate: GateConfig | None = None,
    rules: LabelRules | None = None,
    on_pass: Literal["promote", "interleave", "nominate", "register"] = "promote",
    examination: list[float] | None = None,
    progress: Progress = silent,
) -> TrainOutcome:
    """Trains, gates and registers one challenger. One that passes is promoted, or nominated (the
    `challenger` alias) for interleaving with the champion on live traffic (`training.interleave`,
    decided by the scheduler) or awaiting `approve`, or only registered (a benchmark's side model).
    `depth` is the serving rerank depth: tuning and the gate rank exactly as serving will."""
    cfg, gate, rules = cfg or TrainConfig(), gate or GateConfig(), rules or LabelRules()
    df, lineage = labels.read()
    if df.empty:
        return TrainOutcome("skipped", "no labels yet")
    modes: list[Debias] = ["naive", "ips"] if cfg.debias == "auto" else [cfg.debias]
    per_mode = {m: make_slices(df, lineage, cfg.model_copy(update={"debias": m}), gate, rules, examination) for m in modes}
    slices = per_mode[modes[0]]
    log.info(
        "training on %d labels: %d train / %d tune / %d gate queries with positives",
        slices.labels,
        len(slices.train),
        len(slices.tune),
        len(slices.gate),
    )
    text = first_stage.text
    candidates = candidates_for(first_stage, slices.queries())
    incumbent = load_incumbent(registry, first_stage)
    examples, selection = choose_examples(slices, candidates, incumbent, cfg)
    if not examples:
        why = "no training query has a positive label yet"
        if selection.get("fresh_queries") == 0 and selection.get("older_queries"):
            why = "nothing new: no query has a positive label newer than the champion's training data"
        return TrainOutcome("skipped", why, labels=lineage.get("contributions", slices.labels))

    with (
        mlflow.start_run(run_name=f"challenger-{time.strftime('%Y%m%d-%H%M%S')}") as run,
        tempfile.TemporaryDirectory(dir=work_dir) as tmp,
    ):
        learners = [
            learn(m, per_mode[m], incumbent, candidates, first_stage, Path(tmp) / m, depth, cfg, gate.min_queries, progress)
            for m in modes
        ]
        yardstick = binary(per_mode[modes[0]].tune)
        for learner in learners:  # both modes judged on the same held-out clicks, weighted by neither
            rankings = rank_queries([fb.query for fb in yardstick], candidates, learner.reranker, text, depth)
            learner.held_out = float(np.mean(list(_feedback_ndcg(yardstick, rankings).values()) or [0.0]))
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
            examination is not None,
        )
        tracking.log_debias({c.mode: c.held_out for c in learners}, chosen.mode)
        mlflow.log_metrics({f"{k}_top10_identity_share": v for k, v in slices.top_identity_share.items()})
        mlflow.set_tag("champion_at_start", incumbent.version or FIRST_STAGE)
        tracking.log_fit(chosen.fitted.stats, chosen.fitted.seconds)
        tracking.log_tuning(chosen.mixes, len(slices.memory()))
        challenger = chosen.reranker
        report = run_gate(incumbent.reranker, challenger, slices, candidates, text, depth, gate)
        changes = tracking.log_gate(slices.gate, report, slices.rules)
        tracking.log_history(registry.client, registry.name, run.info.run_id, report.result)

        def card(outcome: str) -> str:
            return model_card(
                model_name=registry.name,
                outcome=outcome,
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
            )

        (folder / "README.md").write_text(card("passed the gate" if report.result.passed else "rejected by the gate"))
        tracking.write_mlmodel(folder)
        mlflow.log_artifacts(str(folder), "model")
        model_id = tracking.log_model_entity(run.info.run_id, registry.name, tuned.mix.as_dict(), report.result)
        version = registry.register(run.info.run_id, model_id=model_id)
        registry.tag(version, "gate", report.result.reason)

    result = report.result
    outcome = TrainOutcome(
        "passed" if result.passed else "rejected",
        result.reason,
        run.info.run_id,
        version,
        result,
        labels=lineage.get("contributions", slices.labels),
    )
    if result.passed and on_pass == "promote":
        outcome.event = registry.promote(version, result.reason, actor="scheduler")
        outcome.status = "promoted"
    elif result.passed and on_pass == "interleave":
        registry.nominate(version, result.reason, actor="scheduler")
        registry.tag(version, STAGE_TAG, INTERLEAVING)
        outcome.message += "; interleaving with the champion on live traffic before promotion"
    elif result.passed and on_pass == "nominate":
        registry.nominate(version, result.reason, actor="scheduler")
        outcome.message += f"; awaiting approval: `rankloop approve {version}`"
    registry.client.set_tag(run.info.run_id, "outcome", outcome.status)
    waiting = INTERLEAVING if on_pass == "interleave" else "awaiting approval"
    final = waiting if registry.challenger() == version and outcome.status == "passed" else outcome.status
    tracking.describe_version(
        registry.client, registry.name, version, run.info.run_id, final, result, card(f"v{version}, {final}")
    )
    log.info("%s version %s: %s", outcome.status, version, result.reason)
    return outcome
