"""In-memory storage for unit tests: the same protocols as Redis and Kafka, nothing shared."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pandas as pd
from pydantic import BaseModel

from schemas import DeadLetter, LabelledExample
from services.storage.protocols import Caches, WorkerReport
from training.labels.store import Hold, Lineage, Purge, apply_holds, apply_purges, describe, frame, latest_holds, latest_revisions
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
        self.known: dict[tuple[str, str], float] = {}  # (scope, identity) -> remembered until

    def take(self, identity: str, rate_per_s: float, burst: float) -> float:
        now = self.clock()
        tokens, at = self.buckets.get(identity, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate_per_s)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / rate_per_s
        self.buckets[identity] = (tokens - 1 if wait == 0 else tokens, now)
        return wait

    def admit_identity(self, scope: str, identity: str, rate_per_s: float, burst: float, remember_s: float) -> float:
        now = self.clock()
        if self.known.get((scope, identity), -1.0) > now:
            return 0.0
        wait = self.take(f"newid:{scope}", rate_per_s, burst)
        if wait == 0:
            self.known[(scope, identity)] = now + remember_s
        return wait


class MemoryActivity:
    def __init__(self) -> None:
        self.by_minute: dict[int, Counter[str]] = {}
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


class MemoryFleet:
    def __init__(self) -> None:
        self.latest: dict[str, WorkerReport] = {}

    def report(self, report: WorkerReport) -> None:
        self.latest[report.worker] = report

    def reports(self, max_age_s: float) -> list[WorkerReport]:
        return [r for r in self.latest.values() if r.at >= time.time() - max_age_s]


class MemoryScheduleState:
    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.held = False

    def read(self) -> dict[str, str]:
        return dict(self.fields)

    def write(self, **fields: float | str) -> None:
        self.fields.update({k: str(v) for k, v in fields.items()})

    def add_failure(self) -> int:
        self.fields["failures"] = str(int(self.fields.get("failures", 0)) + 1)
        return int(self.fields["failures"])

    def try_lock(self, ttl_s: float) -> MemoryScheduleState | None:
        return None if self.held else self

    def locked(self) -> bool:
        return self.held

    def __enter__(self) -> MemoryScheduleState:
        self.held = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.held = False


class MemoryLabelStore:
    """Labels in a list, every write a version: unit tests and the benchmark's skyline."""

    uri = "memory://"

    def __init__(self, labels: list[LabelledExample] | None = None):
        self.rows: list[dict] = [lab.model_dump(mode="json") for lab in labels or []]
        self.writes: list[int] = [len(self.rows)] if self.rows else []  # rows after each write
        self.positions: dict[str, int] = {}
        self._purges: list[Purge] = []
        self._holds: list[Hold] = []

    def write(self, labels: list[LabelledExample], positions: dict[str, int]) -> bool:
        if positions and all(self.positions.get(src, -1) >= last for src, last in positions.items()):
            return False
        self.rows += [lab.model_dump(mode="json") for lab in labels]
        self.positions.update(positions)
        self.writes.append(len(self.rows))
        return True

    def stored_revisions(self, labels: list[LabelledExample], since: float) -> set[tuple[str, int]]:
        ids = {lab.label_id for lab in labels}
        return {(r["label_id"], r["revision"]) for r in self.rows if r["label_id"] in ids and r["timestamp"] >= since}

    def stored_offset(self, source: str) -> int | None:
        return self.positions.get(source)

    def read(self, version: int | None = None) -> tuple[pd.DataFrame, Lineage]:
        rows = self.rows if version is None else self.rows[: self.writes[version]]
        df = apply_purges(latest_revisions(frame(rows)), self._purges) if rows else frame([])
        df, held = apply_holds(df, self.holds())
        lineage = {**describe(df), "contributions": len(rows), "purges": len(self._purges), "held": held}
        return df, {**lineage, "table_version": self.version()}

    def count(self) -> int:
        return len(self.rows)

    def version(self) -> int | None:
        return len(self.writes) - 1 if self.writes else None

    def files(self) -> int:
        return len(self.writes)

    def compact(self) -> dict[str, int]:
        before, files = len(self.rows), len(self.writes)
        self.rows = latest_revisions(frame(self.rows)).to_dict("records") if self.rows else []
        self.writes.append(len(self.rows))
        return {"files_before": files, "files_after": 1, "rows_removed": before - len(self.rows)}

    def purges(self) -> list[Purge]:
        return list(self._purges)

    def purge(self, purge: Purge, count: bool = True) -> int:
        before = len(self.read()[0]) if count else 0
        self._purges.append(purge)
        return before - len(self.read()[0]) if count else 0

    def holds(self) -> list[Hold]:
        return latest_holds(self._holds)

    def hold(self, hold: Hold) -> None:
        self._holds.append(hold)


class MemoryDeadLetterLog:
    """What a `MemoryPublisher` holds on the dead-letter topic, read back as the Kafka log reads it."""

    def __init__(self, publisher: MemoryPublisher, topic: str):
        self.publisher, self.topic = publisher, topic

    def newest(self, per_partition: int) -> list[DeadLetter]:
        return [DeadLetter.model_validate_json(p) for p in self.publisher.on(self.topic)[-per_partition:]]


def memory_caches() -> Caches:
    return Caches(
        MemoryRankCache(),
        MemoryEmbeddingCache(),
        MemorySeenEvents(),
        lambda: True,
        MemoryRateLimiter(),
        MemoryActivity(),
        MemoryFleet(),
    )
