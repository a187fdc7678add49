"""Kafka: the event publisher, topic creation and reading a topic from the start."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.serializer import DefaultSerializer
from pydantic import BaseModel

from schemas import DependencyUnavailable

log = logging.getLogger("rankloop.kafka")
HOW_TO_START = "start the local broker with `rankloop up` or set RANKLOOP_KAFKA__BOOTSTRAP"


def make_producer(bootstrap: str, linger_ms: int = 5) -> KafkaProducer:
    """acks=all: an event counts as recorded only once every in-sync replica has it."""
    try:
        return KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            linger_ms=linger_ms,
            retries=5,
            key_serializer=DefaultSerializer(),
            value_serializer=DefaultSerializer(),  # str or bytes
            request_timeout_ms=10000,
            max_block_ms=10000,
        )
    except KafkaError as e:
        raise DependencyUnavailable(f"Kafka at {bootstrap} is not reachable ({e}); {HOW_TO_START}") from e


class KafkaPublisher:
    """Publishing whose failures are counted and logged, never silent."""

    def __init__(self, producer: KafkaProducer):
        self.producer = producer

    def publish(self, topic: str, key: str, event: BaseModel | str) -> Future | None:
        payload = event if isinstance(event, str) else event.model_dump_json()
        try:
            sent = self.producer.send(topic, key=key, value=payload)
        except KafkaError as e:
            self._failed(topic, e)
            return None
        done: Future = Future()
        sent.add_callback(lambda meta: done.set_result(meta))
        sent.add_errback(lambda e: (self._failed(topic, e), done.set_exception(e)))
        return done

    def _failed(self, topic: str, exc: BaseException) -> None:
        log.error("failed to publish to %s: %s", topic, exc)

    def flush(self, timeout: float) -> None:
        self.producer.flush(timeout=timeout)

    def close(self) -> None:
        self.producer.close(timeout=5)


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
