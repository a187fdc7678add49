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
from training.ranking.reranker import FAMILIAR_AT, Mix, Reranker


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


DESIGNS: dict[str, Callable[[Mix], Mix]] = {  # a served mix -> the mix of each design
    "learned first stage (fusion only)": lambda m: replace(m, alpha=0.0, beta=0.0),
    "bi-encoder + first stage (no memory)": lambda m: replace(m, alpha=m.alpha if m.alpha > 0 else 0.5, beta=0.0),
    "first stage + feedback memory (no bi-encoder)": lambda m: replace(m, alpha=0.0, beta=m.beta if m.beta > 0 else 0.5),
    "bi-encoder + first stage + feedback memory (tuned mix)": lambda m: m,
}
COMBINER_DESIGNS = {  # design -> trained with the feedback memory's features
    "learned combiner (no memory)": False,
    "learned combiner": True,
}


def evaluate_designs(
    ds: Dataset, split: str, candidates: dict[str, list[Candidate]], reranker: Reranker, text: Callable[[str], str], depth: int
) -> dict[str, dict]:
    """The served model against its own parts: where does the lift come from? A part the served
    model switched off is evaluated at weight 0.5; each mix design applies to the familiar and the
    unfamiliar mix alike and routes queries as serving does; the weights used are recorded. The learned
    combiners trained with the version (with and without the feedback memory) are rated too, kept or
    not. Each design also reports its NDCG@10 on the split's unfamiliar queries: those no query with
    feedback is within `FAMILIAR_AT` of, where only what generalises can help."""
    qrels = ds.qrels(split)
    queries = {qid: ds.queries[qid] for qid in qrels}
    unfamiliar = {qid for qid, q in queries.items() if reranker.familiarity(reranker.embed_query(q)) < FAMILIAR_AT}
    variants: dict[str, tuple[Reranker, dict[str, Any]]] = {}
    for name, design in DESIGNS.items():
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
