"""Two stream workers, one (or both: the whole stream) killed with SIGKILL mid-run and restarted: every
accepted event ends in a label or a dead letter, and no (label_id, revision) is stored twice. In the
first case a third of the requests' events are posted to a serving worker's `POST /events`, the rest
sent to Kafka as the SDK does. (`rankloop bench stream` measures the same at scale, with throughput
and freshness; this test drives the product directly.)

Known on the local Tansu broker (memory storage, 0.6.0), about one run in five: a worker owns
partitions that hold messages and never consumes them (most likely faust's table recovery never
ends, leaving them paused), before or after the kill; Tansu also reports end offsets below the last
record (the last batch's base offset). That case is an expected failure naming the partitions, not a
pass; anything else lost, or anything stored twice, fails."""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter

import httpx
import pytest

from services.config import KafkaSettings, RedisSettings, ServingSettings, Settings, StreamSettings
from services.dead_letters import KafkaDeadLetterLog
from services.local import infra
from services.local.workers import settle_labels, spawn, stop, worker_env
from services.serve.app import build_worker, create_app
from services.storage.delta import DeltaLabelStore
from services.storage.kafka import committed_offsets, end_offsets, make_producer
from tests.conftest import free_port
from tests.integration.conftest import serve_in_thread, wait_for
from tests.unit.conftest import write_beir
from training import beir
from training.indexing import build_index

pytestmark = pytest.mark.integration
REQUESTS = 3000  # each with an impression and three interactions (click, dwell, skip)


def traffic(seed: int, http_share: float):
    """(route, request id, payload): an impression, then its interactions; 1 % of events resent, 0.5 %
    malformed (on Kafka; over HTTP an event without its type), 0.5 % on a document never shown."""
    rng = random.Random(seed)
    for i in range(REQUESTS):
        rid = uuid.UUID(int=rng.getrandbits(128)).hex
        docs = [f"d{rng.randrange(5000)}" for _ in range(10)]
        items = [{"doc_id": d, "position": p + 1, "score": 1.0 / (p + 1)} for p, d in enumerate(docs)]
        impression = {"request_id": rid, "query": f"q{rng.randrange(500)}", "user": f"u{i % 700}", "items": items,
                      "model_version": "first-stage", "index_version": "test"}  # fmt: skip
        yield "impression", rid, json.dumps(impression).encode()
        route = "http" if rng.random() < http_share else "kafka"
        clicked = rng.randrange(10)
        for doc, kind, value in (
            (docs[clicked], "click", None),
            (docs[clicked], "dwell", 60.0),
            (docs[clicked - 1], "skip", None),
        ):
            event = {"event_id": uuid.UUID(int=rng.getrandbits(128)).hex, "request_id": rid, "doc_id": doc, "type": kind,
                     "value": value}  # fmt: skip
            roll = rng.random()
            if roll < 0.005:
                bad = {k: v for k, v in event.items() if k != "type"}
                yield route, rid, json.dumps(bad).encode() if route == "http" else b'{"event_id": "' + rid.encode()
                continue
            if roll < 0.01:
                event["doc_id"] = "never-shown"
            payload = json.dumps(event).encode()
            yield route, rid, payload
            if rng.random() < 0.01:
                yield route, rid, payload  # resent unchanged


def gauge(metrics_port: int, name: str) -> int:
    """A stream worker's gauge, by its /metrics (0 when it does not answer)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0
    return next((int(float(line.split()[-1])) for line in text.splitlines() if line.startswith(f"{name} ")), 0)


def never_consumed(s: Settings) -> list[str]:
    """Input partitions holding messages on which the stream's group never committed an offset."""
    ends = end_offsets(s.kafka.address, [s.keys.impressions, s.keys.interactions])
    done = committed_offsets(s.kafka.address, s.keys.stream_app)
    return sorted(f"{topic}[{partition}]" for (topic, partition), end in ends.items() if end and (topic, partition) not in done)


@pytest.mark.parametrize("kill_all", [False, True], ids=["one-worker", "whole-stream"])
def test_killing_stream_workers_loses_nothing_and_stores_nothing_twice(tmp_path, monkeypatch, kill_all):
    for name in ("MLFLOW_TRACKING_URI", "RANKLOOP_KAFKA__BOOTSTRAP", "RANKLOOP_REDIS__URL", "RANKLOOP_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    s = Settings(
        state_dir=tmp_path,
        kafka=KafkaSettings(local_port=free_port(), partitions=4),
        redis=RedisSettings(local_port=free_port()),
        stream=StreamSettings(join_window_s=10.0, metrics_port=0),
        serving=ServingSettings(port=free_port(), explore_rate=0.0),
    )
    http_share = 0.0 if kill_all else 1 / 3
    infra.up(s)
    ports = {f"stream-{i}": free_port() for i in range(2)}
    envs = {name: worker_env(s, RANKLOOP_STREAM__METRICS_PORT=str(port)) for name, port in ports.items()}
    procs = {name: spawn(s, "stream", envs[name], label=name) for name in ports}
    server = None
    try:
        if http_share:  # a serving worker takes POST /events (a one-document index: it ranks nothing here)
            build_index(beir.load(write_beir(tmp_path / "beir")), tmp_path)
            server = serve_in_thread(s, create_app(s, build_worker(s), watch_events=False))
        store = DeltaLabelStore(s.label_store_url)
        producer = make_producer(s.kafka.address, linger_ms=20)
        topic = {"impression": s.keys.impressions, "kafka": s.keys.interactions}
        sent, posted, malformed, http_rejected = [], [], 0, Counter()
        accepted: set[str] = set()

        # both workers in the group, each with its share of the input partitions, before any traffic
        def in_group() -> bool:
            owned = [gauge(port, "rankloop_stream_partitions") for port in ports.values()]
            return min(owned) > 0 and sum(owned) == 2 * s.kafka.partitions  # impressions' and interactions'

        wait_for(in_group, 180, 1, what="both workers owning their partitions")
        killed = False
        for n, (route, rid, payload) in enumerate(traffic(seed=0, http_share=http_share)):
            if route == "http":
                posted.append(payload)
            else:
                sent.append((route, payload, producer.send(topic[route], key=rid.encode(), value=payload)))
            if len(posted) >= 200:
                answer = httpx.post(f"{s.base_url}/events", content=b"[" + b",".join(posted) + b"]", timeout=60).json()
                accepted |= set(answer["accepted"])
                http_rejected.update(r["code"] for r in answer["rejected"])
                posted = []
            if not killed and n >= REQUESTS * 4 * 0.4:  # mid-stream, with batches in hand
                victims = list(procs) if kill_all else ["stream-0"]
                for name in victims:
                    procs[name].kill()  # SIGKILL: no shutdown, no commit
                    procs[name].wait()
                for name in victims:
                    procs[name] = spawn(s, "stream", envs[name], label=name)
                killed = True
        if posted:
            answer = httpx.post(f"{s.base_url}/events", content=b"[" + b",".join(posted) + b"]", timeout=60).json()
            accepted |= set(answer["accepted"])
            http_rejected.update(r["code"] for r in answer["rejected"])
        producer.flush()
        for route, payload, future in sent:
            assert future.succeeded()  # acks=all: every send to Kafka was accepted
            if route == "kafka" and payload.endswith(b"}"):
                accepted.add(json.loads(payload)["event_id"])
            elif route == "kafka":
                malformed += 1
        try:
            settle_labels(s, store, timeout=240)
        except TimeoutError:
            if stuck := never_consumed(s):
                recovering = {name: gauge(port, "rankloop_stream_recovering") for name, port in ports.items()}
                pytest.xfail(f"{stuck}: messages no worker ever consumed; recovering: {recovering} (see the docstring)")
            raise
        dead_log = KafkaDeadLetterLog(s.kafka.address, s.keys.dead_letters, timeout_s=30)

        def lost() -> set[str]:
            """Accepted events in no label and no dead letter (requests are forgotten two windows after
            their impression: only then are the events no label used dead-lettered)."""
            labelled = {e for r in store.raw(["event_ids"]).to_pylist() for e in r["event_ids"]}
            dead = set()
            for d in dead_log.newest(10**6):
                try:
                    dead.add(json.loads(d.payload)["event_id"])
                except (ValueError, KeyError, TypeError):
                    continue
            return accepted - labelled - dead

        wait_for(lambda: not lost(), 3 * s.stream.join_window_s + 120, 2, what="every accepted event labelled or dead-lettered")
        rows = store.raw(["label_id", "revision"]).to_pylist()
        assert len(rows) == len({(r["label_id"], r["revision"]) for r in rows})  # nothing stored twice
        dead = dead_log.newest(10**6)
        codes = Counter(d.code.value for d in dead)
        assert codes["invalid_event"] >= malformed > 0 and codes["doc_not_shown"] > 0
        assert len(rows) > len(accepted)  # each click also labels the documents above it
        # what POST /events refused was told to the client: resent copies and events without their type
        assert set(http_rejected) == (set() if kill_all else {"duplicate_event", "invalid_event"})
    finally:
        if server is not None:
            server.should_exit = True
        stop(procs)
        infra.down(s)
