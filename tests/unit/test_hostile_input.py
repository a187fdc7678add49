"""Bad input gets a clear 4xx, never a 500, and never costs the good events of a batch."""

from __future__ import annotations

import random

import pytest
from fastapi.testclient import TestClient

from services.config import ServingSettings, Settings
from services.serve.app import create_app
from services.serve.worker import Worker
from services.storage.memory import MemoryPublisher, memory_caches
from training.registry import MemoryRegistry


@pytest.fixture()
def client(tiny_first_stage, tmp_path):
    s = Settings(state_dir=tmp_path, serving=ServingSettings(explore_rate=0.0, max_body_bytes=64_000))
    worker = Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))
    with TestClient(create_app(s, worker, watch_events=False), raise_server_exceptions=False) as c:
        yield c


def event(n: int, **fields) -> dict:
    return {"event_id": f"e{n}", "request_id": "r1", "doc_id": "d1", "type": "click", **fields}


def test_a_body_over_the_limit_is_refused_whether_declared_or_streamed(client):
    big = b'{"query": "' + b"a" * 100_000 + b'"}'
    assert client.post("/rank", content=big, headers={"content-type": "application/json"}).status_code == 413

    def chunks():  # no Content-Length: the limit applies while reading
        yield b"["
        for _ in range(100):
            yield b'{"event_id": "' + b"x" * 1000 + b'"},'
        yield b"{}]"

    r = client.post("/events", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"query": "vitamin d", "k": "10"},  # no coercion
        {"query": "vitamin d", "k": 10, "debug": True},  # unknown field
        {"query": "vitamin d", "user": "u" * 100_00},  # a user too large for an impression
        {"query": "vitamin \ud800 d"},  # a lone surrogate
        {"query": ""},
    ],
)
def test_rank_refuses_what_it_cannot_serve_faithfully_with_422(client, body):
    import json

    r = client.post("/rank", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "raw",
    [b"[" * 20_000 + b"]" * 20_000, b'[{"event_id": "e1", "value": NaN}]', b"[1, Infinity]", b"\xff\xfe[]", b"{"],
)
def test_malformed_json_is_a_400_with_the_reason(client, raw):
    r = client.post("/events", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"].startswith("malformed JSON")


def test_bad_events_are_rejected_one_by_one_and_the_good_ones_land(client):
    import json

    batch = [
        event(1),
        event(2, event_id="bad-\ud800"),
        event(3, value=-5.0),
        event(4, value=1e300),
        event(5, timestamp=-1),
        event(6, request_id="r" * 10_000),
        event(7),
    ]
    r = client.post("/events", content=json.dumps(batch), headers={"content-type": "application/json"})
    assert r.status_code == 200
    body = r.json()
    assert body["accepted"] == ["e1", "e7"]
    assert [rej["index"] for rej in body["rejected"]] == [1, 2, 3, 4, 5]
    assert body["rejected"][0]["event_id"] is None  # not echoed: it cannot be encoded
    assert all(rej["code"] == "invalid_event" and rej["detail"] for rej in body["rejected"])


def test_a_millisecond_timestamp_is_a_422_with_the_fix_and_a_future_one_is_refused_at_intake(client):
    import time

    ms = client.post("/events", json=[event(1, timestamp=time.time() * 1000)])
    assert ms.status_code == 422
    assert "milliseconds" in ms.json()["rejected"][0]["detail"] and "Date.now() / 1000" in ms.json()["rejected"][0]["detail"]
    ahead = client.post("/events", json=[event(2, timestamp=time.time() + 3600), event(3)])
    assert ahead.status_code == 200 and ahead.json()["accepted"] == ["e3"]
    assert ahead.json()["rejected"][0]["code"] == "bad_timestamp" and "in the future" in ahead.json()["rejected"][0]["detail"]


def test_the_status_page_shows_activity_workers_and_escapes_what_users_sent(tiny_first_stage, tmp_path):
    """The control process's page: what each serving worker reported, the minute counts, the newest dead
    letters from the topic, with anything users sent escaped."""
    from schemas import DeadLetter
    from services.control.app import create_app as create_control_app
    from tests.factories import control_plane

    s = Settings(state_dir=tmp_path, serving=ServingSettings(explore_rate=0.0))
    worker = Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))
    plane = control_plane(s, MemoryRegistry())
    plane.activity.count({"events": 2, "labels": 3, "dead:doc_not_shown": 1})
    plane.fleet.report(worker.report())
    dead = DeadLetter(source="x", code="doc_not_shown", reason="doc_id '<script>alert(1)</script>' was not shown", payload="{}")
    plane.promotions.publisher.publish(s.keys.dead_letters, "x", dead)
    with TestClient(create_control_app(s, plane, run_loops=False)) as client:
        page = client.get("/status")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "last hour: 2 events, 3 label rows" in page.text and "no registered version yet" in page.text
    assert "<code>doc_not_shown</code></td><td>1</td>" in page.text
    assert worker.name in page.text and "first-stage" in page.text  # the worker's report
    assert "<script>" not in page.text and "&lt;script&gt;" in page.text
