"""The vector index that does not grow per worker: a snapshot read memory-mapped plus the changes
since it, exact for small corpora and IVF with a measured recall above `ann_from`."""

from __future__ import annotations

import numpy as np

from schemas.documents import Document
from training.config import AnnSettings
from training.corpus.dense import DenseVectors, build_snapshot, current_snapshot, exact_top
from training.corpus.store import DIM, DocumentStore


def clustered(n: int, seed: int = 0, topics: int = 40, draw: int = 0) -> np.ndarray:
    """Unit vectors around `topics` random centres (real embeddings cluster by topic; uniform
    random ones have no neighbourhoods for an ANN index to find); `draw` picks other points near
    the same centres."""
    centres = np.random.default_rng(seed).standard_normal((topics, DIM)).astype(np.float32)
    rng = np.random.default_rng((seed, draw))
    x = centres[rng.integers(0, topics, n)] + 0.7 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def store_with(tmp_path, vectors: np.ndarray) -> DocumentStore:
    store = DocumentStore(tmp_path / "documents.sqlite")
    docs = [Document(id=f"d{i}", text=f"document {i}", vector=v.tolist()) for i, v in enumerate(vectors)]
    for start in range(0, len(docs), 1000):
        store.upsert(docs[start : start + 1000])
    return store


def ids(store: DocumentStore, nums: list[int]) -> list[str]:
    names = store.ids_of(nums)
    return [names[n] for n in nums]


def test_changes_after_the_snapshot_are_searched_and_what_they_replaced_is_hidden(tmp_path):
    vectors = clustered(300)
    store = store_with(tmp_path, vectors)
    snap = build_snapshot(store, tmp_path, AnnSettings(ann_from=10_000))
    assert snap.kind == "exact" and snap.documents == 300 and snap.recall_at_100 == 1.0
    dense = DenseVectors(store, tmp_path)
    dense.refresh()
    assert dense.pending == 0 and dense.base is not None

    store.delete(["d0"])
    store.upsert([Document(id="d1", text="moved", vector=vectors[2].tolist())])  # d1 now sits where d2 is
    store.upsert([Document(id="new", text="new", vector=vectors[0].tolist())])  # the new one where d0 was
    assert dense.refresh() and dense.pending == 3

    top_at_d0 = ids(store, dense.search(vectors[:1], 3)[0])
    assert top_at_d0[0] == "new" and "d0" not in top_at_d0
    near_d2 = set(ids(store, dense.search(vectors[2:3], 2)[0]))
    assert near_d2 == {"d1", "d2"}
    near_old_d1 = ids(store, dense.search(vectors[1:2], 300)[0])
    assert "d0" not in near_old_d1 and near_old_d1.count("d1") == 1  # the old d1 is hidden, not served twice
    allowed = np.array(store.nums_of(["d5", "new"]), dtype=np.int64)
    assert set(ids(store, dense.search(vectors[:1], 10, allowed)[0])) == {"d5", "new"}


def test_a_new_snapshot_takes_over_and_empties_what_a_worker_holds(tmp_path):
    vectors = clustered(200)
    store = store_with(tmp_path, vectors)
    build_snapshot(store, tmp_path, AnnSettings(ann_from=10_000))
    dense = DenseVectors(store, tmp_path)
    dense.refresh()
    store.upsert([Document(id=f"x{i}", text="x", vector=v.tolist()) for i, v in enumerate(vectors[:50])])
    dense.refresh()
    assert dense.pending == 50
    first = current_snapshot(tmp_path)
    second = build_snapshot(store, tmp_path, AnnSettings(ann_from=10_000))
    assert second.documents == 250 and second.file != (first.file if first else None)
    assert dense.refresh() and dense.pending == 0 and dense.snapshot == second


def test_ivf_snapshot_reaches_its_recall_against_exact_search(tmp_path):
    vectors = clustered(4000, seed=1)
    store = store_with(tmp_path, vectors)
    snap = build_snapshot(store, tmp_path, AnnSettings(ann_from=1000, recall=0.95))
    assert snap.kind == "ivf" and snap.nlist > 1 and 0 < snap.nprobe < snap.nlist
    assert snap.recall_at_100 is not None and snap.recall_at_100 >= 0.95
    dense = DenseVectors(store, tmp_path)
    dense.refresh()
    queries = clustered(50, seed=1, draw=1)
    truth = exact_top(store, queries, 100)
    found = dense.search(queries, 100)
    recall = np.mean([len(set(f) & set(t)) / 100 for f, t in zip(found, truth)])
    assert recall >= 0.9
    store.delete([f"d{i}" for i in range(4000) if i % 2])  # half deleted after the snapshot: never served
    dense.refresh()
    assert all(store.ids_of(nums).keys() == set(nums) for nums in dense.search(queries, 100))


def test_a_generated_corpus_with_its_own_vectors_streams_into_an_ivf_snapshot_without_encoding(tmp_path, monkeypatch):
    from services.bench.scale import Synthetic
    from training import indexing

    def no_encoder(batch_size: int = 32):
        return lambda texts: (_ for _ in ()).throw(AssertionError(f"encoded {len(texts)} documents"))

    monkeypatch.setattr(indexing, "encoder_function", no_encoder)
    corpus = Synthetic(3000)
    report = indexing.load_documents(tmp_path, corpus.documents(chunk=700), ann=AnnSettings(ann_from=1000, recall=0.95))
    assert report.stored == 3000 and report.refused == 0
    snap = current_snapshot(tmp_path / "index")
    assert snap is not None and snap.kind == "ivf" and snap.documents == 3000 and (snap.recall_at_100 or 0) >= 0.95
    store = indexing.open_store(tmp_path)
    dense = DenseVectors(store, tmp_path / "index")
    dense.refresh()
    queries = corpus.query_vectors(40, seed=1)
    truth = exact_top(store, queries, 100)
    recall = np.mean([len(set(f) & set(t)) / 100 for f, t in zip(dense.search(queries, 100), truth)])
    assert recall >= 0.9
