"""The storage protocols every process codes against, and the small models they carry. Adapters:
`redis.py`, `kafka.py`, `delta.py`, `memory.py`; `services.storage` opens one by URL."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from training.ranking.embedding_cache import EmbeddingCache


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

    def admit_identity(self, scope: str, identity: str, rate_per_s: float, burst: float, remember_s: float) -> float:
        """An identity `scope` brought before passes (0.0); a new one takes a token of the scope's
        new-identity bucket and is remembered for `remember_s`, else the seconds until a token is free.
        Raises DependencyUnavailable when the shared store is down."""


class Activity(Protocol):
    """Counts per minute shared by every process and replica (events accepted, labels written, dead
    letters by reason) and per model version: what the status page and the version's MLflow tags
    read. Best effort: a write that fails is logged, never raised, so it cannot fail a request or the
    stream."""

    def count(self, counts: dict[str, int], at: float | None = None) -> None: ...
    def minutes(self, last: int, now: float | None = None) -> list[tuple[int, dict[str, int]]]:
        """(minute, counts) for the `last` minutes up to now, oldest first, zeros included."""

    def count_online(self, counts: dict[str, dict[str, float]]) -> None:
        """Adds per model version counts of what users did with its rankings (`services.online`)."""

    def online(self, version: str) -> dict[str, float]:
        """A version's online counts so far."""


class Publisher(Protocol):
    """Events onto topics (see `kafka.KafkaPublisher`)."""

    @property
    def healthy(self) -> bool:
        """The last attempt to reach the broker worked."""

    @property
    def last_error(self) -> str | None: ...
    @property
    def dropped(self) -> int:
        """Buffered events lost because the buffer was full."""

    def publish(self, topic: str, key: str, event: BaseModel | str) -> Future | None:
        """Now: a future that resolves once the broker has the event, or None if it could not be handed over."""

    def publish_later(self, topic: str, key: str, event: BaseModel | str) -> bool:
        """Buffered and retried through outages; False when the buffer is full (counted in `dropped`)."""

    @property
    def buffered(self) -> int: ...
    def flush(self, timeout: float) -> None: ...
    def close(self, timeout: float = 5.0) -> None: ...


class WorkerReport(BaseModel):
    """What a serving worker says of itself at every registry poll: what it serves, whether it is
    ready, and how often it failed to load a version. The control plane's status page shows them and
    its broken-champion watch rolls back a champion the workers keep failing to load."""

    worker: str  # host:pid
    model_version: str
    index_version: str
    status: str  # ready, behind, starting, broken (as /health/ready says)
    detail: str | None = None
    last_swap_error: str | None = None
    load_failures: dict[str, int] = {}  # version -> failed loads on this worker
    at: float


class Fleet(Protocol):
    """The serving workers' reports, shared by every replica and the control process."""

    def report(self, report: WorkerReport) -> None:
        """Best effort: a report that cannot be written is logged, never raised (serving goes on)."""

    def reports(self, max_age_s: float) -> list[WorkerReport]:
        """The reports newer than `max_age_s` (older ones are workers that stopped); raises
        DependencyUnavailable when the shared store is down."""


class TrainingLock(Protocol):
    """Held while a training runs (renewed in the background): one training at a time across replicas."""

    def __enter__(self) -> TrainingLock: ...
    def __exit__(self, *exc: object) -> None: ...


class ScheduleState(Protocol):
    """The scheduler's counters (last_labels, last_time, last_run_at, last_outcome, failures,
    backoff_until, ...) and its training lock, shared so any control replica can take over."""

    def read(self) -> dict[str, str]:
        """Every counter as stored; raises DependencyUnavailable when the store is down."""

    def write(self, **fields: float | str) -> None: ...
    def add_failure(self) -> int:
        """Counts a failed run; returns the failures in a row."""

    def try_lock(self, ttl_s: float) -> TrainingLock | None:
        """The training lock if nobody holds it, else None."""

    def locked(self) -> bool:
        """Whether a training holds the lock now."""


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
    fleet: Fleet
