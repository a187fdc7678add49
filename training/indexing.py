"""Building a first-stage index: BM25 (bm25s) over the texts, all-MiniLM-L6-v2 vectors in faiss, the
texts and titles as memory-mapped columns, and the self-check recorded beside them.

An index is a folder `<state>/index/<version>/`; the version is a hash of the corpus and the encoder,
so caches keyed by it can never mix two corpora. Document embeddings are cached on disk by content
hash, so re-indexing an unchanged corpus costs no encoding. Query-time search is
`training.ranking.first_stage`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import bm25s
import faiss
import numpy as np

from training import self_check
from training.beir import Dataset, doc_text
from training.progress import Progress, silent
from training.ranking.encoder import encode, load_encoder
from training.ranking.first_stage import BM25_WEIGHT, TEXTS_FILE, TITLES_FILE, FirstStage, stemmer
from training.ranking.text_column import write_text_column


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
        tokens = bm25s.tokenize(texts, stopwords="en", stemmer=stemmer(), show_progress=False)
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
