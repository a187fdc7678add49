"""The reranker: a fine-tuned bi-encoder whose similarity is mixed with the first-stage score.

Why a bi-encoder and not a cross-encoder (docs/ranking.md): the only offline checkpoint is
all-MiniLM-L6-v2, a bi-encoder; a cross-encoder built on it starts from a random head and, measured
here, stays below the hybrid first stage, while a bi-encoder fine-tuned with in-batch negatives lifts
it. Document embeddings per model version are cacheable (Redis in serving), so reranking costs one
query encoding plus lookups, and a promotion never forces a full re-embedding of the corpus.

A model is a folder: the sentence-transformers save (safetensors + config) plus `rankloop.json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from training.dataset import normalise_query
from training.encoder import encode, load_encoder
from training.retrieval import Candidate, minmax

FIRST_STAGE = "first-stage"
PRIOR_FILE = "feedback_prior.json"


class EmbeddingCache(Protocol):
    def get_many(self, version: str, doc_ids: list[str]) -> dict[str, np.ndarray]: ...
    def put_many(self, version: str, vectors: dict[str, np.ndarray]) -> None: ...


class MemoryEmbeddingCache:
    """Process-local cache; serving uses the Redis one so replicas share work."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], np.ndarray] = {}

    def get_many(self, version, doc_ids):
        return {d: self.store[(version, d)] for d in doc_ids if (version, d) in self.store}

    def put_many(self, version, vectors):
        for d, v in vectors.items():
            self.store[(version, d)] = v


class Reranker:
    """score = alpha * model similarity + (1 - alpha) * first-stage score + beta * feedback prior.

    The feedback prior is what users already said about this exact (normalised) query:
    tanh of the summed signed label weights per doc, from the labels the version was trained on.
    Head queries repeat; learning from their clicks is the first thing a feedback loop should do.
    The bi-encoder carries what generalises to queries never seen.
    """

    def __init__(self, folder: Path, version: str, cache: EmbeddingCache | None = None):
        self.folder = Path(folder)
        self.version = version
        self.meta = json.loads((self.folder / "rankloop.json").read_text())
        self.alpha = float(self.meta["alpha"])
        self.beta = float(self.meta.get("beta", 0.0))
        prior_path = self.folder / PRIOR_FILE
        self.prior: dict[str, dict[str, float]] = json.loads(prior_path.read_text()) if prior_path.exists() else {}
        self.model = load_encoder(self.folder)
        self.cache = cache or MemoryEmbeddingCache()

    def doc_embeddings(self, doc_ids: list[str], text: Callable[[str], str]) -> np.ndarray:
        found = self.cache.get_many(self.version, doc_ids)
        missing = [d for d in doc_ids if d not in found]
        if missing:
            new = encode(self.model, [text(d) for d in missing])
            fresh = dict(zip(missing, new))
            self.cache.put_many(self.version, fresh)
            found.update(fresh)
        return np.stack([found[d] for d in doc_ids])

    def rerank(self, query: str, candidates: list[Candidate], text: Callable[[str], str]) -> list[tuple[str, float]]:
        """Candidates re-scored as alpha * model similarity + (1 - alpha) * first-stage score, best first."""
        if not candidates:
            return []
        q = encode(self.model, [query])[0]
        sims = self.doc_embeddings([c.doc_id for c in candidates], text) @ q
        first = minmax(np.array([c.fused for c in candidates], dtype=np.float32))
        scores = self.alpha * minmax(sims) + (1 - self.alpha) * first
        known = self.prior.get(normalise_query(query)) if self.beta else None
        if known:
            scores = scores + self.beta * np.tanh(np.array([known.get(c.doc_id, 0.0) for c in candidates]))
        order = np.argsort(-scores, kind="stable")
        return [(candidates[i].doc_id, float(scores[i])) for i in order]


def first_stage_order(candidates: list[Candidate]) -> list[tuple[str, float]]:
    return [(c.doc_id, c.fused) for c in candidates]


def save_model_folder(model, folder: Path, alpha: float, beta: float = 0.0,
                      prior: dict[str, dict[str, float]] | None = None, extra: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save(str(folder), safe_serialization=True)
    (folder / PRIOR_FILE).write_text(json.dumps(prior or {}))
    meta = {"kind": "bi-encoder", "alpha": alpha, "beta": beta, **(extra or {})}
    (folder / "rankloop.json").write_text(json.dumps(meta, indent=2))
    return folder
