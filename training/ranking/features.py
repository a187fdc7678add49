"""Per-candidate signals a version scores with (`Reranker.features` computes them once per request;
a `Mix` or the learned `Combiner` turns them into scores)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.ranking.feedback_memory import Evidence


@dataclass
class Features:
    """Per-candidate signals the final score mixes; computed once, combined under any mix."""

    doc_ids: list[str]
    similarity: np.ndarray  # fine-tuned bi-encoder, min-max scaled over the candidates
    first_stage: np.ndarray  # fused BM25 + dense, min-max scaled
    neighbours: np.ndarray  # past queries' similarity to this one, best first
    evidence: list[Evidence]  # what users said for each of those past queries
    bm25: np.ndarray  # the first stage's parts, min-max scaled
    dense: np.ndarray
    dense_cosine: np.ndarray  # the base encoder's cosine, as retrieved
    document_prior: np.ndarray  # each document's summed feedback over every remembered query


def memory_scores(f: Features, tau: float) -> np.ndarray:
    """Per candidate: sum over the remembered neighbours q' of w(s) * evidence(q', doc), with
    w(s) = max(0, (s - tau) / (1 - tau)) (the same query has w = 1)."""
    index = {d: i for i, d in enumerate(f.doc_ids)}
    out = np.zeros(len(f.doc_ids))
    for s, said in zip(f.neighbours, f.evidence):
        w = max(0.0, (float(s) - tau) / (1 - tau))
        if w:
            for d, v in said.items():
                if d in index:
                    out[index[d]] += w * v
    return out
