"""The feedback memory: what users said about past queries, found by the similarity of a new query.

Bounded twice (docs/scale.md): a version keeps at most `train.memory_max_queries` queries (those
with the most evidence, `prune`), and a lookup is a faiss search, exact below `ANN_FROM` queries and
IVF above it, saved with the version and read memory-mapped, so a lookup costs about the same at
a thousand or a million remembered queries.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from training.corpus.dense import choose_nprobe

Evidence = dict[str, float]
"""doc_id -> signed, summed label weight users gave it for one query."""

ANN_FROM = 50_000
INDEX_FILE = "memory.faiss"


def prune(memory: dict[str, Evidence], cap: int) -> dict[str, Evidence]:
    """The `cap` queries with the most evidence (absolute, summed), in their original order."""
    if len(memory) <= cap:
        return memory
    weight = {q: sum(abs(v) for v in said.values()) for q, said in memory.items()}
    keep = set(sorted(memory, key=lambda q: -weight[q])[:cap])
    return {q: said for q, said in memory.items() if q in keep}


def build_index(embeddings: np.ndarray) -> faiss.Index:
    """Exact for a small memory; IVF with nprobe chosen for recall@10 >= 0.95 on its own queries."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim = x.shape[1] if x.ndim == 2 and x.shape[1] else 384
    if len(x) < ANN_FROM:
        index = faiss.IndexFlatIP(dim)
        if len(x):
            index.add(x)
        return index
    nlist = int(2 * np.sqrt(len(x)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(0)
    ivf.train(x[rng.choice(len(x), min(len(x), 50 * nlist), replace=False)])
    ivf.add(x)
    sample = x[rng.choice(len(x), 200, replace=False)]
    queries = sample + rng.normal(0, 0.07, sample.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = [np.argsort(-(x @ q))[:10] for q in queries]
    ivf.nprobe = choose_nprobe(ivf, queries, truth, 0.95)[0]
    return ivf


class FeedbackMemory:
    """Past queries (embedded by the version's model) and what users said about each."""

    def __init__(self, queries: list[str], evidence: list[Evidence], embeddings: np.ndarray, index: faiss.Index):
        self.queries, self.evidence, self.embeddings, self.index = queries, evidence, embeddings, index

    @classmethod
    def load(cls, folder: Path, prior: dict[str, Evidence], embeddings: np.ndarray) -> FeedbackMemory:
        path = folder / INDEX_FILE
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC) if path.exists() else None
        if index is None or index.ntotal != len(prior):
            index = build_index(embeddings)
        return cls(list(prior), list(prior.values()), embeddings, index)

    def __len__(self) -> int:
        return len(self.queries)

    def nearest(self, query_embedding: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, positions) of the `k` most similar remembered queries, best first."""
        if not self.queries:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        sims, pos = self.index.search(np.asarray(query_embedding, dtype=np.float32)[None, :], min(k, len(self.queries)))
        keep = pos[0] >= 0
        return sims[0][keep], pos[0][keep]

    def familiarity(self, query_embedding: np.ndarray) -> float:
        """Cosine to the nearest remembered query (0 without one)."""
        sims, _ = self.nearest(query_embedding, 1)
        return float(sims[0]) if len(sims) else 0.0
