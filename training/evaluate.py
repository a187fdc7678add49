"""Evaluation on judged queries, through the same ranking code serving uses."""

from __future__ import annotations

import numpy as np

from training.beir import Dataset
from training.metrics import mean_metrics, ranking_to_run
from training.reranker import Reranker
from training.retrieval import Candidate, minmax
from training.train import rank_queries


def evaluate_ranker(ds: Dataset, split: str, candidates: dict[str, list[Candidate]], reranker: Reranker | None,
                    text, depth: int) -> dict[str, float]:
    """Metrics of the served ranking (first stage, or reranked) on a split's qrels."""
    qrels = ds.qrels(split)
    queries = [ds.queries[q] for q in qrels]
    ranking = rank_queries(queries, candidates, reranker, text, depth)
    return mean_metrics(qrels, ranking_to_run({qid: ranking[ds.queries[qid]] for qid in qrels}))


def evaluate_first_stage_parts(ds: Dataset, split: str, candidates: dict[str, list[Candidate]]) -> dict[str, dict]:
    """BM25 alone, dense alone and the fused hybrid, re-ranking the same candidate sets."""
    qrels = ds.qrels(split)
    out = {}
    for name, score in (("bm25", lambda c: c.bm25), ("dense", lambda c: c.dense), ("hybrid", lambda c: c.fused)):
        run = {}
        for qid in qrels:
            cands = candidates[ds.queries[qid]]
            s = minmax(np.array([score(c) for c in cands], dtype=np.float32))
            order = np.argsort(-s, kind="stable")
            run[qid] = [(cands[i].doc_id, float(s[i])) for i in order]
        out[name] = mean_metrics(qrels, ranking_to_run(run))
    return out


DESIGNS = {  # (alpha, beta, tau) as served -> the weights of each design
    "bi-encoder + first stage (no memory)": lambda a, b, t: (a if a > 0 else 0.5, 0.0, t),
    "first stage + feedback memory (no bi-encoder)": lambda a, b, t: (0.0, b if b > 0 else 0.5, t),
    "served: bi-encoder + first stage + feedback memory": lambda a, b, t: (a, b, t),
}


def evaluate_designs(ds: Dataset, split: str, candidates: dict[str, list[Candidate]], reranker: Reranker,
                     text, depth: int) -> dict[str, dict]:
    """The served model against its own parts: where does the lift come from?"""
    served = (reranker.alpha, reranker.beta, reranker.tau)
    out = {}
    try:
        for name, weights in DESIGNS.items():
            reranker.alpha, reranker.beta, reranker.tau = weights(*served)
            out[name] = {"weights": dict(zip(("alpha", "beta", "tau"), weights(*served))),
                         **evaluate_ranker(ds, split, candidates, reranker, text, depth)}
    finally:
        reranker.alpha, reranker.beta, reranker.tau = served
    return out
