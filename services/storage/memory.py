"""In-memory storage for unit tests: the same protocols as Redis and Kafka, nothing shared."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pydantic import BaseModel

from services.storage import Caches
from training.ranking.embedding_cache import MemoryEmbeddingCache


class MemoryRankCache:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str) -> Any | None:
        return self.values.get(key)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value


class MemorySeenEvents:
    def __init__(self) -> None:
        self.ids: set[str] = set()

    def first_sighting(self, event_id: str) -> bool:
        if event_id in self.ids:
            return False
        self.ids.add(event_id)
        return True

    def forget(self, event_id: str) -> None:
        self.ids.discard(event_id)


class MemoryPublisher:
    """Records what was published. `fail = True` is a broker outage: `publish` fails and
    `publish_later` holds events until `fail` is cleared and `drain` is called."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.pending: list[tuple[str, str, str]] = []
        self.capacity = capacity
        self.fail = False
        self.dropped = 0
        self.last_error: str | None = None

    @property
    def healthy(self) -> bool:
        return not self.fail

    @property
    def buffered(self) -> int:
        return len(self.pending)

    def publish(self, topic: str, key: str, event: BaseModel | str) -> Future | None:
        future: Future = Future()
        if self.fail:
            future.set_exception(ConnectionError("broker unavailable"))
            return future
        self.sent.append((topic, key, event if isinstance(event, str) else event.model_dump_json()))
        future.set_result(None)
        return future

    def publish_later(self, topic: str, key: str, event: BaseModel | str) -> bool:
        if len(self.pending) >= self.capacity:
            self.dropped += 1
            return False
        self.pending.append((topic, key, event if isinstance(event, str) else event.model_dump_json()))
        self.drain()
        return True

    def drain(self) -> None:
        if not self.fail:
            self.sent += self.pending
            self.pending = []

    def on(self, topic: str) -> list[str]:
        return [payload for t, _, payload in self.sent if t == topic]

    def flush(self, timeout: float) -> None:
        pass

    def close(self, timeout: float = 5.0) -> None:
        self.drain()


class MemoryRateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # identity -> (tokens, at)

    def take(self, identity: str, rate_per_s: float, burst: float) -> float:
        now = self.clock()
        tokens, at = self.buckets.get(identity, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate_per_s)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / rate_per_s
        self.buckets[identity] = (tokens - 1 if wait == 0 else tokens, now)
        return wait


class MemoryActivity:
    def __init__(self) -> None:
        self.by_minute: dict[int, Counter[str]] = {}
        self.dead: list[dict] = []
        self.by_version: dict[str, Counter[str]] = {}

    def count_online(self, counts: dict[str, dict[str, float]]) -> None:
        for version, fields in counts.items():
            self.by_version.setdefault(version, Counter()).update(fields)

    def online(self, version: str) -> dict[str, float]:
        return dict(self.by_version.get(version, {}))

    def count(self, counts: dict[str, int], at: float | None = None) -> None:
        self.by_minute.setdefault(int((at or time.time()) // 60), Counter()).update(counts)

    def minutes(self, last: int, now: float | None = None) -> list[tuple[int, dict[str, int]]]:
        end = int((now or time.time()) // 60)
        return [(m, dict(self.by_minute.get(m, {}))) for m in range(end - last + 1, end + 1)]

    def keep_dead_letters(self, dead: list[dict]) -> None:
        self.dead[:0] = reversed(dead)

    def dead_letters(self, limit: int = 10_000) -> list[dict]:
        return self.dead[:limit]


def memory_caches() -> Caches:
    return Caches(
        MemoryRankCache(), MemoryEmbeddingCache(), MemorySeenEvents(), lambda: True, MemoryRateLimiter(), MemoryActivity()
    )
