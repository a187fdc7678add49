"""First stage at query time: BM25 (bm25s) + dense all-MiniLM-L6-v2 vectors (faiss), fused per query.

An index is a folder `<state>/index/<version>/` that `training.indexing` builds; this module only
reads one and searches it, which is all a serving worker does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import bm25s
import faiss
import numpy as np
import Stemmer

from schemas import NotFound
from training.ranking.encoder import base_model_path, encode, load_encoder
from training.ranking.text_column import TextColumn

TEXTS_FILE, TITLES_FILE = "texts.utf8", "titles.utf8"  # memory-mapped text columns (text_column.py)
BM25_WEIGHT = 0.5  # chosen on SciFact *train* queries: 0.0->0.660, 0.3->0.716, 0.5->0.731, 1.0->0.699


@dataclass
class Candidate:
    doc_id: str
    bm25: float
    dense: float
    fused: float


def stemmer() -> Stemmer.Stemmer:
    """The one stemmer: an index is tokenised with it at build time and every query at search time."""
    return Stemmer.Stemmer("english")


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
    """Loads an index folder; `search` returns fused candidates best first."""

    def __init__(self, folder: Path):
        self.folder = folder
        if not (folder / TEXTS_FILE).exists():
            raise NotFound(f"the index at {folder} was built by an older rankloop: run `rankloop index` to rebuild it")
        self.meta = json.loads((folder / "meta.json").read_text())
        self.version: str = self.meta["version"]
        self.doc_ids: list[str] = json.loads((folder / "doc_ids.json").read_text())
        self.titles = TextColumn(folder / TITLES_FILE)
        self.texts = TextColumn(folder / TEXTS_FILE)
        self.row = {d: i for i, d in enumerate(self.doc_ids)}
        # memory-mapped: the vectors are read from the page cache every worker on the machine shares
        self.dense = faiss.read_index(str(folder / "dense.faiss"), faiss.IO_FLAG_MMAP_IFC)
        # faiss's OpenMP pool next to torch's in one process is a known source of trouble; an exact
        # search over this many vectors needs no threads
        faiss.omp_set_num_threads(1)
        self.bm25 = bm25s.BM25.load(str(folder / "bm25"), mmap=True)
        self.stemmer = stemmer()
        self.encoder = load_encoder(base_model_path())
        self.bm25_weight = float(self.meta.get("bm25_weight", BM25_WEIGHT))

    @classmethod
    def current(cls, state_dir: Path) -> FirstStage:
        pointer = state_dir / "index" / "CURRENT"
        if not pointer.exists():
            raise NotFound(f"no index under {state_dir}/index: run `rankloop index --dataset DIR` first")
        return cls(state_dir / "index" / pointer.read_text().strip())

    def title(self, doc_id: str) -> str:
        return self.titles[self.row[doc_id]]

    def text(self, doc_id: str) -> str:
        """The text the encoders see (title. abstract)."""
        return self.texts[self.row[doc_id]]

    def search(self, query: str, k: int = 100) -> list[Candidate]:
        return self.search_many([query], k)[0]

    def search_many(self, queries: list[str], k: int = 100) -> list[list[Candidate]]:
        n = len(self.doc_ids)
        k = min(k, n)
        q_emb = encode(self.encoder, queries)
        _d_scores, d_idx = self.dense.search(q_emb, k)
        tokens = bm25s.tokenize(queries, stopwords="en", stemmer=self.stemmer, show_progress=False)
        b_idx, b_scores = self.bm25.retrieve(tokens, k=k, show_progress=False, n_threads=0)
        out = []
        for qi in range(len(queries)):
            bm = {int(i): float(s) for i, s in zip(b_idx[qi], b_scores[qi]) if s > 0}
            rows = list(dict.fromkeys([int(i) for i in d_idx[qi] if i >= 0] + list(bm)))
            vecs = np.stack([self.dense.reconstruct(r) for r in rows])
            dense = vecs @ q_emb[qi]
            bm25 = np.array([bm.get(r, 0.0) for r in rows], dtype=np.float32)
            fused = self.bm25_weight * minmax(bm25) + (1 - self.bm25_weight) * minmax(dense)
            order = np.argsort(-fused)[:k]
            out.append([Candidate(self.doc_ids[rows[j]], float(bm25[j]), float(dense[j]), float(fused[j])) for j in order])
        return out
