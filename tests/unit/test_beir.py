import json

import pytest

from schemas import NotFound
from training import beir


def test_qrels_keep_grades_and_drop_what_cannot_be_ranked(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": f"doc {d}"}) + "\n" for d in "abc"))
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": f"query {q}"}) + "\n" for q in ("1", "2", "3")))
    rows = ["query-id\tcorpus-id\tscore", "1\ta\t2", "1\tb\t1", "1\tc\t0", "2\tmissing\t1", "9\ta\t1", "3\tb\t3"]
    (tmp_path / "qrels" / "dev.tsv").write_text("\n".join(rows) + "\n")
    ds = beir.load(tmp_path)
    assert ds.qrels("dev") == {"1": {"a": 2, "b": 1}, "3": {"b": 3}}
    with pytest.raises(NotFound, match="no qrels for split 'train'"):
        ds.qrels("train")


def test_a_subset_keeps_every_judged_document_of_its_queries_and_is_the_same_for_a_seed(tmp_path):
    from training.variants import subset

    src = tmp_path / "full"
    (src / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i}", "title": "t", "text": f"doc {i}"} for i in range(50)]
    (src / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (src / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n" for i in range(20)))
    for split, qs in (("train", range(0, 15)), ("test", range(15, 20))):
        rows = [f"q{i}\td{2 * i}\t1\nq{i}\td{2 * i + 1}\t2" for i in qs]
        (src / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    full = beir.load(src)

    cut = beir.load(subset(full, tmp_path / "cut", {"train": 5, "test": 2}, docs=20, seed=3))
    train, test = cut.qrels("train"), cut.qrels("test")
    assert (len(train), len(test), len(cut.corpus), len(cut.queries)) == (5, 2, 20, 7)
    assert all(full.qrels("train")[q] == docs for q, docs in train.items())  # nothing judged was lost
    assert all(full.qrels("test")[q] == docs for q, docs in test.items())
    again = beir.load(subset(full, tmp_path / "again", {"train": 5, "test": 2}, docs=20, seed=3))
    assert (again.qrels("train"), set(again.corpus)) == (train, set(cut.corpus))
