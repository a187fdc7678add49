"""First stage at query time: BM25 (tantivy) + dense all-MiniLM-L6-v2 vectors (faiss, with ids),
fused per query, over the living corpus (`training.corpus`).

An index is a folder `<state>/index/`: the document store, the BM25 segments and the self-check.
`refresh` catches this process up with the store: BM25 by reloading the reader at the indexer's last
commit, the vectors by moving to the indexer's newest snapshot and applying the changes after it
(`training.corpus.dense`). Vectors of candidates are read from the store, so nothing per document
is held by a process beyond what faiss maps. `version` names the generation
served (`<corpus id>.<change number>`), so caches keyed by it never answer from an older corpus.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from schemas import FIRST_STAGE, NotFound
from schemas.documents import Condition, FieldType
from training.corpus.bm25 import Bm25Index
from training.corpus.dense import DenseVectors
from training.corpus.store import DIM, DocumentStore, StoredDocument, content_key
from training.ranking.embedding_cache import EmbeddingCache
from training.ranking.encoder import base_model_path, encode, load_encoder
from training.ranking.features import document_columns, document_feature_names

STORE_FILE, BM25_FOLDER = "documents.sqlite", "bm25"
BM25_WEIGHT = 0.5  # chosen on SciFact *train* queries: 0.0->0.660, 0.3->0.716, 0.5->0.731, 1.0->0.699


@dataclass
class Candidate:
    doc_id: str
    bm25: float
    dense: float
    fused: float


def minmax(x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return x
    lo, hi = float(x.min()), float(x.max())
    return np.zeros_like(x) if hi - lo < 1e-12 else (x - lo) / (hi - lo)


def fuse(candidates: list[Candidate], bm25_weight: float) -> list[Candidate]:
    """The candidates under another fusion weight, best first (a learned first stage re-orders the
    cached candidates of the index's fusion; both parts' scores travel with each candidate)."""
    bm25 = minmax(np.array([c.bm25 for c in candidates], dtype=np.float32))
    dense = minmax(np.array([c.dense for c in candidates], dtype=np.float32))
    fused = bm25_weight * bm25 + (1 - bm25_weight) * dense
    return [
        Candidate(candidates[i].doc_id, candidates[i].bm25, candidates[i].dense, float(fused[i]))
        for i in np.argsort(-fused, kind="stable")
    ]


class FirstStage:
    """The living index of one folder; `search` returns fused candidates best first."""

    def __init__(self, folder: Path):
        self.folder = folder
        if not (folder / STORE_FILE).exists():
            raise NotFound(f"no document store at {folder}: run `rankloop index` (an index built before rankloop 0.3 is rebuilt)")
        self.store = DocumentStore(folder / STORE_FILE)
        self.bm25 = Bm25Index(folder / BM25_FOLDER)
        self.encoder = load_encoder(base_model_path())
        self.bm25_weight = BM25_WEIGHT
        # faiss's OpenMP pool next to torch's in one process is a known source of trouble
        faiss.omp_set_num_threads(1)
        self.dense = DenseVectors(self.store, folder)
        self.bm25_seq = 0
        self.refresh()

    @classmethod
    def current(cls, state_dir: Path) -> FirstStage:
        return cls(index_folder(state_dir))

    @property
    def version(self) -> str:
        """The generation served: every change applied here changes it."""
        return f"{self.store.corpus_id}.{min(self.dense_seq, self.bm25_seq)}"

    @property
    def corpus_id(self) -> str:
        return self.store.corpus_id

    @property
    def dense_seq(self) -> int:
        return self.dense.seq

    def refresh(self) -> bool:
        """Applies what changed in the store since the last call; True when anything did."""
        changed = False
        applied = self.store.applied("bm25")
        if applied != self.bm25_seq:
            self.bm25.reload()
            self.bm25_seq, changed = applied, True
        return self.dense.refresh() or changed

    def count(self) -> int:
        return self.store.count()

    def title(self, doc_id: str) -> str:
        doc = self.store.live([doc_id]).get(doc_id)
        return doc.title if doc else ""

    def text(self, doc_id: str) -> str:
        """The text the encoders see (title. text), of a live document or a candidate sent inline."""
        text = self.store.text(doc_id)
        if text is None:
            raise KeyError(doc_id)
        return text

    def live(self, doc_ids: list[str]) -> dict[str, StoredDocument]:
        return self.store.live(doc_ids)

    def content_keys(self, doc_ids: list[str]) -> dict[str, str]:
        return self.store.content_keys(doc_ids)

    def document_features(self) -> list[str]:
        """What a learned combiner can read of this corpus's documents (`training.ranking.features`)."""
        numbers = [n for n, kind in self.store.declared().items() if kind is FieldType.number]
        return document_feature_names(numbers, self.store.has_ages())

    def document_numbers(self, doc_ids: list[str], names: list[str]) -> dict[str, np.ndarray]:
        """One column per document feature name, one row per document (NaN where unset)."""
        found = self.store.numbers(doc_ids) if names else {}
        return document_columns(doc_ids, found, names, time.time())

    def search(self, query: str, k: int = 100, conditions: list[Condition] | None = None) -> list[Candidate]:
        return self.search_many([query], k, conditions)[0]

    def search_many(self, queries: list[str], k: int = 100, conditions: list[Condition] | None = None) -> list[list[Candidate]]:
        """Each query's best `k` by fused score, among the documents passing `conditions` (filters
        apply inside both searches, before `k` is cut)."""
        within = self.store.matching(conditions) if conditions else None
        q_emb = encode(self.encoder, queries)
        allowed = np.array(self.store.nums_of(within), dtype=np.int64) if within is not None else None
        found = self.dense.search(q_emb, k, allowed)
        names = self.store.ids_of(sorted({n for nums in found for n in nums}))
        out: list[list[Candidate]] = []
        for qi, query in enumerate(queries):
            bm = dict(self.bm25.search(query, k, within))
            ids = list(dict.fromkeys([names[n] for n in found[qi] if n in names] + list(bm)))
            if not ids:
                out.append([])
                continue
            dense = self._similarity(ids, q_emb[qi])
            bm25 = np.array([bm.get(d, 0.0) for d in ids], dtype=np.float32)
            fused = self.bm25_weight * minmax(bm25) + (1 - self.bm25_weight) * minmax(dense)
            order = np.argsort(-fused, kind="stable")[:k]
            out.append([Candidate(ids[j], float(bm25[j]), float(dense[j]), float(fused[j])) for j in order])
        return out

    def score(self, query: str, doc_ids: list[str], text: Callable[[str], str], cache: EmbeddingCache) -> list[Candidate]:
        """An application's own candidates under the first stage's dense part, best first (`/rerank`)."""
        q = encode(self.encoder, [query])[0]
        scores = self.base_vectors(doc_ids, text, cache) @ q if doc_ids else np.zeros(0, dtype=np.float32)
        fused = minmax(scores)
        return [Candidate(doc_ids[i], 0.0, float(scores[i]), float(fused[i])) for i in np.argsort(-fused, kind="stable")]

    def base_vectors(self, doc_ids: list[str], text: Callable[[str], str], cache: EmbeddingCache) -> np.ndarray:
        """The documents under the base encoder, one row each: the stored vectors of indexed ones;
        one sent inline or not encoded yet is encoded once and cached by its content. This is the
        frozen document tower a query-side fine-tune is scored against (`training.ranking.reranker`)."""
        vectors = self.store.vectors_of(doc_ids)
        unknown = [d for d in doc_ids if d not in vectors]
        if unknown:
            keys = {d: f"{d}@{content_key(text(d))}" for d in unknown}
            found = cache.get_many(FIRST_STAGE, list(keys.values()))
            todo = [d for d in unknown if keys[d] not in found]
            if todo:
                fresh = dict(zip((keys[d] for d in todo), encode(self.encoder, [text(d) for d in todo])))
                cache.put_many(FIRST_STAGE, fresh)
                found.update(fresh)
            vectors.update({d: found[keys[d]] for d in unknown})
        if not doc_ids:
            return np.zeros((0, DIM), dtype=np.float32)
        return np.stack([np.asarray(vectors[d], dtype=np.float32) for d in doc_ids])

    def _similarity(self, ids: list[str], q: np.ndarray, missing: float | None = None) -> np.ndarray:
        """Cosine of each document's vector to the query; a document not encoded yet (or applied to
        BM25 before this process read its vector) gets `missing`, by default the median of the others:
        its BM25 score decides, neither favoured nor buried by a vector it does not have yet."""
        sims = np.full(len(ids), np.nan, dtype=np.float32)
        vectors = self.store.vectors_of(ids)
        if vectors:
            known = [i for i, d in enumerate(ids) if d in vectors]
            sims[known] = np.stack([vectors[ids[i]] for i in known]) @ q
        if missing is not None:
            return np.where(np.isnan(sims), missing, sims)
        scored = sims[~np.isnan(sims)]
        return np.nan_to_num(sims, nan=float(np.median(scored)) if scored.size else 0.0)


def index_folder(state_dir: Path) -> Path:
    folder = state_dir / "index"
    if not (folder / STORE_FILE).exists():
        raise NotFound(f"no index under {state_dir}/index: run `rankloop index --input FILE` (or --dataset DIR) first")
    return folder
