"""Kafka: the event publisher, topic creation and reading a topic from the start."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.serializer import DefaultSerializer
from pydantic import BaseModel

from schemas import DependencyUnavailable

log = logging.getLogger("rankloop.kafka")
HOW_TO_START = "start the local broker with `rankloop up` or set RANKLOOP_KAFKA__BOOTSTRAP"


def make_producer(bootstrap: str, linger_ms: int = 5) -> KafkaProducer:
    """acks=all: an event counts as recorded only once every in-sync replica has it. Short timeouts:
    the caller decides what to do while the broker is away (buffer, or tell the client)."""
    try:
        return KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=linger_ms,
            retries=3,
            delivery_timeout_ms=15000,
            key_serializer=DefaultSerializer(),
            value_serializer=DefaultSerializer(),  # str or bytes
            request_timeout_ms=5000,
            max_block_ms=5000,
            # topics are created with explicit partition counts, never by a send: an auto-created topic
            # gets the broker's default count, and creating it properly afterwards lost what it held
            allow_auto_create_topics=False,
            # one request in flight: retries keep their order, and a broker never sees two writes
            # race for the same offsets (Tansu's memory engine lost acknowledged records that way)
            max_in_flight_requests_per_connection=1,
        )
    except KafkaError as e:
        raise DependencyUnavailable(f"Kafka at {bootstrap} is not reachable ({e}); {HOW_TO_START}") from e


Item = tuple[str, str, str]  # topic, key, payload


class KafkaPublisher:
    """Two ways to publish.

    - `publish`: now, with a future that resolves once the broker has the event. Interactions take
      this path, so "accepted" means durable and a failure is told to the client.
    - `publish_later`: into a bounded buffer that a background thread drains in order, retrying
      through broker outages. Impressions take this path, so ranking never waits on Kafka; what the
      buffer cannot hold is counted in `dropped`, never silently lost.

    The producer is made lazily and remade after a failure; topics that vanished (a broker that
    restarted with memory storage) are created again, with their partition counts, before it writes.
    """

    def __init__(
        self,
        bootstrap: str,
        topics: tuple[str, ...] = (),
        partitions: int = 1,
        capacity: int = 100_000,
        factory: Callable[[str], Any] = make_producer,
        retry_s: float = 0.5,
        batch: int = 500,
    ):
        self.bootstrap, self.topics, self.partitions = bootstrap, topics, partitions
        self.capacity, self.batch, self.retry_s = capacity, batch, retry_s
        self._factory = factory
        self._producer: Any = None
        self._buffer: deque[Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._failures = 0
        self.dropped = 0
        self.healthy = True
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._drain, name="kafka-publisher", daemon=True)
        self._thread.start()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def _get_producer(self) -> Any:
        """The producer; a fresh one (at start, or after a failure) only once the topics exist with
        their partition counts. Its first metadata request would otherwise let the broker create a
        missing topic with its default count (Tansu does so whatever the client asks), breaking the
        co-partitioning the stream's join relies on."""
        if self._producer is None:
            if self.topics:
                create_topics(self.bootstrap, list(self.topics), self.partitions, retries=1)
            self._producer = self._factory(self.bootstrap)
        return self._producer

    def publish(self, topic: str, key: str, event: BaseModel | str) -> Future | None:
        payload = event if isinstance(event, str) else event.model_dump_json()
        try:
            sent = self._get_producer().send(topic, key=key, value=payload)
        except (KafkaError, DependencyUnavailable) as e:
            self._failed(e)
            return None
        done: Future = Future()

        def failed(e: BaseException) -> None:
            self._failed(e)
            done.set_exception(e)

        sent.add_callback(done.set_result)
        sent.add_errback(failed)
        return done

    def publish_later(self, topic: str, key: str, event: BaseModel | str) -> bool:
        payload = event if isinstance(event, str) else event.model_dump_json()
        with self._cond:
            if len(self._buffer) >= self.capacity:
                self.dropped += 1
                return False
            self._buffer.append((topic, key, payload))
            self._cond.notify()
        return True

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._buffer and not self._closed:
                    self._cond.wait(1.0)
                    if not self.healthy and not self._buffer:
                        break  # nothing to send: probe the broker so intake learns it is back
                if self._closed and not self._buffer:
                    return
                batch = [self._buffer[i] for i in range(min(self.batch, len(self._buffer)))]
            if not batch:
                self._probe()
                continue
            remaining = self._send(batch)
            with self._cond:
                for _ in batch:
                    self._buffer.popleft()
                self._buffer.extendleft(reversed(remaining))  # what failed goes first again, in order
            if remaining:
                if self._closed:
                    return
                time.sleep(min(self.retry_s * 2 ** min(self._failures, 4), 5.0))

    def _send(self, batch: list[Item]) -> list[Item]:
        """Sends a batch; returns what the broker did not acknowledge (an unacknowledged send may
        still land, so a retry can duplicate an impression: the stream dead-letters the copy)."""
        futures: list[Any] = []
        error: BaseException | None = None
        try:
            producer = self._get_producer()
            for topic, key, payload in batch:
                futures.append(producer.send(topic, key=key, value=payload))
            producer.flush(timeout=3)
        except Exception as e:  # KafkaError, a timeout, no broker: all retried
            error = e
        acked = [f.is_done and f.succeeded() for f in futures] + [False] * (len(batch) - len(futures))
        failed = [item for item, ok in zip(batch, acked) if not ok]
        if failed:
            error = error or next((f.exception for f in futures if f.is_done and f.failed()), None)
            self._failed(error or TimeoutError("not acknowledged"))
            self._discard_producer()  # its stale copies must not race the retry when the broker is back
        else:
            self._ok()
        return failed

    def _probe(self) -> None:
        try:
            producer = self._get_producer()
            for topic in self.topics[:1]:
                if not producer.partitions_for(topic):
                    raise KafkaError(f"topic {topic} has no partitions")
            self._ok()
        except Exception as e:  # anything: the broker is not usable yet
            self._failed(e)
            self._discard_producer()
            time.sleep(self.retry_s)

    def _ok(self) -> None:
        if not self.healthy:
            log.info("Kafka at %s is back", self.bootstrap)
        self.healthy, self.last_error, self._failures = True, None, 0

    def _failed(self, exc: BaseException | None) -> None:
        self._failures += 1
        if self.healthy:
            log.error("publishing to Kafka at %s failed: %s", self.bootstrap, exc)
        self.healthy, self.last_error = False, f"{type(exc).__name__}: {exc}"

    def _discard_producer(self) -> None:
        """Drops the producer with whatever it still holds: everything unacknowledged is still in
        the buffer and is sent again by a fresh producer."""
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                producer.close(timeout=0)

    def flush(self, timeout: float) -> None:
        """Waits for what `publish` handed over; never raises (the futures tell what failed)."""
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.flush(timeout=timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stops the background thread after it sent what it could within `timeout`."""
        deadline = time.time() + timeout
        while self._buffer and self.healthy and time.time() < deadline:
            time.sleep(0.05)
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=max(0.1, deadline - time.time()))
        if self._producer is not None:
            with contextlib.suppress(Exception):
                self._producer.close(timeout=1)


def create_topics(bootstrap: str, topics: list[str], partitions: int, retries: int = 20) -> None:
    """Topics with explicit partition counts (auto-created ones would break Faust co-partitioning)."""
    last: Exception | None = None
    for _ in range(retries):
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="rankloop-admin", request_timeout_ms=5000)
            try:
                existing = set(admin.list_topics())
                new = [NewTopic(t, partitions, 1) for t in topics if t not in existing]
                if new:
                    with contextlib.suppress(TopicAlreadyExistsError):
                        admin.create_topics(new)
            finally:
                admin.close()
            return
        except KafkaError as e:
            last = e
            time.sleep(0.5)
    raise DependencyUnavailable(f"Kafka at {bootstrap} is not reachable ({last}); {HOW_TO_START}")


def read_topic(bootstrap: str, topic: str, idle_ms: int = 3000) -> Iterator[dict]:
    """Every JSON message of a topic from the beginning, until none arrives for `idle_ms`.
    Malformed payloads are skipped: they are the dead-letter topic's business."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest", consumer_timeout_ms=idle_ms
    )
    try:
        for message in consumer:
            try:
                yield json.loads(message.value)
            except ValueError:
                continue
    finally:
        consumer.close()


def message_count(bootstrap: str, topic: str) -> int:
    """Messages ever written to a topic (sum of end offsets)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        return int(sum(consumer.end_offsets(parts).values())) if parts else 0
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the offset the next message will get."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        parts = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t) or []]
        return {(tp.topic, tp.partition): int(o) for tp, o in consumer.end_offsets(parts).items()} if parts else {}
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the offset a consumer group has committed (the next it will read)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        found = admin.list_group_offsets({group: None}).get(group, {})
        return {(tp.topic, tp.partition): int(getattr(meta, "offset", meta)) for tp, meta in found.items()}
    finally:
        admin.close()


def topic_id(bootstrap: str, topic: str) -> str:
    """The broker's id of a topic: it changes when the topic is made anew (a memory broker restarted),
    while its offsets start again at 0."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="rankloop-admin", request_timeout_ms=5000)
    try:
        found = admin.describe_topics([topic])
        return str(found[0].get("topic_id") or "") if found else ""
    finally:
        admin.close()
