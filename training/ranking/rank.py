"""The one ranking function. Serving, tuning, the gate and every evaluation call `rank`, so what is
measured offline is exactly what users are shown."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from training.ranking.features import Features
from training.ranking.first_stage import Candidate, FirstStage, fuse
from training.ranking.reranker import Mix, Reranker

Ranking = list[tuple[str, float]]
"""(doc_id, score), best first."""
Text = Callable[[str], str]
"""doc_id -> the text the encoders see."""
Candidates = dict[str, list[Candidate]]
"""query -> its first-stage candidates, best first."""


def first_stage_order(candidates: list[Candidate]) -> Ranking:
    return [(c.doc_id, c.fused) for c in candidates]


def rank(
    query: str,
    candidates: list[Candidate],
    reranker: Reranker | None,
    text: Callable[[str], str],
    depth: int,
    mix: Mix | None = None,
    features: Features | None = None,
    query_embedding: np.ndarray | None = None,
) -> Ranking:
    """What a user is shown: the reranker's order of the top `depth` candidates, then the first-stage
    tail. `mix` overrides the model's own (tuning, design comparisons); `features` of the head, when
    already computed, are reused (tuning scores one set of features under many mixes), and so is the
    reranker's `query_embedding` (serving computes it alongside the first stage). Without `mix` the
    version scores with its learned combiner when it has one (under its mix's fusion), else picks a mix
    by the query's familiarity (`Reranker.mix_for`). A mix with its own fusion re-orders the candidates
    first, so it also picks which of them the reranker sees."""
    if reranker is None:
        return first_stage_order(candidates)
    combiner = reranker.combiner if mix is None else None
    if combiner is not None:
        mix = reranker.mix
    elif mix is None:
        query_embedding = query_embedding if query_embedding is not None else reranker.embed_query(query)
        mix = reranker.mix_for(query_embedding)
    if mix.bm25_weight is not None:
        candidates = fuse(candidates, mix.bm25_weight)
    head = features if features is not None else reranker.features(query, candidates[:depth], text, query_embedding)
    scores = combiner.score(head) if combiner is not None else Reranker.combine(head, mix)
    order = np.argsort(-scores, kind="stable")
    return [(head.doc_ids[i], float(scores[i])) for i in order] + first_stage_order(candidates[depth:])


def rank_queries(
    queries: Iterable[str],
    candidates: dict[str, list[Candidate]],
    reranker: Reranker | None,
    text: Callable[[str], str],
    depth: int,
    mix: Mix | None = None,
) -> dict[str, Ranking]:
    """`rank` for many queries whose candidates are already retrieved."""
    return {q: rank(q, candidates[q], reranker, text, depth, mix) for q in queries}


def candidates_for(first_stage: FirstStage, queries: list[str], k: int = 100, batch: int = 256) -> Candidates:
    """First-stage candidates of many queries, retrieved in batches."""
    out: dict[str, list[Candidate]] = {}
    uniq = list(dict.fromkeys(queries))
    for start in range(0, len(uniq), batch):
        chunk = uniq[start : start + batch]
        out.update(zip(chunk, first_stage.search_many(chunk, k)))
    return out
