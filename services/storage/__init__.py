"""Storage the processes use, behind small protocols chosen by URL (as Gorse does): `redis://…` or
`memory://` for caches, a Kafka bootstrap address or `memory://` for the event publisher, a folder or
`s3://…` for the label store (a Delta Lake table). The real
implementations are in `redis.py` and `kafka.py`; `memory.py` holds the in-memory ones for unit tests.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from services.keys import Keys
from training.ranking.embedding_cache import EmbeddingCache

if TYPE_CHECKING:
    from training.labels.store import DeltaLabelStore


class RankCache(Protocol):
    """Candidates and results, JSON values under keys from `services.keys`."""

    def get(self, key: str) -> Any | None: ...
    def set(self, key: str, value: Any) -> None: ...


class SeenEvents(Protocol):
    """Event ids seen at intake, for de-duplication across requests and replicas."""

    def first_sighting(self, event_id: str) -> bool:
        """Marks the id as seen; False when it already was."""

    def forget(self, event_id: str) -> None:
        """Un-marks an id whose event was not recorded, so a retry is accepted."""


class RateLimiter(Protocol):
    """Token buckets per identity (an API key, or a client address on an open server), shared by
    every replica so the limit holds for the deployment, not per process."""

    def take(self, identity: str, rate_per_s: float, burst: float) -> float:
        """Takes one token: 0.0 when allowed, else the seconds until one is available.
        Raises DependencyUnavailable when the shared store is down."""


class Activity(Protocol):
    """Counts per minute shared by every process and replica (events accepted, labels written, dead
    letters by reason) and the newest dead letters: what the status page and emitters read. Best
    effort: a write that fails is logged, never raised, so it cannot fail a request or the stream."""

    def count(self, counts: dict[str, int], at: float | None = None) -> None: ...
    def minutes(self, last: int, now: float | None = None) -> list[tuple[int, dict[str, int]]]:
        """(minute, counts) for the `last` minutes up to now, oldest first, zeros included."""

    def keep_dead_letters(self, dead: list[dict]) -> None:
        """Keeps dead letters (`DeadLetter`s as JSON-ready dicts, oldest first) among the newest."""

    def dead_letters(self, limit: int = 10_000) -> list[dict]:
        """The newest dead letters, newest first."""

    def count_online(self, counts: dict[str, dict[str, float]]) -> None:
        """Adds per model version counts of what users did with its rankings (`services.online`)."""

    def online(self, version: str) -> dict[str, float]:
        """A version's online counts so far."""


class Publisher(Protocol):
    """Events onto topics (see `kafka.KafkaPublisher`)."""

    healthy: bool  # the last attempt to reach the broker worked
    last_error: str | None
    dropped: int  # buffered events lost because the buffer was full

    def publish(self, topic: str, key: str, event: BaseModel | str) -> Future | None:
        """Now: a future that resolves once the broker has the event, or None if it could not be handed over."""

    def publish_later(self, topic: str, key: str, event: BaseModel | str) -> bool:
        """Buffered and retried through outages; False when the buffer is full (counted in `dropped`)."""

    @property
    def buffered(self) -> int: ...
    def flush(self, timeout: float) -> None: ...
    def close(self, timeout: float = 5.0) -> None: ...


class Ping(Protocol):
    def __call__(self) -> bool: ...


@dataclass
class Caches:
    """What the serving worker keeps in shared storage."""

    ranking: RankCache
    embeddings: EmbeddingCache
    seen: SeenEvents
    ping: Ping
    limits: RateLimiter
    activity: Activity


def open_caches(url: str, keys: Keys, ttl_s: int, seen_ttl_s: int) -> Caches:
    """Caches for a storage URL: `redis://host:port/db` or `memory://`."""
    if url.startswith("memory://"):
        from services.storage.memory import memory_caches

        return memory_caches()
    from redis import Redis

    from services.storage.redis import redis_caches

    return redis_caches(Redis.from_url(url), keys, ttl_s, seen_ttl_s)


def open_activity(url: str, keys: Keys) -> Activity:
    """Activity counts for a storage URL (what a process without the serving caches uses)."""
    if url.startswith("memory://"):
        from services.storage.memory import MemoryActivity

        return MemoryActivity()
    from redis import Redis

    from services.storage.redis import RedisActivity

    return RedisActivity(Redis.from_url(url), keys)


def open_publisher(url: str, topics: list[str] | None = None, partitions: int = 1, capacity: int = 100_000) -> Publisher:
    """A publisher for a broker: a Kafka bootstrap address, or `memory://`. `topics` are recreated
    (with `partitions`) if they vanish, as on a local broker that restarted with memory storage."""
    if url.startswith("memory://"):
        from services.storage.memory import MemoryPublisher

        return MemoryPublisher()
    from services.storage.kafka import KafkaPublisher

    return KafkaPublisher(url, tuple(topics or ()), partitions, capacity)


def open_labels(url: str) -> DeltaLabelStore:
    """The label store: a Delta Lake table at a folder or an object-store URL (`s3://…`)."""
    from training.labels.store import DeltaLabelStore

    return DeltaLabelStore(url)
