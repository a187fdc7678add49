"""What became of refused events: the dead-letter topic read back, filtered, newest first.

One source for everyone who asks: `GET /dead-letters` (an emitter, for its own events),
`rankloop dead-letters` (an operator) and the status page all read the topic the stream writes,
`<deployment>.dead-letters`, from its end backwards (`newest` per partition), so a read costs the
same however long the topic's retention is, and answers within a few seconds or says the broker is
down.
"""

from __future__ import annotations

import json
import time
from typing import Protocol

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from pydantic import BaseModel, Field, ValidationError

from schemas import DeadLetter, DependencyUnavailable
from services.storage.kafka import HOW_TO_START

NEWEST = 10_000  # per partition: how far back a read looks


class DeadLetterLog(Protocol):
    """The dead-letter topic, read back (`KafkaDeadLetterLog`; `MemoryDeadLetterLog` in unit tests)."""

    def newest(self, per_partition: int) -> list[DeadLetter]:
        """The last `per_partition` dead letters of each partition; raises DependencyUnavailable when
        the broker cannot be reached."""


class DeadLetterQuery(BaseModel):
    """Which dead letters to show (every filter set must match)."""

    request_id: str | None = None
    since: float | None = Field(None, description="unix seconds, server time")
    code: str | None = Field(None, description="a reject code, e.g. late_event")
    api_key: str | None = Field(None, description="only events this key (by name) sent")
    limit: int = Field(100, ge=1)

    def matches(self, dead: DeadLetter) -> bool:
        if self.since is not None and dead.timestamp < self.since:
            return False
        if self.code is not None and dead.code.value != self.code:
            return False
        if self.request_id is None and self.api_key is None:
            return True
        try:
            payload = json.loads(dead.payload)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return False  # unreadable: nothing ties it to a request or a key
        return (self.request_id is None or payload.get("request_id") == self.request_id) and (
            self.api_key is None or payload.get("api_key") == self.api_key
        )


def find_dead_letters(log: DeadLetterLog, query: DeadLetterQuery) -> list[DeadLetter]:
    """The newest dead letters matching `query`, newest first."""
    found = [d for d in log.newest(NEWEST) if query.matches(d)]
    found.sort(key=lambda d: d.timestamp, reverse=True)
    return found[: query.limit]


class KafkaDeadLetterLog:
    """Reads within about `timeout_s`, or raises DependencyUnavailable."""

    def __init__(self, bootstrap: str, topic: str, timeout_s: float = 8.0):
        self.bootstrap, self.topic, self.timeout_s = bootstrap, topic, timeout_s

    def newest(self, per_partition: int) -> list[DeadLetter]:
        return read_newest(self.bootstrap, self.topic, per_partition, self.timeout_s)


def read_newest(bootstrap: str, topic: str, newest: int, timeout_s: float) -> list[DeadLetter]:
    """The last `newest` messages of each partition of `topic` that parse as dead letters."""
    deadline = time.monotonic() + timeout_s
    down = f"Kafka at {bootstrap} is not reachable: {HOW_TO_START}"
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            bootstrap_timeout_ms=int(timeout_s * 1000 / 2),
            request_timeout_ms=int(timeout_s * 1000),
            session_timeout_ms=int(timeout_s * 500),  # no group is joined; kafka-python wants it below the request timeout
            heartbeat_interval_ms=int(timeout_s * 100),
        )
    except KafkaError as e:
        raise DependencyUnavailable(f"{down} ({type(e).__name__})") from e
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []  # no dead letter was ever written
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends, starts = consumer.end_offsets(tps), consumer.beginning_offsets(tps)
        for tp in tps:
            consumer.seek(tp, max(starts[tp], ends[tp] - newest))
        out: list[DeadLetter] = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise DependencyUnavailable(f"reading {topic} from Kafka at {bootstrap} took over {timeout_s:.0f}s")
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    try:
                        out.append(DeadLetter.model_validate_json(record.value))
                    except ValidationError:
                        continue  # not a dead letter (the topic is the stream's; nothing else should write it)
        return out
    except KafkaError as e:
        raise DependencyUnavailable(f"{down} ({type(e).__name__}: {e})") from e
    finally:
        consumer.close()
