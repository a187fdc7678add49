"""First stage: BM25 (bm25s) + dense all-MiniLM-L6-v2 vectors (faiss), fused per query.

An index is a folder `<state>/index/<version>/`; the version is a hash of the corpus and the encoder,
so caches keyed by it can never mix two corpora. Document embeddings are cached on disk by content
hash, so re-indexing an unchanged corpus costs no encoding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import bm25s
import faiss
import numpy as np
import Stemmer

from schemas import NotFound
from training.beir import Dataset, doc_text
from training.progress import Progress, silent
from training.ranking.encoder import base_model_path, encode, load_encoder
from training.ranking.text_column import TextColumn, write_text_column

TEXTS_FILE, TITLES_FILE = "texts.utf8", "titles.utf8"  # memory-mapped text columns (text_column.py)
BM25_WEIGHT = 0.5  # chosen on SciFact *train* queries: 0.0->0.660, 0.3->0.716, 0.5->0.731, 1.0->0.699


@dataclass
class Candidate:
    doc_id: str
    bm25: float
    dense: float
    fused: float


def _stemmer():
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


def corpus_version(doc_ids: list[str], texts: list[str], encoder: str) -> str:
    h = hashlib.sha256(encoder.encode())
    for d, t in zip(doc_ids, texts):
        h.update(d.encode())
        h.update(hashlib.sha1(t.encode()).digest())
    return h.hexdigest()[:12]


def build_index(dataset: Dataset, state_dir: Path, batch_size: int = 32, progress: Progress = silent) -> Path:
    """Builds (or reuses) the index of a dataset and marks it current. Returns its folder."""
    doc_ids = list(dataset.corpus)
    texts = [doc_text(dataset.corpus[d]) for d in doc_ids]
    version = corpus_version(doc_ids, texts, "all-MiniLM-L6-v2")
    root = state_dir / "index"
    folder = root / version
    if not (folder / "meta.json").exists() or not (folder / TEXTS_FILE).exists():
        folder.mkdir(parents=True, exist_ok=True)
        emb = _cached_embeddings(texts, state_dir / "embeddings", batch_size, progress)
        index = faiss.IndexFlatIP(emb.shape[1])
        index.add(emb)
        faiss.write_index(index, str(folder / "dense.faiss"))
        tokens = bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), show_progress=False)
        bm25 = bm25s.BM25()
        bm25.index(tokens, show_progress=False)
        bm25.save(str(folder / "bm25"))
        (folder / "doc_ids.json").write_text(json.dumps(doc_ids))
        write_text_column(folder / TITLES_FILE, (dataset.corpus[d].get("title", "") for d in doc_ids))
        write_text_column(folder / TEXTS_FILE, texts)
        (folder / "meta.json").write_text(
            json.dumps(
                {
                    "version": version,
                    "dataset": str(dataset.path),
                    "documents": len(doc_ids),
                    "encoder": "all-MiniLM-L6-v2",
                    "bm25_weight": BM25_WEIGHT,
                },
                indent=2,
            )
        )
    if not (folder / "self_check.json").exists():
        from training import self_check  # it evaluates through training.evaluate, which imports this module

        self_check.record(FirstStage(folder), dataset)
    (root / "CURRENT").write_text(version)
    return folder


def _cached_embeddings(texts: list[str], cache_dir: Path, batch_size: int, progress: Progress) -> np.ndarray:
    """Embeddings per text, cached on disk by sha1 of the text in chunk files."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
    key_file, vec_file = cache_dir / "keys.json", cache_dir / "vectors.npy"
    known: dict[str, int] = {}
    vectors = None
    if key_file.exists() and vec_file.exists():
        known = {k: i for i, k in enumerate(json.loads(key_file.read_text()))}
        vectors = np.load(vec_file)
    missing = [i for i, k in enumerate(keys) if k not in known]
    if missing:
        model = load_encoder()
        new = []
        chunk = 256
        task = f"embedding {len(missing)} documents"
        for start in range(0, len(missing), chunk):
            idx = missing[start : start + chunk]
            new.append(encode(model, [texts[i] for i in idx], batch_size))
            progress(task, min(start + chunk, len(missing)), len(missing))
        new_vecs = np.concatenate(new)
        vectors = new_vecs if vectors is None else np.concatenate([vectors, new_vecs])
        all_keys = list(known) + [keys[i] for i in missing]
        known = {k: i for i, k in enumerate(all_keys)}
        np.save(vec_file, vectors)
        key_file.write_text(json.dumps(all_keys))
    assert vectors is not None
    return np.stack([vectors[known[k]] for k in keys]).astype(np.float32)


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
        self.stemmer = _stemmer()
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
