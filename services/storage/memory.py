"""In-memory storage for unit tests: the same protocols as Redis and Kafka, nothing shared."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from pydantic import BaseModel

from services.storage import Caches
from training.ranking.reranker import MemoryEmbeddingCache


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
    """Records what was published; `fail` makes every later publish fail (a broker outage)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []
        self.fail = False

    def publish(self, topic: str, key: str, event: BaseModel | str) -> Future | None:
        future: Future = Future()
        if self.fail:
            future.set_exception(ConnectionError("broker unavailable"))
            return future
        self.sent.append((topic, key, event if isinstance(event, str) else event.model_dump_json()))
        future.set_result(None)
        return future

    def on(self, topic: str) -> list[str]:
        return [payload for t, _, payload in self.sent if t == topic]

    def flush(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        pass


def memory_caches() -> Caches:
    return Caches(MemoryRankCache(), MemoryEmbeddingCache(), MemorySeenEvents(), lambda: True)
