"""IR metrics through ranx (a well-kept, numba-backed implementation), per query and mean; tuning's
inner loop scores NDCG@10 directly (`feedback_ndcg`), checked against ranx in the unit tests."""

from __future__ import annotations

import math

from ranx import Qrels, Run, evaluate

from training.labels.feedback import QueryFeedback
from training.ranking.query import query_key

METRICS = ["ndcg@10", "mrr@10", "precision@1", "hit_rate@3", "recall@100"]
NAMES = {"precision@1": "accuracy@1", "hit_rate@3": "accuracy@3"}  # single-relevant-doc reading


def _prepare(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]):
    qrels = {q: d for q, d in qrels.items() if d}
    run = {q: (run.get(q) or {"__none__": 0.0}) for q in qrels}
    return Qrels(qrels), Run(run)


def mean_metrics(qrels, run, metrics=METRICS) -> dict[str, float]:
    """Mean over the queries of `qrels`; a query the run misses scores 0."""
    if not any(qrels.values()):
        return {NAMES.get(m, m): 0.0 for m in metrics}
    q, r = _prepare(qrels, run)
    res = evaluate(q, r, list(metrics), make_comparable=True)
    scores: dict[str, float] = res if isinstance(res, dict) else {metrics[0]: res}
    return {NAMES.get(m, m): round(float(v), 4) for m, v in scores.items()}


def per_query(qrels, run, metric: str = "ndcg@10") -> dict[str, float]:
    q, r = _prepare(qrels, run)
    evaluate(q, r, metric, make_comparable=True)
    return {qid: float(v) for qid, v in r.scores[metric].items()}


def ranking_to_run(rankings: dict[str, list[tuple[str, float]]]) -> dict[str, dict[str, float]]:
    """Ranked (doc, score) lists to a ranx run; scores made strictly decreasing so ties keep rank order."""
    run = {}
    for qid, items in rankings.items():
        n = len(items)
        run[qid] = {doc: float(n - i) for i, (doc, _) in enumerate(items)}
    return run


def ndcg_at(qrels: dict[str, int], ranked: list[str], k: int = 10) -> float:
    """NDCG@k as ranx computes it (gain = grade, discount log2(rank + 1)), for one ranked list."""
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    best = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    if best == 0:
        return 0.0
    top = list(dict.fromkeys(ranked))[:k]
    return sum(qrels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top) if qrels.get(d, 0) > 0) / best


def feedback_ndcg(feedback: list[QueryFeedback], rankings: dict[str, list[tuple[str, float]]]) -> dict[str, float]:
    """Per-query NDCG@10 of `rankings` (query -> ranked (doc, score)) against what users said (tuning and
    the gate). Computed here, not through ranx: tuning scores ~100k rankings a training, and building
    ranx's typed dictionaries per call took 52 s of a 254 s training at 45k labels."""
    ranked = {query_key(q): [d for d, _ in r] for q, r in rankings.items()}
    scores = {}
    for fb in feedback:
        key, qrels = query_key(fb.query), fb.qrels()
        if any(g > 0 for g in qrels.values()):
            scores[key] = ndcg_at(qrels, ranked.get(key, []))
    return scores
