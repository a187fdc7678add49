"""The stream's join as an object: `JoinProcessor` holds what a stream worker keeps between messages and
applies the pure functions of `join.py` to a batch at a time. It knows nothing of faust: `app.py`
hands it plain `Message`s, a table to keep request states in, and an `Outputs` for what leaves the
worker; so it runs, and is tested, without a broker.

- Exactly once into the label table: each batch's labels are one transaction of the label store that
  also records, per input partition, the last offset joined. After a crash the messages up to that
  offset are joined again to rebuild state; their labels are written only if missing (the replay may
  read the two topics in another order than the first pass: a label it makes may be one the first pass
  never made, and a revision names one content either way). Dead letters are at least once.
  Order per batch: dead letters sent, labels committed, table written, then the caller acknowledges.
- Expiry: a tick per partition makes the join sweep that partition's requests that are due
  (`ExpiryIndex`), by the partition's stream time, a watermark over the two input topics.
- A click burst (`ClickBursts`) is dead-lettered and its identity quarantined: a purge recorded in the
  label store, so training never sees its labels (`rankloop labels purges` lists it).
- A (query, doc) clicked far above what its positions predict by many unsigned identities
  (`anomaly.PositiveRates`) is held: a hold recorded in the label store keeps its labels out of
  training until an operator releases or purges them (`rankloop labels holds`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from schemas import CLOCK_SKEW_S, DeadLetter, LabelledExample
from services.keys import Keys
from services.online import request_counts
from services.storage import Activity
from services.stream.anomaly import PositiveRates
from services.stream.join import Burst, ClickBursts, ExpiryIndex, Kind, RequestState, step, sweep
from training.labels.rules import LabelRules
from training.labels.store import Hold, LabelStore, Purge, label_source

log = logging.getLogger("rankloop.stream")
Partition = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True)
class Message:
    """What the join needs of one Kafka record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: float | None  # the broker's time of the record (seconds)


class RequestTable(Protocol):
    """Request states (JSON) by request id, changelogged to the partition their request came in on, so
    the worker that takes that partition over recovers them (`app.FaustRequestTable`; a dict in tests)."""

    def get(self, key: str) -> bytes | None: ...
    def items(self) -> Iterable[tuple[str, bytes | None]]: ...
    def put(self, key: str, value: bytes, partition: int) -> None: ...
    def remove(self, key: str, partition: int) -> None: ...
    def __contains__(self, key: object) -> bool: ...


class Outputs(Protocol):
    """Where a batch's results go besides the label store: the dead-letter topic (sent and flushed
    before the labels commit: a crash repeats them, never loses them) and the table's changelog
    (flushed before the batch is acknowledged)."""

    async def send_dead(self, dead: list[DeadLetter]) -> None: ...
    async def flush(self) -> None: ...


class JoinMetrics(Protocol):
    """What the processor counts (`app.StreamMetrics` on Prometheus; anything with these in tests)."""

    def joined(self, topic: str) -> None: ...
    def labelled(self, n: int) -> None: ...
    def dead_lettered(self, code: str) -> None: ...
    def burst(self) -> None: ...
    def held(self) -> None: ...
    def online(self, version: str, name: str, n: float) -> None: ...


@dataclass
class JoinConfig:
    keys: Keys
    rules: LabelRules
    window_s: float
    burst_limit: int
    burst_window_s: float
    anomaly: tuple[float, float, int, int] = (3600.0, 5.0, 20, 0)  # window_s, ratio, min_positives, min_identities (0: off)


@dataclass
class JoinProcessor:
    """One stream worker's join (see the module's docstring)."""

    cfg: JoinConfig
    store: LabelStore
    requests: RequestTable
    outputs: Outputs
    metrics: JoinMetrics
    activity: Activity
    topic_id: Callable[[str], str]  # the broker's id of a topic (blocking: called in a thread, once per topic)
    highwater: Callable[[str, int], int | None] = lambda topic, partition: None  # the broker's end of a partition
    live: dict[str, RequestState] = field(default_factory=dict)  # this worker's request states as objects
    deadlines: ExpiryIndex = field(default_factory=ExpiryIndex)
    joined: dict[Partition, int] = field(default_factory=dict)  # the last offset joined, for lag and stream time
    resumed: dict[Partition, int] = field(default_factory=dict)  # the last offset done before this worker took it
    clock: dict[Partition, float] = field(default_factory=dict)  # the broker time of the latest message joined
    counts: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # for the status page
    online: defaultdict[str, defaultdict[str, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    topic_ids: dict[str, str] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)  # label source -> the last offset whose labels are stored
    owning: asyncio.Lock = field(default_factory=asyncio.Lock)  # a batch and a rebalance never interleave

    def __post_init__(self) -> None:
        self.bursts = ClickBursts(self.cfg.burst_limit, self.cfg.burst_window_s)
        self.quarantined = {p.identity for p in self.store.purges() if p.whole_identity}
        self.rates = PositiveRates(*self.cfg.anomaly, examination=self.cfg.rules.examination)
        self.rates.flagged |= {(h.query, h.doc_id) for h in self.store.holds()}  # held, released or purged: decided once

    # ---- one batch -----------------------------------------------------------------------
    async def join_batch(self, batch: Iterable[Message], owned: set[Partition], now: float | None = None) -> None:
        """Joins a batch: dead letters sent, then its labels stored in one transaction with the offsets
        they cover, then each changed request written to the table once and flushed. A message of a
        partition this worker no longer owns (buffered before a rebalance) is left to its new owner."""
        keys, window = self.cfg.keys, self.cfg.window_s
        now = now or time.time()
        changed: dict[str, RequestState] = {}
        forgotten: set[str] = set()
        labels: list[LabelledExample] = []
        replay_labels: list[LabelledExample] = []  # from messages joined before a crash: stored unless already
        dead: list[DeadLetter] = []
        positions: dict[str, int] = {}
        for msg in batch:
            if (msg.topic, msg.partition) not in owned:
                self.counts["left_to_new_owner"] += 1
                continue
            if msg.topic == keys.stream_ticks:
                dead += self.expire(msg.partition, now, forgotten)
                continue
            kind: Kind = "impression" if msg.topic == keys.impressions else "interaction"
            source = await self.source(msg.topic, msg.partition)
            replayed = msg.offset <= await self.stored_offset(source)  # its labels are in the table already
            key = (msg.key or b"").decode(errors="replace")
            # the broker's time of the message: lag in the stream never makes an event late, and a
            # replay after a restart decides as the first pass did
            when = msg.timestamp or now
            result = step(self.load(key), msg.topic, kind, msg.value, self.cfg.rules, window, when, self.bursts, self.rates)
            if result.state is not None and key:
                result.state.partition = msg.partition
                self.live[key] = changed[key] = result.state
                forgotten.discard(key)
                self.deadlines.push(msg.partition, result.state.forget_after(window), key)
            self.joined[(msg.topic, msg.partition)] = msg.offset
            self.clock[(msg.topic, msg.partition)] = max(self.clock.get((msg.topic, msg.partition), 0.0), when)
            dead += result.dead
            if replayed:
                self.counts["replayed"] += 1
                replay_labels += result.labels
                continue
            positions[source] = msg.offset
            self.counts[f"{kind}s"] += 1
            self.counts["duplicates"] += result.repeated
            self.metrics.joined(msg.topic)
            for burst in result.bursts:
                self.quarantine(burst)
            for hold in result.holds:
                self.hold(hold)
            labels += result.labels
        await self.outputs.send_dead(dead)
        for d in dead:
            self.metrics.dead_lettered(d.code.value)
            self.counts[f"dead:{d.code.value}"] += 1
        if labels or replay_labels:
            labels = await self.store_labels(labels, replay_labels, positions)
        self.counts["labels"] += len(labels)
        self.metrics.labelled(len(labels))
        for key, state in changed.items():
            if key not in forgotten and state.partition is not None:
                self.requests.put(key, state.model_dump_json().encode(), state.partition)
        # the table's changelog on the broker before the batch is acknowledged: a worker that takes
        # these partitions over (after a rebalance or a kill) recovers every state the labels came from
        await self.outputs.flush()

    def load(self, key: str) -> RequestState | None:
        if key in self.live:
            return self.live[key]
        value = self.requests.get(key) if key else None
        return RequestState.model_validate_json(value) if value else None

    async def source(self, topic: str, partition: int) -> str:
        """The name under which the label store records how far it holds a partition's labels."""
        if topic not in self.topic_ids:
            self.topic_ids[topic] = await asyncio.to_thread(self.topic_id, topic)
        return label_source(topic, self.topic_ids[topic], partition)

    async def stored_offset(self, source: str) -> int:
        """Cached: only this worker writes its partitions' labels."""
        if source not in self.stored:
            found = await asyncio.to_thread(self.store.stored_offset, source)
            self.stored[source] = -1 if found is None else found
        return self.stored[source]

    def quarantine(self, burst: Burst) -> None:
        """Every label of a bursting identity, past and future, leaves training (once per identity)."""
        self.metrics.burst()
        if burst.identity in self.quarantined:
            return
        reason = burst.reason(self.bursts.limit)
        self.store.purge(Purge(identity=burst.identity, reason=reason, actor="stream", at=time.time()), count=False)
        self.quarantined.add(burst.identity)
        log.warning("%s", reason)

    def hold(self, hold: Hold) -> None:
        """A (query, doc) under attack: its labels stay out of training until an operator decides."""
        self.metrics.held()
        self.store.hold(hold)
        log.warning("%s (hold %s; `rankloop labels holds`)", hold.reason, hold.hold_id)

    async def store_labels(
        self, labels: list[LabelledExample], replay_labels: list[LabelledExample], positions: dict[str, int]
    ) -> list[LabelledExample]:
        """Retries until stored (acknowledging the batch without its labels would lose them); returns
        what it wrote: `labels` and the replay's labels that were missing."""
        for attempt in itertools.count():
            try:
                missing = await asyncio.to_thread(self.not_stored, replay_labels)
                if not labels and not missing:
                    return []  # a replay whose labels are all stored: no empty commit
                await asyncio.to_thread(self.store.write, labels + missing, positions)
                self.stored.update(positions)
                return labels + missing
            except Exception as e:
                log.error("labels not stored (attempt %d), retrying: %s", attempt + 1, e)
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def not_stored(self, replay_labels: list[LabelledExample]) -> list[LabelledExample]:
        """The labels of replayed messages the store lacks (this worker alone writes its partitions'
        labels: the read cannot race a write). A label's rows are never older than its impression."""
        if not replay_labels:
            return []
        since = min(lab.timestamp for lab in replay_labels) - self.cfg.window_s - CLOCK_SKEW_S
        have = self.store.stored_revisions(replay_labels, since)
        return [lab for lab in replay_labels if (lab.label_id, lab.revision) not in have]

    # ---- expiry ----------------------------------------------------------------------------
    def done(self, topic: str, partition: int) -> int | None:
        """The last offset of a partition joined here, or done before this worker took it (None: not known)."""
        return self.joined.get((topic, partition), self.resumed.get((topic, partition)))

    def stream_time(self, partition: int, now: float) -> float:
        """What the sweep calls now: the clock while the partition's two topics are caught up, else the
        time of the latest message joined from the one that lags most, so a stream that lags never
        forgets a request whose events (or impression) are still queued: they would be dead-lettered
        as unknown. (A watermark: the minimum over the inputs.)"""
        times = [now]
        for topic in (self.cfg.keys.impressions, self.cfg.keys.interactions):
            done, end = self.done(topic, partition), self.highwater(topic, partition)
            if end is None or (end and (done is None or done + 1 < end)):
                times.append(self.clock.get((topic, partition), 0.0))  # lagging, or not known yet: nothing is due
        return min(times)

    def expire(self, partition: int, now: float, forgotten: set[str]) -> list[DeadLetter]:
        """The requests of `partition` whose deadline passed by its stream time, swept; the first
        tick after a start or a rebalance indexes the partition's requests once."""
        window = self.cfg.window_s
        now = self.stream_time(partition, now)
        if not self.deadlines.knows(partition):
            for key, value in list(self.requests.items()):
                state = RequestState.model_validate_json(value) if value else None
                if state is not None and state.partition == partition:
                    self.deadlines.push(partition, state.forget_after(window), key)
            self.deadlines.mark_known(partition)
        dead: list[DeadLetter] = []
        for key in self.deadlines.due(partition, now):
            state = self.load(key)
            if state is None:
                continue
            forget, letters = sweep(state, now, window, self.cfg.keys.interactions, self.cfg.rules)
            dead += letters
            if forget:
                if per_version := request_counts(state):  # what users did with the version's ranking
                    version, seen = per_version
                    for name, n in seen.items():
                        self.online[version][name] += n
                        self.metrics.online(version, name, n)
                self.live.pop(key, None)
                forgotten.add(key)
                if key in self.requests:
                    self.requests.remove(key, partition)
            else:
                self.deadlines.push(partition, state.forget_after(window), key)
        return dead

    # ---- ownership and reporting -------------------------------------------------------------
    async def revoked(self) -> None:
        """Waits for the batch in hand to be stored; then another worker may own these requests:
        their state is read from the table again, the stored offsets from the label store."""
        async with self.owning:
            self.live.clear()
            self.deadlines.clear()
            self.topic_ids.clear()
            self.stored.clear()
            self.joined.clear()  # how far a partition is joined: from its committed offset when it comes back

    def assigned(self, committed: dict[Partition, int]) -> None:
        """The consumer group's committed offsets (the next offset to read) of the partitions this
        worker now owns: a partition nothing new arrives on after a restart is caught up, not lagging."""
        self.resumed = {tp: offset - 1 for tp, offset in committed.items()}

    def report(self) -> None:
        """Activity counts to the shared store (the status page), then forgotten here."""
        if self.counts:
            self.activity.count(dict(self.counts))
            self.counts.clear()
        if self.online:
            self.activity.count_online({version: dict(c) for version, c in self.online.items()})
            self.online.clear()

    def lag(self, partitions: Iterable[Partition], position: Callable[[Partition], int | None]) -> dict[str, int]:
        """Per input topic: the broker's end minus what this worker has joined (`position`: where the
        consumer stands on a partition nothing was joined from yet)."""
        out = {self.cfg.keys.impressions: 0, self.cfg.keys.interactions: 0}
        for topic, partition in partitions:
            if topic not in out:
                continue
            done = self.done(topic, partition)
            upto = done + 1 if done is not None else position((topic, partition))
            end = self.highwater(topic, partition)
            if upto is not None and end is not None:
                out[topic] += max(0, end - upto)
        return out
