"""The living corpus on the real stack: a document upserted through one worker is served by another
without a restart; a delete is never served again by either (caches included); the documents topic
feeds the corpus and dead-letters what it cannot use; /rerank answers become labels training reads."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from services.sdk import RankloopClient
from services.storage import open_labels
from tests.conftest import free_port
from tests.integration.conftest import serve_in_thread, wait_for
from training.pipeline import in_corpus
from training.ranking.first_stage import FirstStage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def second_worker(stack):
    """Another serving worker on the same machine: its own process state, the same store."""
    from services.serve.app import build_worker, create_app

    s = stack["settings"]
    s2 = s.model_copy(update={"serving": s.serving.model_copy(update={"port": free_port()})})
    worker = build_worker(s2)
    server = serve_in_thread(s2, create_app(s2, worker))
    yield s2.base_url
    server.should_exit = True


def ranked(base_url: str, query: str, k: int = 10) -> list[str]:
    r = httpx.post(f"{base_url}/rank", json={"query": query, "k": k}, timeout=30)
    assert r.status_code == 200, r.text
    return [it["doc_id"] for it in r.json()["items"]]


def test_an_upsert_through_one_worker_is_served_by_another_without_a_restart(stack, second_worker):
    first = stack["settings"].base_url
    doc = {"id": f"live-{uuid.uuid4().hex[:6]}", "title": "Quokka diets", "text": "Wild quokkas eat leaves and grasses."}
    r = httpx.put(f"{first}/documents", json=[doc], timeout=30)
    assert r.status_code == 200 and r.json()["stored"] == [doc["id"]]
    acked = time.time()
    wait_for(lambda: doc["id"] in ranked(second_worker, "what do quokkas eat"), timeout=30, what="the upsert served")
    assert time.time() - acked < 30


def test_a_delete_is_never_served_again_by_any_worker_even_from_their_caches(stack, second_worker):
    first = stack["settings"].base_url
    doc = {"id": f"gone-{uuid.uuid4().hex[:6]}", "title": "Axolotl gills", "text": "Axolotls keep their feathery gills."}
    httpx.put(f"{first}/documents", json=[doc], timeout=30)
    for url in (first, second_worker):
        wait_for(lambda url=url: doc["id"] in ranked(url, "axolotl gills"), timeout=30, what="the upsert served")
        assert doc["id"] in ranked(url, "axolotl gills")  # and now cached in Redis under this generation
    r = httpx.delete(f"{second_worker}/documents/{doc['id']}", timeout=30)
    assert r.status_code == 200 and r.json()["deleted"] == [doc["id"]]
    deadline = time.time() + 5
    while time.time() < deadline:  # before and after both workers caught up
        for url in (first, second_worker):
            assert doc["id"] not in ranked(url, "axolotl gills")


def test_the_documents_topic_feeds_the_corpus_and_dead_letters_what_it_cannot_use(stack):
    from kafka import KafkaProducer

    s = stack["settings"]
    doc_id = f"feed-{uuid.uuid4().hex[:6]}"
    producer = KafkaProducer(bootstrap_servers=s.kafka.address, acks="all")
    producer.send(
        s.keys.documents, key=doc_id.encode(), value=json.dumps({"id": doc_id, "text": "Narwhal tusks are teeth."}).encode()
    )
    producer.send(s.keys.documents, key=b"bad", value=json.dumps({"id": "bad", "text": ""}).encode())
    producer.flush()
    producer.close()
    wait_for(lambda: doc_id in ranked(s.base_url, "narwhal tusk teeth"), timeout=60, what="the topic's document served")
    letters = wait_for(
        lambda: [x for x in httpx.get(f"{s.base_url}/dead-letters", timeout=30).json() if x["code"] == "invalid_document"],
        timeout=60,
        what="the bad document dead-lettered",
    )
    assert "text" in letters[0]["reason"] and letters[0]["source"] == s.keys.documents


def test_rerank_answers_become_labels_that_training_reads(stack):
    s = stack["settings"]
    client = RankloopClient(s.base_url)
    inline = {"id": f"kb-{uuid.uuid4().hex[:6]}", "title": "Kelp forests", "text": "Kelp forests shelter sea otters."}
    indexed = ranked(s.base_url, "sea otters kelp", k=3)
    request_ids = []
    for n in range(5):
        res = client.rerank("where do sea otters live", [*indexed, inline], top_n=3, user=f"u{n}")
        assert inline["id"] in {it.doc_id for it in res.items}
        client.click(res, inline["id"])
        request_ids.append(res.request_id)
    labels = open_labels(s.label_store_url)

    def read():
        df = labels.read()[0]
        return [df] if not df.empty and df["request_id"].isin(request_ids).sum() >= 5 else None

    (df,) = wait_for(read, timeout=120, what="labels of the /rerank answers")
    ours = in_corpus(df, FirstStage.current(s.state_dir))
    clicked = ours[ours["request_id"].isin(request_ids) & (ours["doc_id"] == inline["id"])]
    assert len(clicked) == 5 and (clicked["grade"] > 0).all()
    assert FirstStage.current(s.state_dir).text(inline["id"]) == "Kelp forests. Kelp forests shelter sea otters."
