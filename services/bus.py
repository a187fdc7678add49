"""Kafka producers and the Redis caches used by the serving worker and the SDK."""

from __future__ import annotations

import hashlib
import json
import logging
import threading

import numpy as np
import pandas as pd
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError
from kafka.serializer import DefaultSerializer
from pydantic import BaseModel
from redis import Redis

from services.infra import InfraError
from training.dataset import normalise_query

log = logging.getLogger("rankloop.bus")


def make_producer(bootstrap: str, acks="all", linger_ms: int = 5) -> KafkaProducer:
    try:
        return KafkaProducer(
            bootstrap_servers=bootstrap, acks=acks, linger_ms=linger_ms, retries=5,
            key_serializer=DefaultSerializer(), value_serializer=DefaultSerializer(),  # str or bytes
            request_timeout_ms=10000, max_block_ms=10000,
        )
    except KafkaError as e:
        raise InfraError(f"Kafka at {bootstrap} is not reachable ({e}); start the local broker with "
                         "`rankloop up` or set RANKLOOP_KAFKA_BOOTSTRAP") from e


class EventPublisher:
    """Fire-and-forget publishing whose failures are counted and logged, never silent."""

    def __init__(self, producer: KafkaProducer, on_error=None):
        self.producer = producer
        self.failures = 0
        self._lock = threading.Lock()
        self.on_error = on_error

    def publish(self, topic: str, key: str, event: BaseModel | str):
        payload = event if isinstance(event, str) else event.model_dump_json()
        try:
            future = self.producer.send(topic, key=key, value=payload)
        except KafkaError as e:
            self._failed(topic, e)
            return None
        future.add_errback(lambda e: self._failed(topic, e))
        return future

    def _failed(self, topic: str, exc: Exception) -> None:
        with self._lock:
            self.failures += 1
        log.error("failed to publish to %s: %s", topic, exc)
        if self.on_error:
            self.on_error(topic)


def query_hash(query: str) -> str:
    return hashlib.sha1(normalise_query(query).encode()).hexdigest()[:20]


class RankCache:
    """Candidates keyed by index version + query; results keyed by model version too, so a swap can
    never serve scores of the model it replaced."""

    def __init__(self, redis: Redis, ttl_s: int):
        self.redis, self.ttl = redis, ttl_s

    def get(self, key: str):
        raw = self.redis.get(key)
        return json.loads(raw) if raw else None

    def set(self, key: str, value) -> None:
        self.redis.set(key, json.dumps(value), ex=self.ttl)

    def candidates_key(self, index_version: str, query: str, k: int) -> str:
        return f"rankloop:cand:{index_version}:{k}:{query_hash(query)}"

    def results_key(self, index_version: str, model_version: str, query: str, k: int) -> str:
        return f"rankloop:res:{index_version}:{model_version}:{k}:{query_hash(query)}"


class RedisEmbeddingCache:
    """Document embeddings per model version, float16 in Redis: replicas share them and a promotion
    fills the new version's cache lazily instead of re-embedding the corpus."""

    def __init__(self, redis: Redis, ttl_s: int = 7 * 24 * 3600):
        self.redis, self.ttl = redis, ttl_s

    def _key(self, version: str, doc_id: str) -> str:
        return f"rankloop:emb:{version}:{doc_id}"

    def get_many(self, version, doc_ids):
        raws = self.redis.mget([self._key(version, d) for d in doc_ids]) if doc_ids else []
        return {d: np.frombuffer(r, dtype=np.float16).astype(np.float32) for d, r in zip(doc_ids, raws) if r}

    def put_many(self, version, vectors):
        pipe = self.redis.pipeline()
        for d, v in vectors.items():
            pipe.set(self._key(version, d), np.asarray(v, dtype=np.float16).tobytes(), ex=self.ttl)
        pipe.execute()


def impression_click_log(s) -> pd.DataFrame:
    """Every shown (query, doc, position) from the impressions topic, with whether it was clicked
    (from the interactions topic): the log a click model is estimated on."""

    def read(topic: str):
        consumer = KafkaConsumer(topic, bootstrap_servers=s.bootstrap, group_id=None, auto_offset_reset="earliest",
                                 consumer_timeout_ms=3000)
        try:
            for message in consumer:
                try:
                    yield json.loads(message.value)
                except ValueError:
                    continue  # malformed payloads are the dead-letter topic's business
        finally:
            consumer.close()

    clicked = {(e.get("request_id"), e.get("doc_id")) for e in read(s.topic_interactions) if e.get("type") == "click"}
    rows = [(imp["query"], it["doc_id"], it["position"], float((imp["request_id"], it["doc_id"]) in clicked))
            for imp in read(s.topic_impressions) for it in imp.get("items", [])]
    return pd.DataFrame(rows, columns=["query", "doc_id", "position", "clicked"])
