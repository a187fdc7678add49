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
