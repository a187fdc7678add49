"""Evaluation on judged queries, through `training.ranking.rank`, the function serving calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from training.beir import Dataset
from training.metrics import mean_metrics, ranking_to_run
from training.ranking.first_stage import Candidate, minmax
from training.ranking.rank import rank_queries
from training.ranking.reranker import Mix, Reranker


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
    "served: bi-encoder + first stage + feedback memory": lambda m: m,
}


def evaluate_designs(
    ds: Dataset, split: str, candidates: dict[str, list[Candidate]], reranker: Reranker, text: Callable[[str], str], depth: int
) -> dict[str, dict]:
    """The served model against its own parts: where does the lift come from? A part the served
    model switched off is evaluated at weight 0.5; each design applies to the familiar and the
    unfamiliar mix alike and routes queries as serving does; the weights used are recorded."""
    out = {}
    for name, design in DESIGNS.items():
        familiar = design(reranker.mix)
        unfamiliar = design(reranker.unfamiliar_mix) if reranker.unfamiliar_mix else None
        variant = reranker.with_mix(familiar, unfamiliar)
        weights = {**familiar.as_dict(), "unfamiliar": unfamiliar.as_dict() if unfamiliar else None}
        out[name] = {"weights": weights, **evaluate_ranker(ds, split, candidates, variant, text, depth)}
    return out
