"""The living corpus: documents refused one by one with a reason, filters, upserts and deletes seen
without a rebuild, a delete never served after it was acknowledged, files with a field mapping."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from schemas.documents import FieldType, check_document, matches, parse_filters
from services.config import CorpusSettings, ServingSettings, Settings
from services.serve.app import create_app
from services.serve.worker import Worker
from services.storage.memory import MemoryPublisher, memory_caches
from training.corpus.files import Mapping, read_rows
from training.corpus.indexer import Indexer
from training.indexing import encoder_function, load_documents
from training.ranking.reranker import Reranker
from training.registry import MemoryRegistry

DECLARED = {"lang": FieldType.keyword, "year": FieldType.number, "tags": FieldType.keyword}
NEW_DOC = {
    "id": "n1",
    "title": "Zinc and colds",
    "text": "Zinc lozenges shorten the common cold by a day.",
    "fields": {"lang": "en"},
}


def refusal(raw, dim=384) -> str:
    with pytest.raises(ValueError) as e:
        check_document(raw, DECLARED, dim)
    return str(e.value)


def test_each_bad_document_is_refused_with_its_reason():
    assert "text" in refusal({"id": "a", "text": ""})
    assert "text: empty" in refusal({"id": "a", "text": "   "})
    assert "fields.year: a number field" in refusal({"id": "a", "text": "x", "fields": {"year": "2020"}})
    assert "fields.colour: not a declared field" in refusal({"id": "a", "text": "x", "fields": {"colour": "red"}})
    assert "vector: 3 numbers, the index's vectors have 384" in refusal({"id": "a", "text": "x", "vector": [0.1, 0.2, 0.3]})
    assert "a value longer than 1000" in refusal({"id": "a", "text": "x", "fields": {"lang": "e" * 1001}})
    assert "id" in refusal({"text": "x"})
    assert check_document({"id": "a", "text": "x", "fields": {"year": 2020, "tags": ["a", "b"]}}, DECLARED, 384).id == "a"


def test_filters_exact_set_and_range_over_declared_fields_only():
    doc = {"lang": "en", "year": 2021, "tags": ["bone", "diet"]}
    assert matches(doc, parse_filters({"lang": "en"}, DECLARED))
    assert not matches(doc, parse_filters({"lang": "de"}, DECLARED))
    assert matches(doc, parse_filters({"tags": ["diet", "sleep"]}, DECLARED))
    assert not matches(doc, parse_filters({"tags": ["sleep"]}, DECLARED))
    assert matches(doc, parse_filters({"year": {"gte": 2020, "lt": 2022}}, DECLARED))
    assert not matches(doc, parse_filters({"year": {"gt": 2021}}, DECLARED))
    assert not matches({"lang": "en"}, parse_filters({"year": {"gte": 0}}, DECLARED))  # no value: no match
    for bad, why in [
        ({"colour": "red"}, "not a declared field"),
        ({"lang": {"gte": 1}}, "a range needs a number field"),
        ({"year": "2020"}, "a number field"),
        ({"year": {}}, "an empty range"),
        ({"tags": []}, "a set takes"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_filters(bad, DECLARED)


def catch_up(fs):
    Indexer(fs.store, fs.bm25, encoder_function()).catch_up()
    fs.refresh()


def test_an_upsert_and_a_delete_change_the_index_without_a_rebuild(living_index):
    fs = living_index
    before = fs.version
    fs.store.declare({"lang": FieldType.keyword})
    fs.store.upsert([check_document(NEW_DOC, fs.store.declared(), 384)])
    catch_up(fs)
    assert fs.version != before
    assert fs.search("zinc lozenges for a cold", 3)[0].doc_id == "n1"
    fs.store.delete(["n1"])
    catch_up(fs)
    assert "n1" not in [c.doc_id for c in fs.search("zinc lozenges for a cold", 8)]
    assert fs.count() == 8


def test_an_edit_is_searched_and_embedded_with_its_new_text(living_index, tiny_model):
    fs = living_index
    reranker = Reranker(tiny_model, "1").warm(fs)
    old = reranker.doc_embeddings(["d7"], fs.text)[0]
    edited = {"id": "d7", "title": "Zinc and colds", "text": "Zinc lozenges shorten the common cold by a day."}
    fs.store.upsert([check_document(edited, {}, 384)])
    catch_up(fs)
    assert fs.search("zinc lozenges", 1)[0].doc_id == "d7"
    assert "coffee" not in [c.doc_id for c in fs.search("coffee liver disease", 8)][:1]
    new = reranker.doc_embeddings(["d7"], fs.text)[0]
    assert float(new @ old) < 0.9  # not the row embedded for the old text
    assert np.allclose(new, reranker.model.encode([fs.text("d7")], normalize_embeddings=True)[0], atol=1e-3)


def test_changes_come_back_whole_when_one_change_holds_more_documents_than_a_read(living_index):
    """A batch shares one change number: a reader cut in its middle used to skip the rest of it."""
    fs = living_index
    docs = [check_document({"id": f"b{i}", "text": f"bulk document number {i}"}, {}, 384) for i in range(30)]
    fs.store.upsert(docs)
    assert len(fs.store.changes(fs.store.head() - 1, limit=5)) == 30
    catch_up(fs)
    assert fs.bm25.count() == 38 and fs.count() == 38


def test_filters_apply_before_k_is_cut(living_index):
    fs = living_index
    fs.store.declare({"lang": FieldType.keyword, "year": FieldType.number})
    docs = [
        {"id": f"f{i}", "text": f"vitamin D and fractures, study {i}", "fields": {"lang": "en" if i else "de", "year": 2000 + i}}
        for i in range(6)
    ]
    fs.store.upsert([check_document(d, fs.store.declared(), 384) for d in docs])
    catch_up(fs)
    top = fs.search("vitamin D fractures", 2, parse_filters({"lang": "de"}, fs.store.declared()))
    assert [c.doc_id for c in top] == ["f0"]
    ranged = fs.search("vitamin D fractures", 3, parse_filters({"year": {"gte": 2004}}, fs.store.declared()))
    assert {c.doc_id for c in ranged} == {"f4", "f5"}


@pytest.fixture()
def api(living_index, tmp_path):
    s = Settings(
        state_dir=tmp_path / "state",
        serving=ServingSettings(explore_rate=0.0),
        corpus=CorpusSettings(fields={"lang": FieldType.keyword, "year": FieldType.number}, refresh_s=0.05),
    )
    living_index.store.declare(s.corpus.fields)
    publisher = MemoryPublisher()
    worker = Worker(s, living_index, memory_caches(), publisher, MemoryRegistry(), rng=random.Random(0))
    with TestClient(create_app(s, worker, watch_events=False)) as client:
        client.publisher = publisher  # type: ignore[attr-defined]
        yield client


def wait_for(check, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def ranked(client, query, **extra) -> list[str]:
    r = client.post("/rank", json={"query": query, "k": 5, **extra})
    assert r.status_code == 200, r.text
    return [it["doc_id"] for it in r.json()["items"]]


def test_documents_api_stores_the_good_ones_refuses_the_bad_and_serves_them_without_a_restart(api):
    bad = {"id": "n2", "text": "", "fields": {"lang": "en"}}
    r = api.put("/documents", json=[NEW_DOC, bad, {"id": "n3", "text": "x", "fields": {"year": "old"}}])
    assert r.status_code == 200
    body = r.json()
    assert body["stored"] == ["n1"] and [x["index"] for x in body["refused"]] == [1, 2]
    assert "fields.year: a number field" in body["refused"][1]["detail"]
    assert wait_for(lambda: ranked(api, "zinc lozenges common cold")[:1] == ["n1"])
    assert api.put("/documents", json=[bad]).status_code == 422


def test_a_deleted_document_is_never_served_after_the_delete_answered_even_from_the_cache(api):
    assert ranked(api, "coffee liver disease")[0] == "d7"
    assert ranked(api, "coffee liver disease")[0] == "d7"  # now cached under this generation
    assert api.delete("/documents/d7").json()["deleted"] == ["d7"]
    for _ in range(20):  # before and after this worker caught up
        assert "d7" not in ranked(api, "coffee liver disease")
    assert api.delete("/documents/d7").status_code == 404
    assert api.post("/documents/delete", json={"ids": ["d6", "nope"]}).json() | {"generation": 0} == {
        "deleted": ["d6"],
        "missing": ["nope"],
        "generation": 0,
    }


def test_rank_filters_answer_422_for_an_undeclared_field_and_return_fields_when_asked(api):
    api.put("/documents", json=[{"id": "g1", "text": "Vitamin D in German trials", "fields": {"lang": "de", "year": 2022}}])
    assert wait_for(lambda: "g1" in ranked(api, "vitamin D german"))
    r = api.post("/rank", json={"query": "vitamin D", "k": 5, "filters": {"lang": "de"}, "fields": True})
    assert [(it["doc_id"], it["fields"]) for it in r.json()["items"]] == [("g1", {"lang": "de", "year": 2022})]
    r = api.post("/rank", json={"query": "vitamin D", "filters": {"colour": "red"}})
    assert r.status_code == 422 and "colour: not a declared field" in r.json()["detail"]


def test_rerank_orders_the_applications_candidates_and_records_the_impression(api, living_index):
    inline = {"id": "kb-1", "title": "Coffee FAQ", "text": "Coffee protects the liver from disease."}
    r = api.post("/rerank", json={"query": "coffee and liver disease", "candidates": ["d2", "d7", inline], "top_n": 2})
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert len(items) == 2 and {it["doc_id"] for it in items} <= {"d7", "kb-1"}
    impressions = [json.loads(m) for m in api.publisher.on("rankloop.impressions")]  # type: ignore[attr-defined]
    shown = [i for i in impressions if i["request_id"] == r.json()["request_id"]]
    assert [[it["doc_id"] for it in i["items"]] for i in shown] == [[it["doc_id"] for it in items]]
    assert living_index.text("kb-1") == "Coffee FAQ. Coffee protects the liver from disease."  # kept for training
    unknown = api.post("/rerank", json={"query": "coffee", "candidates": ["d7", "zzz"]})
    assert unknown.status_code == 422 and "zzz" in unknown.json()["detail"]
    clash = api.post("/rerank", json={"query": "coffee", "candidates": [{"id": "d7", "text": "other"}]})
    assert clash.status_code == 422 and "send the id alone" in clash.json()["detail"]


def test_files_with_a_field_mapping_load_and_bad_rows_are_refused_one_by_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"sku": 1, "name": "Red shoe", "body": "A red running shoe.", "lang": "en", "year": "2021"},
        {"sku": 2, "name": "Blue shoe", "body": "", "lang": "en", "year": "2020"},
        {"sku": 3, "name": "Green hat", "body": "A green hat.", "lang": "en", "year": "new"},
    ]
    mapping = Mapping(id="sku", text="body", title="name", fields={"lang": FieldType.keyword, "year": FieldType.number})
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    with (tmp_path / "docs.csv").open("w") as f:
        f.write(
            "sku,name,body,lang,year\n" + "".join(f"{r['sku']},{r['name']},{r['body']},{r['lang']},{r['year']}\n" for r in rows)
        )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    for name in ("docs.jsonl", "docs.csv", "docs.parquet"):
        state = tmp_path / name.replace(".", "-")
        report = load_documents(state, (mapping.document(r) for r in read_rows(tmp_path / name)), mapping.fields)
        assert report.stored == 1, (name, report)
        reasons = [reason for _, _, reason in report.refusals]
        assert any("text" in r for r in reasons) and any("fields.year: a number field" in r for r in reasons)
        if name.endswith("jsonl"):
            assert report.refused == 3 and any("not JSON" in r for r in reasons)


def test_whether_any_document_has_an_age_is_read_from_an_index_not_the_whole_table(tmp_path):
    import sqlite3

    from schemas.documents import Document
    from training.corpus.store import DocumentStore

    path = tmp_path / "documents.sqlite"
    store = DocumentStore(path)
    store.upsert([Document(id=f"d{i}", text=f"document {i}") for i in range(20)])
    assert not store.has_ages()
    store.upsert([Document(id="aged", text="dated", updated_at=1_700_000_000.0)])
    assert store.has_ages()
    store.delete(["aged"])
    assert not store.has_ages()
    plan = sqlite3.connect(path).execute(
        "EXPLAIN QUERY PLAN SELECT 1 FROM documents WHERE deleted = 0 AND updated_at IS NOT NULL LIMIT 1"
    )
    assert "documents_aged" in " ".join(str(row) for row in plan)


WRITER = """
import sys
from pathlib import Path
from schemas.documents import Document
from training.corpus.store import DocumentStore
store = DocumentStore(Path(sys.argv[1]))
for i in range(100000):
    store.upsert([Document(id=f"k{i}", text=f"document {i}")])
    print(f"k{i}", flush=True)  # acknowledged: the commit returned
"""


def test_an_acknowledged_upsert_survives_a_kill_9_of_the_writer(tmp_path):
    from training.corpus.store import DocumentStore

    path = tmp_path / "documents.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env={**os.environ})
    acked = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) == 200:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    acked += [line.strip() for line in proc.stdout if line.strip()]
    assert set(acked) <= set(DocumentStore(path).ids())


def test_a_documents_topic_message_is_an_upsert_a_delete_or_refused_with_its_reason(living_index):
    from services.serve.documents_feed import parse_change

    store = living_index.store
    kind, doc = parse_change(json.dumps({"id": "t1", "text": "from a feed"}).encode(), store)
    assert kind == "upsert" and doc.id == "t1"  # type: ignore[union-attr]
    assert parse_change(b'{"id": "t1", "deleted": true}', store) == ("delete", "t1")
    for payload, why in [(b"{nope", "not JSON"), (b'{"id": "t1", "text": ""}', "text"), (b'{"deleted": true}', "a delete is")]:
        with pytest.raises(ValueError, match=why):
            parse_change(payload, store)


def test_labels_of_deleted_documents_leave_the_training_data(living_index):
    import pandas as pd

    from training.pipeline import in_corpus

    living_index.store.delete(["d3"])
    living_index.store.keep_inline([("kb-9", "", "an inline candidate")])
    df = pd.DataFrame({"doc_id": ["d1", "d3", "kb-9", "never"], "grade": [1, 1, 1, 1]})
    assert in_corpus(df, living_index)["doc_id"].tolist() == ["d1", "kb-9"]


def test_a_document_waiting_for_its_vector_is_already_found_by_bm25(living_index):
    fs = living_index
    fs.store.upsert([check_document({"id": "nv", "text": "Quokkas are small marsupials."}, {}, 384)])
    Indexer(fs.store, fs.bm25, None).catch_up()  # no encoder: BM25 only
    fs.refresh()
    assert fs.store.missing_vectors(10) and fs.search("quokkas marsupials", 3)[0].doc_id == "nv"
    catch_up(fs)  # encoded now
    assert not fs.store.missing_vectors(10) and fs.search("quokkas marsupials", 3)[0].doc_id == "nv"
