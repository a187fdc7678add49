"""Serving through real outages: a broker restart loses no impression and needs no serve restart;
with Redis stopped /rank answers and /events says 503 with the reason."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from services.config import KafkaSettings, RedisSettings, ServingSettings, Settings
from services.local import infra
from services.serve.app import build_worker, create_app
from services.storage.kafka import read_topic
from tests.conftest import free_port
from tests.integration.conftest import serve_in_thread, wait_for
from training import beir
from training.indexing import build_index

pytestmark = pytest.mark.integration


@pytest.fixture()
def serving(tmp_path, small_dataset):
    s = Settings(
        state_dir=tmp_path,
        kafka=KafkaSettings(local_port=free_port()),
        redis=RedisSettings(local_port=free_port()),
        serving=ServingSettings(port=free_port(), champion_poll_s=60),
    )
    infra.up(s)
    build_index(beir.load(small_dataset), tmp_path)
    worker = build_worker(s)
    server = serve_in_thread(s, create_app(s, worker))
    yield s, worker
    server.should_exit = True
    infra.down(s)


def hammer(s: Settings, stop: threading.Event, out: list) -> None:
    with httpx.Client(base_url=s.base_url, timeout=30) as http:
        i = 0
        while not stop.is_set():
            r = http.post("/rank", json={"query": f"blood pressure and salt {i % 7}", "k": 5})
            out.append((r.status_code, r.json().get("request_id") if r.status_code == 200 else r.text))
            i += 1
            time.sleep(0.01)


def test_a_broker_restart_loses_no_impression_and_needs_no_serve_restart(serving):
    s, worker = serving
    results: list = []
    stop = threading.Event()
    thread = threading.Thread(target=hammer, args=(s, stop, results))
    thread.start()
    wait_for(lambda: len(results) >= 20, what="requests served before the outage")
    infra.stop(s, "kafka")  # returns once the process exited
    gone = len(results)
    wait_for(lambda: not worker.publisher.healthy and len(results) >= gone + 50, what="requests served while it is away")
    down = len(results)
    r = httpx.post(
        f"{s.base_url}/events", json=[{"event_id": "x1", "request_id": "r", "doc_id": "d", "type": "click"}], timeout=30
    )
    assert r.status_code == 503 and "Kafka unavailable" in r.json()["detail"]
    infra.start_kafka(s)  # memory storage: the topics are gone, the publisher recreates them
    wait_for(lambda: worker.publisher.healthy and not worker.publisher.buffered, what="the buffer drained")
    back = len(results)
    wait_for(lambda: len(results) >= back + 20 and not worker.publisher.buffered, what="requests served after it is back")
    stop.set()
    thread.join(timeout=30)
    assert worker.publisher.buffered == 0 and worker.publisher.dropped == 0
    assert all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:3]
    assert len(results) > down > 0  # requests were served while the broker was away
    # Tansu with memory storage keeps acknowledging for seconds after SIGTERM and forgets all of it
    # on restart (a broker's durability, not serving's: Kafka's acks=all is replicated). Everything
    # shown after it exited must be there, including what waited in the buffer while it was down.
    shown_after_stop = {rid for _, rid in results[gone + 10 :]}
    logged = {e["request_id"] for e in read_topic(s.kafka.address, s.keys.impressions)}
    assert shown_after_stop - logged == set()
    # recreated with its partition count, not the broker's default: the stream's join needs co-partitioning
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=s.kafka.address)
    assert consumer.partitions_for_topic(s.keys.impressions) == set(range(s.kafka.partitions))
    consumer.close()
    # the event refused while the broker was away is accepted when retried: nothing of it was kept
    r = httpx.post(
        f"{s.base_url}/events", json=[{"event_id": "x1", "request_id": "r", "doc_id": "d", "type": "click"}], timeout=30
    )
    assert r.status_code == 200 and r.json()["accepted"] == ["x1"]


def test_with_redis_stopped_rank_answers_and_events_say_why_not(serving):
    s, _ = serving
    infra.stop(s, "redis")
    r = httpx.post(f"{s.base_url}/rank", json={"query": "vitamin d", "k": 3}, timeout=30)
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    event = {"event_id": "y1", "request_id": "r", "doc_id": "d", "type": "click"}
    r = httpx.post(f"{s.base_url}/events", json=[event], timeout=30)
    assert r.status_code == 503 and "Redis" in r.json()["detail"]
    ready = httpx.get(f"{s.base_url}/health/ready").json()
    assert ready["status"] == "ready" and ready["redis"] is False


def test_rate_limit_buckets_live_in_redis_and_are_shared(serving):
    from redis import Redis

    from services.storage.redis import RedisRateLimiter

    s, _ = serving
    one, other = (RedisRateLimiter(Redis.from_url(s.redis_url), s.keys) for _ in range(2))  # two replicas
    waits = [limiter.take("key:abc", 1.0, 3) for limiter in (one, other, one, other)]
    assert waits[:3] == [0.0, 0.0, 0.0] and 0 < waits[3] <= 1.0
    assert one.take("key:someone-else", 1.0, 3) == 0.0


def test_the_local_redis_keeps_the_schedulers_state_through_a_restart(serving):
    from redis import Redis

    s, _ = serving
    redis = Redis.from_url(s.redis_url)
    redis.hset(s.keys.train_state, mapping={"last_labels": 1234, "last_time": 1.5})
    lock = redis.lock(s.keys.train_lock, timeout=3600)
    assert lock.acquire(blocking=False)
    aof = s.state_dir / "redis" / "appendonly.aof"
    wait_for(lambda: aof.exists() and s.keys.train_lock.encode() in aof.read_bytes(), what="both in the append-only file")
    infra.stop(s, "redis")
    infra.start_redis(s)
    assert redis.hget(s.keys.train_state, "last_labels") == b"1234"
    assert not redis.lock(s.keys.train_lock, timeout=3600).acquire(blocking=False)  # still held: no overlap
    lock.release()


def test_the_local_redis_refuses_a_client_without_its_password(serving):
    from redis import Redis
    from redis.exceptions import AuthenticationError, ResponseError

    s, _ = serving
    assert s.redis_password_file.stat().st_mode & 0o077 == 0  # readable by its owner only
    with pytest.raises((AuthenticationError, ResponseError), match=r"(?i)auth"):
        Redis.from_url(s.redis.address).ping()
    assert Redis.from_url(s.redis_url).ping()
