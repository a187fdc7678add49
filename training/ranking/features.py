"""Per-candidate signals a version scores with (`Reranker.features` computes them once per request;
a `Mix` or the learned `Combiner` turns them into scores)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    documents: dict[str, np.ndarray] = field(default_factory=dict)  # what the corpus says: `document_feature_names`


FIELD_FEATURE = "field_"  # + a declared number field of the corpus: its value per document, NaN when unset
AGE_FEATURE = "age_days"  # days since the document's `updated_at` (as the application sent it), NaN when unset


def document_feature_names(declared_numbers: list[str], has_ages: bool) -> list[str]:
    """The document features a corpus offers: each declared number field, and the age when documents
    carry `updated_at`."""
    return [FIELD_FEATURE + n for n in sorted(declared_numbers)] + ([AGE_FEATURE] if has_ages else [])


def document_columns(
    doc_ids: list[str], found: dict[str, tuple[dict, float | None]], names: list[str], now: float
) -> dict[str, np.ndarray]:
    """`found` (doc -> its fields and `updated_at`) as one column per feature name; NaN where a
    document has no number there (LightGBM learns where missing values go)."""

    def value(doc: tuple[dict, float | None] | None, name: str) -> float:
        if doc is None:
            return np.nan
        fields, updated_at = doc
        if name == AGE_FEATURE:
            return (now - updated_at) / 86400 if updated_at is not None else np.nan
        number = fields.get(name.removeprefix(FIELD_FEATURE))
        return float(number) if isinstance(number, (int, float)) and not isinstance(number, bool) else np.nan

    return {n: np.array([value(found.get(d), n) for d in doc_ids], dtype=np.float64) for n in names}


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
