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
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from training.dataset import normalise_query
from training.encoder import encode, load_encoder
from training.retrieval import Candidate, minmax

FIRST_STAGE = "first-stage"
PRIOR_FILE = "feedback_prior.json"
MEMORY_NEIGHBOURS = 10


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


@dataclass
class Features:
    """Per-candidate signals the final score mixes; computed once, combined under any weights."""

    doc_ids: list[str]
    similarity: np.ndarray  # fine-tuned bi-encoder, min-max scaled over the candidates
    first_stage: np.ndarray  # fused BM25 + dense, min-max scaled
    neighbours: np.ndarray  # past queries' similarity to this one, best first
    evidence: list[dict[str, float]]  # what users said for each of those past queries


class Reranker:
    """score = alpha * model similarity + (1 - alpha) * first-stage score + beta * tanh(feedback memory).

    The feedback memory is what users said about this query *and queries like it*: for the
    `MEMORY_NEIGHBOURS` most similar past queries q' (cosine s under this model), each doc gets
    w(s) * evidence(q', doc), with w(s) = max(0, (s - tau) / (1 - tau)); the exact same query has
    w = 1. Evidence is the signed, summed label weight per (query, doc) the version was trained on.
    Head queries repeat and related queries share answers (on SciFact two thirds of the test
    queries have a relevant document that is relevant to some train query), so remembering
    feedback is the first thing a loop should do; the bi-encoder carries what generalises beyond.
    """

    def __init__(self, folder: Path, version: str, cache: EmbeddingCache | None = None):
        self.folder = Path(folder)
        self.version = version
        self.meta = json.loads((self.folder / "rankloop.json").read_text())
        self.alpha = float(self.meta["alpha"])
        self.beta = float(self.meta.get("beta", 0.0))
        self.tau = float(self.meta.get("tau", 0.5))
        prior_path = self.folder / PRIOR_FILE
        self.prior: dict[str, dict[str, float]] = json.loads(prior_path.read_text()) if prior_path.exists() else {}
        self.model = load_encoder(self.folder)
        self.cache = cache or MemoryEmbeddingCache()
        self.memory_queries = list(self.prior)
        self.memory = encode(self.model, self.memory_queries)

    def doc_embeddings(self, doc_ids: list[str], text: Callable[[str], str]) -> np.ndarray:
        found = self.cache.get_many(self.version, doc_ids)
        missing = [d for d in doc_ids if d not in found]
        if missing:
            new = encode(self.model, [text(d) for d in missing])
            fresh = dict(zip(missing, new))
            self.cache.put_many(self.version, fresh)
            found.update(fresh)
        return np.stack([found[d] for d in doc_ids])

    def features(self, query: str, candidates: list[Candidate], text: Callable[[str], str]) -> Features:
        q = encode(self.model, [normalise_query(query)])[0]
        doc_ids = [c.doc_id for c in candidates]
        sims = self.doc_embeddings(doc_ids, text) @ q
        first = minmax(np.array([c.fused for c in candidates], dtype=np.float32))
        if len(self.memory_queries):
            near = self.memory @ q
            top = np.argsort(-near)[:MEMORY_NEIGHBOURS]
            neighbours, evidence = near[top], [self.prior[self.memory_queries[i]] for i in top]
        else:
            neighbours, evidence = np.zeros(0), []
        return Features(doc_ids, minmax(sims), first, neighbours, evidence)

    def combine(self, f: Features, alpha: float, beta: float, tau: float) -> np.ndarray:
        scores = alpha * f.similarity + (1 - alpha) * f.first_stage
        if beta:
            index = {d: i for i, d in enumerate(f.doc_ids)}
            memory = np.zeros(len(f.doc_ids))
            for s, said in zip(f.neighbours, f.evidence):
                w = max(0.0, (float(s) - tau) / (1 - tau))
                for d, v in said.items():
                    if w and d in index:
                        memory[index[d]] += w * v
            scores = scores + beta * np.tanh(memory)
        return scores

    def rerank(self, query: str, candidates: list[Candidate], text: Callable[[str], str]) -> list[tuple[str, float]]:
        """Candidates re-scored and sorted, best first."""
        if not candidates:
            return []
        f = self.features(query, candidates, text)
        return ranked(f, self.combine(f, self.alpha, self.beta, self.tau))


def ranked(f: Features, scores: np.ndarray) -> list[tuple[str, float]]:
    order = np.argsort(-scores, kind="stable")
    return [(f.doc_ids[i], float(scores[i])) for i in order]


def first_stage_order(candidates: list[Candidate]) -> list[tuple[str, float]]:
    return [(c.doc_id, c.fused) for c in candidates]


def save_model_folder(model, folder: Path, alpha: float, beta: float = 0.0, tau: float = 0.5,
                      prior: dict[str, dict[str, float]] | None = None, extra: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save(str(folder), safe_serialization=True)
    (folder / PRIOR_FILE).write_text(json.dumps(prior or {}))
    meta = {"kind": "bi-encoder", "alpha": alpha, "beta": beta, "tau": tau, **(extra or {})}
    (folder / "rankloop.json").write_text(json.dumps(meta, indent=2))
    return folder
