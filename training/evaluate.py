"""Evaluation on judged queries, through `training.ranking.rank`, the function serving calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from training.beir import Dataset
from training.metrics import mean_metrics, ranking_to_run
from training.ranking.first_stage import Candidate, minmax
from training.ranking.rank import rank_queries
from training.ranking.reranker import FAMILIAR_AT, Mix, Reranker, mix_from
from training.tuning import FUSION_ONLY, NO_BI_ENCODER, NO_MEMORY


def evaluate_ranker(
    ds: Dataset,
    split: str,
    candidates: dict[str, list[Candidate]],
    reranker: Reranker | None,
    text: Callable[[str], str],
    depth: int,
    mix: Mix | None = None,
) -> dict[str, float]:
    """Metrics of the served ranking (first stage, or reranked) on a split's qrels."""
    qrels = ds.qrels(split)
    ranking = rank_queries([ds.queries[q] for q in qrels], candidates, reranker, text, depth, mix)
    return mean_metrics(qrels, ranking_to_run({qid: ranking[ds.queries[qid]] for qid in qrels}))


def evaluate_first_stage_parts(ds: Dataset, split: str, candidates: dict[str, list[Candidate]]) -> dict[str, dict[str, float]]:
    """BM25 alone, dense alone and the fused hybrid, re-ranking the same candidate sets."""
    qrels = ds.qrels(split)
    parts: dict[str, Callable[[Candidate], float]] = {
        "bm25": lambda c: c.bm25,
        "dense": lambda c: c.dense,
        "hybrid": lambda c: c.fused,
    }
    out = {}
    for name, score in parts.items():
        run = {}
        for qid in qrels:
            cands = candidates[ds.queries[qid]]
            s = minmax(np.array([score(c) for c in cands], dtype=np.float32))
            order = np.argsort(-s, kind="stable")
            run[qid] = [(cands[i].doc_id, float(s[i])) for i in order]
        out[name] = mean_metrics(qrels, ranking_to_run(run))
    return out


DESIGNS: dict[str, Callable[[Mix], Mix]] = {  # a served mix -> each design's, for a version without its own
    FUSION_ONLY: lambda m: replace(m, alpha=0.0, beta=0.0),
    NO_MEMORY: lambda m: replace(m, alpha=m.alpha if m.alpha > 0 else 0.5, beta=0.0),
    NO_BI_ENCODER: lambda m: replace(m, alpha=0.0, beta=m.beta if m.beta > 0 else 0.5),
    "bi-encoder + first stage + feedback memory (tuned mix)": lambda m: m,
}
COMBINER_DESIGNS = {  # design -> trained with the feedback memory's features
    "learned combiner (no memory)": False,
    "learned combiner": True,
}


def evaluate_designs(
    ds: Dataset, split: str, candidates: dict[str, list[Candidate]], reranker: Reranker, text: Callable[[str], str], depth: int
) -> dict[str, dict]:
    """The served model against its own parts: where does the lift come from? Each part design is
    rated at the mixes tuned for it on the version's tune slice (`TunedMixes.designs`, in the version's
    meta); a version without them (written by hand, or before) gets its served mixes with the part
    switched off, at weight 0.5 where the served mix had none. Every mix design routes queries to a
    familiar and an unfamiliar mix as serving does; the weights used are recorded. The learned
    combiners trained with the version (with and without the feedback memory) are rated too, kept or
    not. Each design also reports its NDCG@10 on the split's unfamiliar queries: those no query with
    feedback is within `FAMILIAR_AT` of, where only what generalises can help."""
    qrels = ds.qrels(split)
    queries = {qid: ds.queries[qid] for qid in qrels}
    unfamiliar = {qid for qid, q in queries.items() if reranker.familiarity(reranker.embed_query(q)) < FAMILIAR_AT}
    variants: dict[str, tuple[Reranker, dict[str, Any]]] = {}
    tuned = reranker.meta.get("designs", {})
    for name, design in DESIGNS.items():
        other: Mix | None
        if name in tuned:
            familiar, other = mix_from(tuned[name]), mix_from(tuned[name]["unfamiliar"])
        else:
            familiar = design(reranker.mix)
            other = design(reranker.unfamiliar_mix) if reranker.unfamiliar_mix else None
        weights: dict[str, Any] = {**familiar.as_dict(), "unfamiliar": other.as_dict() if other else None}
        variants[name] = (reranker.with_mix(familiar, other), weights)
    for name, memory in COMBINER_DESIGNS.items():
        combiner = reranker.stored_combiner(memory)
        if combiner is not None:
            variants[name] = (reranker.with_combiner(combiner), {"importance": combiner.importance()})
    variants["served"] = (reranker, {"scorer": "combiner" if reranker.combiner else "mix"})
    out = {}
    for name, (variant, weights) in variants.items():
        ranking = rank_queries(list(queries.values()), candidates, variant, text, depth)
        run = ranking_to_run({qid: ranking[q] for qid, q in queries.items()})
        rest = mean_metrics({q: qrels[q] for q in unfamiliar}, run)["ndcg@10"] if unfamiliar else None
        out[name] = {"weights": weights, **mean_metrics(qrels, run), "ndcg@10 unfamiliar": rest}
        out[name]["unfamiliar_queries"] = len(unfamiliar)
    return out
