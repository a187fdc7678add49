"""Tuning how a version scores on the tune slice: the first stage's fusion, then the weights of the
model similarity and the feedback memory, for familiar and for unfamiliar queries; then a learned
combiner that replaces those mixes when it does better on tune queries it did not learn from. Every
candidate ranks through `training.ranking.rank`, as serving will."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from training.labels.feedback import QueryFeedback
from training.metrics import feedback_ndcg
from training.ranking.combiner import FEATURES, MEMORY_FEATURES, Combiner, train_combiner
from training.ranking.features import Features
from training.ranking.first_stage import fuse
from training.ranking.query import normalise_query
from training.ranking.rank import Candidates, Ranking, Text, rank
from training.ranking.reranker import FAMILIAR_AT, Mix, Reranker

ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]  # weight of the model similarity vs the first-stage score
BETAS = [0.0, 0.25, 0.5, 1.0, 2.0]  # weight of the feedback memory
TAUS = [0.3, 0.5, 0.7]  # similarity below which a past query's feedback is not borrowed
FUSIONS = [None, 0.0, 0.25, 0.75, 1.0]  # the first stage's BM25 weight (None: the index's, 0.5 by default)
COMBINER_FOLDS = 3
COMBINER_MAX_TRAIN_QUERIES = 1000  # bounds the combiner's cost at any label count (a feature row per candidate)

FUSION_ONLY = "learned first stage (fusion only)"
NO_MEMORY = "bi-encoder + first stage (no memory)"
NO_BI_ENCODER = "first stage + feedback memory (no bi-encoder)"
PART_DESIGNS: dict[str, Callable[[Mix], bool]] = {  # a design of the comparison -> the mixes it may use
    FUSION_ONLY: lambda m: m.alpha == 0 and m.beta == 0,
    NO_MEMORY: lambda m: m.beta == 0,
    NO_BI_ENCODER: lambda m: m.alpha == 0,
}


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
    twinless_probes: int = 0  # of the probes offered, those without a fine-tuned twin (what the model is tuned on)

    def designs(self) -> dict[str, dict[str, Any]]:
        """Each design of `PART_DESIGNS` at its own best mixes in the grids already scored, for the design
        comparison (`training.evaluate.evaluate_designs`). A part switched off in the served mix is not
        that design at its best: tuned beside the memory, the bi-encoder's weight stayed 0.25 on familiar
        queries; tuned without it, 0.75, worth +0.019 NDCG@10 on SciFact test (seed 0, docs/ranking.md)."""

        def best(grid: dict[Mix, float], allowed: Callable[[Mix], bool]) -> Mix:
            return max((m for m in grid if allowed(m)), key=lambda m: grid[m])

        out = {}
        for name, allowed in PART_DESIGNS.items():
            other = best(self.unfamiliar_grid, allowed) if self.unfamiliar_grid else self.unfamiliar
            out[name] = {**best(self.familiar.grid, allowed).as_dict(), "unfamiliar": other.as_dict()}
        return out


def tune_mix(
    reranker: Reranker,
    feedback: list[QueryFeedback],
    candidates: Candidates,
    text: Text,
    depth: int,
    fusions: list[float | None] = FUSIONS,
    unseen: frozenset[str] = frozenset(),
    alphas: list[float] = ALPHAS,
    paraphrases: bool = False,
) -> Tuned:
    """Mean NDCG@10 on the tune slice for every mix, the first stage's fusion included (ties go to the
    first fusion listed); the head's features are computed once per query and fusion. `unseen` queries
    are ranked as if the feedback memory knew nothing near them (probe queries). With `paraphrases`,
    each remembered query also counts as its own paraphrase (`paraphrase_features`)."""
    grid: dict[Mix, float] = {}
    for fusion in fusions:
        heads = {fb.query: candidates[fb.query] if fusion is None else fuse(candidates[fb.query], fusion) for fb in feedback}
        feats = [(fb, reranker.features(fb.query, heads[fb.query][:depth], text, unseen=fb.query in unseen)) for fb in feedback]
        again = paraphrase_features(reranker, feedback, heads, text, depth) if paraphrases else {}
        for a, b, t in itertools.product(alphas, BETAS, TAUS):
            if b == 0 and t != TAUS[0]:
                continue  # tau only matters when the memory is used
            mix = Mix(a, b, t, fusion)
            rankings = {fb.query: rank(fb.query, candidates[fb.query], reranker, text, depth, mix, f) for fb, f in feats}
            reworded = {q: rank(q, candidates[q], reranker, text, depth, mix, f) for q, f in again.items()}
            grid[mix] = pooled_ndcg(feedback, rankings, reworded)
    return Tuned(max(grid, key=lambda m: grid[m]), grid)


def paraphrase_features(
    reranker: Reranker,
    feedback: list[QueryFeedback],
    heads: Candidates,
    text: Text,
    depth: int,
    embedded: dict[str, np.ndarray] | None = None,
    documents: list[str] | None = None,
) -> dict[str, Features]:
    """Remembered tune queries as if asked in other words: each one's head with its own feedback hidden
    from the memory (`leave_out`), for those a remembered twin within `FAMILIAR_AT` still serves as
    familiar. A familiar query is a repeat or a paraphrase; scored on repeats alone, where the query's
    own feedback answers at similarity 1, the memory's radius and weight come out too timid for
    paraphrases (SciFact seed 0: tau 0.7 -> 0.5, tuned mixes 0.7871 -> 0.7923 on test; docs/ranking.md)."""
    out = {}
    for fb in feedback:
        if normalise_query(fb.query) not in reranker.prior:
            continue
        q = embedded.get(fb.query) if embedded else None
        f = reranker.features(fb.query, heads[fb.query][:depth], text, q, leave_out=True, documents=documents)
        if len(f.neighbours) and f.neighbours[0] >= FAMILIAR_AT:
            out[fb.query] = f
    return out


def pooled_ndcg(feedback: list[QueryFeedback], asked: dict[str, Ranking], reworded: dict[str, Ranking]) -> float:
    """Mean NDCG@10 over the queries as asked and, pooled with them, their paraphrases' rankings."""
    scores = list(feedback_ndcg(feedback, asked).values())
    scores += list(feedback_ndcg([fb for fb in feedback if fb.query in reworded], reworded).values())
    return float(np.mean(scores or [0.0]))


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
        scores[fusion] = float(np.mean(list(feedback_ndcg(feedback, rankings).values()) or [0.0]))
    return max(scores, key=lambda f: scores[f])


SAFE_MIX = Mix(0.0)  # the first stage alone: what a query no feedback resembles gets (under the learned fusion)
TWIN_SEARCH = 50  # remembered queries looked at for a probe's twins


def without_twins(reranker: Reranker, probe: list[QueryFeedback]) -> list[QueryFeedback]:
    """The probes no other remembered query is within `FAMILIAR_AT` of, save other probes. A probe
    with a twin the model was fine-tuned on (a paraphrase, a negated claim) is familiar to the model,
    though not to its memory (`unseen` hides the twins from that): tuned on every probe, SciFact's
    unfamiliar mix trusted the model (alpha 0.75) and lost 0.026 NDCG@10 on the test queries far from
    every train query (docs/ranking.md)."""
    held = {normalise_query(fb.query) for fb in probe}
    kept = []
    for fb in probe:
        sims, pos = reranker.memory.nearest(reranker.embed_query(fb.query), TWIN_SEARCH)
        twins = [reranker.memory_queries[i] for s, i in zip(sims, pos) if s >= FAMILIAR_AT]
        if len(twins) < TWIN_SEARCH and all(t in held for t in twins):
            kept.append(fb)
    return kept


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
    queries (`FAMILIAR_AT`; each as asked and as its own paraphrase) and one on its unfamiliar ones,
    joined by the `probe` queries (train queries the model was not fine-tuned on, ranked as if the
    memory knew nothing near them) when too few. The
    memory's weight can be tuned on any probe; the model's only on probes without a fine-tuned twin
    (`without_twins`): with fewer than `min_queries` of those, the unfamiliar mix does without the model.
    With fewer than `min_queries` of both (a few head queries make all the traffic) nothing says how the
    model does away from them, and unfamiliar queries get the first stage alone (`SAFE_MIX`): under the
    learned fusion when `min_queries` tune queries taught it, else under the index's (a fusion learned
    on 20 head queries cost the 300 SciFact test queries no user asked 0.0295 NDCG@10)."""
    fusion = tune_fusion(reranker, feedback, candidates, text, depth)
    near = {fb.query: reranker.familiarity(reranker.embed_query(fb.query)) >= FAMILIAR_AT for fb in feedback}
    familiar = [fb for fb in feedback if near[fb.query]]
    unfamiliar = [fb for fb in feedback if not near[fb.query]]
    probe = (probe or []) if len(unfamiliar) < min_queries else []
    twinless = without_twins(reranker, probe)
    model_measured = len(unfamiliar) + len(twinless) >= min_queries
    if model_measured:
        probe = twinless
    pool, unseen = unfamiliar + probe, frozenset(fb.query for fb in probe)
    alphas = ALPHAS if model_measured else [0.0]
    tuned = tune_mix(reranker, familiar or feedback, candidates, text, depth, [fusion], paraphrases=True)
    other = tune_mix(reranker, pool, candidates, text, depth, [fusion], unseen, alphas) if len(pool) >= min_queries else None
    return TunedMixes(
        tuned,
        other.mix if other else replace(SAFE_MIX, bm25_weight=fusion if len(feedback) >= min_queries else None),
        other.grid if other else {},
        len(familiar),
        len(unfamiliar),
        len(probe),
        len(twinless),
    )


@dataclass(frozen=True)
class CombinerChoice:
    """The learned combiner against the tuned mixes on the tune slice, and which one the version keeps."""

    combiner: Combiner | None  # None: too few tune queries to learn from
    without_memory: Combiner | None  # the learned parts without the feedback memory (design comparison)
    held_out_ndcg: float | None  # the combiner's mean NDCG@10 on tune queries it was not trained on (k-fold)
    mix_ndcg: float  # the tuned mixes', on the same queries (tuned on them: a bar the combiner must clear)
    queries: int

    @property
    def kept(self) -> bool:
        return self.held_out_ndcg is not None and self.held_out_ndcg > self.mix_ndcg

    def summary(self) -> dict[str, Any]:
        """What the model card says of it."""
        importance = self.combiner.importance() if self.combiner else {}
        top = dict(sorted(importance.items(), key=lambda kv: -kv[1])[:4])
        return {"kept": self.kept, "held_out": self.held_out_ndcg, "mix": self.mix_ndcg, "importance": top}


def learn_combiner(
    reranker: Reranker,
    tune: list[QueryFeedback],
    train: list[QueryFeedback],
    candidates: Candidates,
    text: Text,
    depth: int,
    min_queries: int,
    seed: int,
) -> CombinerChoice:
    """Trains a LightGBM lambdarank combiner (`training.ranking.combiner`) on the train slice's queries
    (up to `COMBINER_MAX_TRAIN_QUERIES`, each as if the feedback memory did not hold it) and the tune
    slice's; the fine-tuned similarity's weight beside it is chosen on held-out tune queries only. It
    is kept when its k-fold held-out NDCG@10 on the tune slice beats what the tuned mixes score on
    those very queries. Features come from `reranker` (its feedback memory is the train slice; the
    corpus's document features when its index offers any), ranked
    under the familiar mix's fusion, exactly as `rank` will serve them."""
    served = {fb.query: rank(fb.query, candidates[fb.query], reranker, text, depth) for fb in tune}
    if len(tune) < min_queries:
        return CombinerChoice(None, None, None, pooled_ndcg(tune, served, {}), len(tune))
    fusion = reranker.mix.bm25_weight
    heads = {fb.query: candidates[fb.query] if fusion is None else fuse(candidates[fb.query], fusion) for fb in tune}
    rng = np.random.default_rng(seed)
    learned = [fb for fb in train if fb.positives()]
    learned = [learned[int(i)] for i in sorted(rng.permutation(len(learned))[:COMBINER_MAX_TRAIN_QUERIES])]
    for fb in learned:
        heads[fb.query] = candidates[fb.query] if fusion is None else fuse(candidates[fb.query], fusion)
    embedded = dict(zip(heads, reranker.embed_queries(list(heads))))

    documents = reranker.index.document_features() if reranker.index is not None else []

    def group(fb: QueryFeedback, leave_out: bool) -> tuple[Features, dict[str, int]]:
        head = heads[fb.query][:depth]
        f = reranker.features(fb.query, head, text, embedded[fb.query], leave_out=leave_out, documents=documents)
        return f, fb.qrels()

    groups = [group(fb, False) for fb in tune]
    base = [group(fb, True) for fb in learned]
    # the tune queries as their own paraphrases too, as the mixes were tuned (`paraphrase_features`)
    again = paraphrase_features(reranker, tune, heads, text, depth, embedded, documents)
    reworded = {q: rank(q, candidates[q], reranker, text, depth, features=f) for q, f in again.items()}
    mix_ndcg = pooled_ndcg(tune, served, reworded)
    order = rng.permutation(len(tune))
    folds = [{int(i) for i in order[k::COMBINER_FOLDS]} for k in range(COMBINER_FOLDS)]

    def cross_validated(names: list[str]) -> tuple[Combiner, float]:
        """The combiner on every query, with the similarity weight whose k-fold held-out NDCG@10 on
        the tune slice was best, and that figure."""
        held_out: dict[float, dict[str, Ranking]] = {w: {} for w in ALPHAS}
        held_out_reworded: dict[float, dict[str, Ranking]] = {w: {} for w in ALPHAS}
        for test in folds:
            fold = train_combiner(base + [g for i, g in enumerate(groups) if i not in test], names, seed)
            for w in ALPHAS:
                scored = reranker.with_combiner(fold.with_similarity(w))
                for i in test:
                    fb, (f, _) = tune[i], groups[i]
                    held_out[w][fb.query] = rank(fb.query, candidates[fb.query], scored, text, depth, features=f)
                    if fb.query in again:
                        ranked = rank(fb.query, candidates[fb.query], scored, text, depth, features=again[fb.query])
                        held_out_reworded[w][fb.query] = ranked
        cv = {w: pooled_ndcg(tune, held_out[w], held_out_reworded[w]) for w in ALPHAS}
        best = max(cv, key=lambda w: cv[w])
        return train_combiner(base + groups, names, seed).with_similarity(best), cv[best]

    names = list(FEATURES) + documents
    combiner, cv = cross_validated(names)
    without_memory, _ = cross_validated([n for n in names if n not in MEMORY_FEATURES])
    return CombinerChoice(combiner, without_memory, cv, mix_ndcg, len(tune))
