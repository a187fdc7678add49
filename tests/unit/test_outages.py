"""Outages: ranking never waits on Kafka or Redis, impressions survive a broker restart, intake says
503 with the reason instead of losing or half-recording events."""

from __future__ import annotations

import random
import threading
import time

import pytest
from fastapi.testclient import TestClient

from schemas import DependencyUnavailable, RankRequest
from services.config import ServingSettings, Settings
from services.serve.app import create_app
from services.serve.worker import Worker
from services.storage import kafka as kafka_storage
from services.storage.kafka import KafkaPublisher
from services.storage.memory import MemoryPublisher, memory_caches
from training.registry import MemoryRegistry


class FakeFuture:
    def __init__(self, ok: bool):
        self.is_done, self._ok = True, ok
        self.exception = None if ok else ConnectionError("broker gone")

    def succeeded(self) -> bool:
        return self._ok

    def failed(self) -> bool:
        return not self._ok

    def add_callback(self, fn):
        if self._ok:
            fn(None)

    def add_errback(self, fn):
        if not self._ok:
            fn(self.exception)


class FakeBroker:
    """Up or down; what it received, in order. Producers made while it is down cannot connect."""

    def __init__(self):
        self.up = True
        self.received: list[str] = []
        self.producers = 0
        self.refused = 0  # attempts to reach it while it was down
        self.lock = threading.Lock()

    def factory(self, bootstrap: str):
        if not self.up:
            self.refused += 1
            raise DependencyUnavailable("no broker")
        self.producers += 1
        broker = self

        class Producer:
            def send(self, topic, key, value):
                with broker.lock:
                    if broker.up:
                        broker.received.append(value)
                    return FakeFuture(broker.up)

            def flush(self, timeout=None):
                pass

            def partitions_for(self, topic):
                return {0} if broker.up else None

            def close(self, timeout=None):
                pass

        return Producer()


def wait_for(predicate, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture()
def no_topic_admin(monkeypatch):
    calls = []
    monkeypatch.setattr(kafka_storage, "create_topics", lambda *a, **k: calls.append(a))
    return calls


def test_buffered_events_survive_a_broker_restart_in_order(no_topic_admin):
    broker = FakeBroker()
    publisher = KafkaPublisher("fake:9092", ("t",), factory=broker.factory, retry_s=0.01)
    for i in range(50):
        assert publisher.publish_later("t", str(i), f"e{i}")
    assert wait_for(lambda: len(broker.received) == 50)
    broker.up = False
    for i in range(50, 150):
        assert publisher.publish_later("t", str(i), f"e{i}")
    assert wait_for(lambda: not publisher.healthy)
    assert publisher.buffered > 0
    assert wait_for(lambda: broker.refused >= 3)  # down for a while: several retries
    broker.up = True
    assert wait_for(lambda: publisher.buffered == 0 and publisher.healthy)
    assert broker.received == [f"e{i}" for i in range(150)]  # nothing lost, nothing reordered
    assert publisher.dropped == 0
    assert no_topic_admin  # vanished topics were recreated during the outage
    publisher.close()


def test_a_full_buffer_drops_and_counts(no_topic_admin):
    broker = FakeBroker()
    broker.up = False
    publisher = KafkaPublisher("fake:9092", ("t",), capacity=10, factory=broker.factory, retry_s=0.01)
    accepted = [publisher.publish_later("t", "k", f"e{i}") for i in range(15)]
    assert accepted.count(False) == 5 and publisher.dropped == 5
    broker.up = True
    assert wait_for(lambda: len(broker.received) == 10)
    publisher.close()


def test_publish_now_reports_a_failure_instead_of_hiding_it(no_topic_admin):
    broker = FakeBroker()
    publisher = KafkaPublisher("fake:9092", ("t",), factory=broker.factory, retry_s=0.01)
    assert publisher.publish("t", "k", "ok").result(timeout=1) is None
    broker.up = False
    future = publisher.publish("t", "k", "lost")
    with pytest.raises(ConnectionError):
        future.result(timeout=1)
    assert not publisher.healthy and "broker gone" in (publisher.last_error or "")
    publisher.close(timeout=0.1)


class FailingCache:
    def get(self, key):
        raise DependencyUnavailable("redis: connection refused")

    def set(self, key, value):
        raise DependencyUnavailable("redis: connection refused")


class FailingSeen:
    def __init__(self, fail_after: int = 0):
        self.marked: list[str] = []
        self.fail_after = fail_after

    def first_sighting(self, event_id):
        if len(self.marked) >= self.fail_after:
            raise DependencyUnavailable("de-duplication needs Redis, which is unavailable")
        self.marked.append(event_id)
        return True

    def forget(self, event_id):
        self.marked.remove(event_id)


@pytest.fixture()
def worker(tiny_first_stage):
    s = Settings(serving=ServingSettings(explore_rate=0.0, rerank_depth=5, candidates_k=8))
    return Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))


def event(i: int) -> dict:
    return {"event_id": f"e{i}", "request_id": "r", "doc_id": "d1", "type": "click"}


def test_rank_answers_while_the_broker_is_down_and_its_impressions_follow(worker):
    worker.publisher.fail = True
    res = worker.rank(RankRequest(query="coffee and the liver", k=3))
    assert res.items and worker.publisher.buffered == 1
    worker.publisher.fail = False
    worker.publisher.drain()
    assert res.request_id in worker.publisher.on(worker.keys.impressions)[0]


def test_rank_answers_uncached_while_redis_is_down(worker):
    worker.caches.ranking = FailingCache()
    assert worker.rank(RankRequest(query="coffee and the liver", k=3)).items
    assert worker.metrics.cache_errors._value.get() == 4  # candidates and results, read and write: all counted


def test_intake_refuses_with_the_reason_while_the_broker_is_down(worker):
    worker.publisher.fail = True
    with pytest.raises(DependencyUnavailable, match="Kafka unavailable"):
        worker.ingest([event(1)])
    worker.publisher.fail = False
    assert worker.ingest([event(1)])[0] == ["e1"]  # nothing was marked as seen: the retry lands


def test_intake_is_all_or_nothing_when_deduplication_fails_midway(worker):
    seen = FailingSeen(fail_after=2)
    worker.caches.seen = seen
    with pytest.raises(DependencyUnavailable, match="Redis"):
        worker.ingest([event(1), event(2), event(3)])
    assert seen.marked == [] and worker.publisher.on(worker.keys.interactions) == []


def test_the_app_says_503_with_a_reason_and_stays_live(worker):
    app = create_app(worker.s, worker, watch_events=False)
    with TestClient(app) as client:
        assert client.get("/health/live").json() == {"status": "alive"}
        assert wait_for(lambda: client.get("/health/ready").status_code == 200)
        worker.publisher.fail = True
        worker.caches.seen = FailingSeen()
        r = client.post("/events", json=[event(7)])
        assert r.status_code == 503 and "Kafka unavailable" in r.json()["detail"] and r.headers["retry-after"]
        ready = client.get("/health/ready").json()
        assert ready["status"] == "ready" and ready["kafka"] is False  # reported, not gating
        assert client.post("/rank", json={"query": "sleep and memory", "k": 2}).status_code == 200
        worker.publisher.fail = False
        r = client.post("/events", json=[event(7)])
        assert r.status_code == 503 and "Redis" in r.json()["detail"]
