"""A frozen document tower (a version embeds no document, so promotion costs nothing per document)
and the bounded feedback memory (pruned by evidence, searched through an index)."""

from __future__ import annotations

import json
import shutil

import numpy as np

from training.config import TrainConfig
from training.ranking.feedback_memory import ANN_FROM, FeedbackMemory, build_index, prune
from training.ranking.reranker import Reranker, doc_matrix_file
from training.train import Example, fit


def frozen_copy(tiny_model, tmp_path):
    folder = tmp_path / "frozen"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("doc_embeddings-*"))  # a tuned warm-up may have left one
    meta = json.loads((folder / "rankloop.json").read_text())
    (folder / "rankloop.json").write_text(json.dumps({**meta, "document_tower": "frozen"}))
    return folder


def test_a_frozen_tower_scores_with_the_index_vectors_and_embeds_no_document(tiny_model, living_index, tmp_path, monkeypatch):
    from training.ranking import reranker as module

    fs = living_index
    calls = []
    real = module.encode
    monkeypatch.setattr(module, "encode", lambda model, texts, *a: calls.append(len(texts)) or real(model, texts, *a))
    reranker = Reranker(frozen_copy(tiny_model, tmp_path), "1").warm(fs)
    assert calls == [] and not list(reranker.folder.glob(doc_matrix_file(fs.corpus_id)))
    stored = fs.store.vectors_of(["d1", "d2"])
    assert np.allclose(reranker.doc_embeddings(["d1", "d2"], fs.text), np.stack([stored["d1"], stored["d2"]]))
    tuned = Reranker(tiny_model, "2").warm(fs)  # the tuned tower embeds the corpus with its own model
    assert (tuned.folder / doc_matrix_file(fs.corpus_id)).exists()


def test_a_query_side_fine_tune_moves_queries_towards_their_fixed_documents(living_index):
    from training.ranking.encoder import encode, load_encoder

    fs = living_index
    model = load_encoder()
    query = "which drink is kind to the liver"
    docs = fs.store.vectors_of(["d7", "d1", "d2"])

    def margin() -> float:  # the positive's lead over the best negative
        q = encode(model, [query])[0]
        return float(q @ docs["d7"] - max(q @ docs["d1"], q @ docs["d2"]))

    before = margin()
    words = model[0].auto_model.get_input_embeddings().weight.detach().clone()
    examples = [Example(query, "d7", ["d1", "d2"], 1.0), Example("sleep and remembering", "d6", ["d3"], 1.0)] * 8
    vectors = lambda ids: np.stack([fs.store.vectors_of([d])[d] for d in ids])  # noqa: E731
    stats = fit(model, examples, fs.text, TrainConfig(epochs=2, batch_size=4, lr=1e-4), document_vectors=vectors)
    assert stats.steps == 8  # (in-batch duplicates of one pair keep the loss itself flat)
    assert margin() > before + 0.05
    assert np.allclose(fs.store.vectors_of(["d7"])["d7"], docs["d7"])  # the documents' side never moved
    assert model[0].auto_model.get_input_embeddings().weight.equal(words)  # nor the word-piece table


def test_prune_keeps_the_queries_with_the_most_evidence():
    memory = {"a": {"d1": 1.0}, "b": {"d1": -3.0}, "c": {"d1": 0.5, "d2": 0.2}, "d": {"d3": 2.0}}
    assert list(prune(memory, 2)) == ["b", "d"]
    assert prune(memory, 10) is memory


def test_a_large_memory_is_searched_through_an_ivf_index_that_finds_the_nearest():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 384)).astype(np.float32)
    x = centres[rng.integers(0, 50, ANN_FROM + 1000)] + 0.7 * rng.standard_normal((ANN_FROM + 1000, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = build_index(x)
    assert index.ntotal == len(x) and hasattr(index, "nprobe") and index.nprobe < index.nlist
    memory = FeedbackMemory([f"q{i}" for i in range(len(x))], [{} for _ in range(len(x))], x, index)
    hits = sum(int(memory.nearest(x[i], 1)[1][0] == i) for i in range(0, len(x), 500))
    assert hits >= 0.95 * len(range(0, len(x), 500))
    assert memory.familiarity(x[7]) > 0.99
    small = FeedbackMemory(["a"], [{}], x[:1], build_index(x[:1]))
    assert small.familiarity(x[0]) > 0.99 and FeedbackMemory([], [], x[:0], build_index(x[:0])).familiarity(x[0]) == 0.0
