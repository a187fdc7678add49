"""Storage the processes use, behind protocols chosen by URL (as Gorse does): `redis://…` or
`memory://` for the caches, the serving workers' reports and the scheduler's state; a Kafka bootstrap
address or `memory://` for the event publisher; a folder, `s3://…` or `memory://` for the label store
(a Delta Lake table); the MLflow tracking URI for the model registry. The real implementations are in
`redis.py`, `kafka.py`, `delta.py` and `training.registry`; `memory.py` holds the in-memory ones for
unit tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.keys import Keys
from services.storage.protocols import (
    Activity,
    Caches,
    Fleet,
    Ping,
    Publisher,
    RankCache,
    RateLimiter,
    ScheduleState,
    SeenEvents,
    TrainingLock,
    WorkerReport,
)

if TYPE_CHECKING:
    from services.config import Settings
    from training.labels.store import LabelStore
    from training.registry import MlflowRegistry

__all__ = [
    "Activity",
    "Caches",
    "Fleet",
    "Ping",
    "Publisher",
    "RankCache",
    "RateLimiter",
    "ScheduleState",
    "SeenEvents",
    "TrainingLock",
    "WorkerReport",
]


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


def open_schedule_state(url: str, keys: Keys) -> ScheduleState:
    """The scheduler's counters and lock for a storage URL: `redis://…` or `memory://`."""
    if url.startswith("memory://"):
        from services.storage.memory import MemoryScheduleState

        return MemoryScheduleState()
    from redis import Redis

    from services.storage.redis import RedisScheduleState

    return RedisScheduleState(Redis.from_url(url), keys)


def open_fleet(url: str, keys: Keys) -> Fleet:
    """The serving workers' reports for a storage URL (what the control process reads)."""
    if url.startswith("memory://"):
        from services.storage.memory import MemoryFleet

        return MemoryFleet()
    from redis import Redis

    from services.storage.redis import RedisFleet

    return RedisFleet(Redis.from_url(url), keys)


def open_publisher(url: str, topics: list[str] | None = None, partitions: int = 1, capacity: int = 100_000) -> Publisher:
    """A publisher for a broker: a Kafka bootstrap address, or `memory://`. `topics` are recreated
    (with `partitions`) if they vanish, as on a local broker that restarted with memory storage."""
    if url.startswith("memory://"):
        from services.storage.memory import MemoryPublisher

        return MemoryPublisher()
    from services.storage.kafka import KafkaPublisher

    return KafkaPublisher(url, tuple(topics or ()), partitions, capacity)


def open_registry(s: Settings, reader: bool = False) -> MlflowRegistry:
    """The deployment's registered model in MLflow (`mlflow.tracking_uri`, or sqlite under the state dir).
    A `reader` contacts nothing now (a serving worker starts while MLflow is away) and makes nothing;
    otherwise the experiment is made if missing. Loads MLflow, never a model: admin commands answer
    in seconds."""
    from training.registry import MlflowRegistry

    if reader:
        return MlflowRegistry.reader(s.tracking_uri, s.keys.model_name, s.versions_dir)
    return MlflowRegistry.connect(s.tracking_uri, s.artifact_dir, s.keys.model_name, s.versions_dir, s.keys.experiment)


def open_labels(url: str) -> LabelStore:
    """The label store: a Delta Lake table at a folder or an object-store URL (`s3://…`), or `memory://`."""
    if url.startswith("memory://"):
        from services.storage.memory import MemoryLabelStore

        return MemoryLabelStore()
    from services.storage.delta import DeltaLabelStore

    return DeltaLabelStore(url)
