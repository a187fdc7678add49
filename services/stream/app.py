"""The stream processor (faust-streaming): each agent is a short loop around a pure function of
`join.py`.

- `join_label` reads impressions and interactions (both keyed by request_id, co-partitioned) in
  batches, keeps one `RequestState` per request (live objects, backed by a changelogged table written
  once per changed request per batch) and applies `step` to each message.
- Exactly once into the label table: each batch's labels are one Delta transaction that also records,
  per input partition, the last offset joined. After a crash the messages up to that offset are
  joined again to rebuild state; their labels are written only if missing (the replay may read the
  two topics in another order than the first pass: a label it makes may be one the first pass never
  made, and a revision names one content either way). Dead letters are at least once.
  Order per batch: dead letters sent, labels committed, table written, offsets acknowledged.
- Expiry: a table may only change inside stream iteration, so a timer sends one tick per partition
  to a co-partitioned ticks topic and the join agent sweeps the requests that are due (`ExpiryIndex`).
- A click burst (`ClickBursts`) is dead-lettered and its identity quarantined: a purge recorded in the
  label store, so training never sees its labels (`rankloop labels purges` lists it).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator

import faust
from faust.streams import _current_event  # the context variable faust's tables read the partition from
from faust.types import TP
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas import CLOCK_SKEW_S, DeadLetter, LabelledExample
from services.config import Settings
from services.observability import serve_metrics
from services.online import request_counts
from services.storage import open_activity, open_labels
from services.storage.kafka import topic_id
from services.stream.join import Burst, ClickBursts, ExpiryIndex, RequestState, step, sweep
from training.labels.store import DeltaLabelStore, Purge, label_source

log = logging.getLogger(__name__)
REPORT_S = 2.0


def in_context_of(event: faust.EventT) -> None:
    """Makes `event` the current one for this task: a table write goes to its partition's changelog.
    Only the task's context variable: the stream's own `current_event` is what `take_events` records
    for the next message, and setting it swapped a message for an old one (lost)."""
    _current_event.set(weakref.ref(event))


class StoredOffsets:
    """How far the label table holds each input partition's labels (from the table's log, cached: only
    this worker writes its partitions), named with the topic's id so a topic made anew starts at -1."""

    def __init__(self, bootstrap: str, store: DeltaLabelStore):
        self.bootstrap, self.store = bootstrap, store
        self.ids: dict[str, str] = {}
        self.offsets: dict[str, int] = {}

    async def source(self, topic: str, partition: int) -> str:
        if topic not in self.ids:
            self.ids[topic] = await asyncio.to_thread(topic_id, self.bootstrap, topic)
        return label_source(topic, self.ids[topic], partition)

    async def offset(self, source: str) -> int:
        if source not in self.offsets:
            found = await asyncio.to_thread(self.store.stored_offset, source)
            self.offsets[source] = -1 if found is None else found
        return self.offsets[source]

    def advance(self, positions: dict[str, int]) -> None:
        self.offsets.update(positions)

    def clear(self) -> None:
        """After a rebalance: partitions may come from another worker, topics may be new."""
        self.ids.clear()
        self.offsets.clear()


class StreamMetrics:
    """What a stream worker counts, on its own Prometheus endpoint (`stream.metrics_port`)."""

    def __init__(self, host: str, port: int) -> None:
        self.registry = r = CollectorRegistry()
        self.events = Counter("rankloop_stream_events", "messages joined, by topic (rate(): events/s)", ["topic"], registry=r)
        self.lag = Gauge("rankloop_stream_lag_messages", "messages on its partitions not yet joined", ["topic"], registry=r)
        self.labels = Counter("rankloop_stream_labels", "labels (revisions) emitted", registry=r)
        self.dead_letters = Counter("rankloop_stream_dead_letters", "dead letters by reason", ["code"], registry=r)
        self.bursts = Counter("rankloop_click_bursts", "identities found sending a click burst (quarantined)", registry=r)
        self.online = Counter(
            "rankloop_online",
            "what users did with a model version's rankings, counted when a request is forgotten (services.online): "
            "requests, clicked_top_k, first_click_rr, abandoned, cites, citations_deleted, purchases, returns",
            ["version", "count"],
            registry=r,
        )
        serve_metrics(r, host, port, "stream")


def spare_the_collector() -> None:
    """Makes the garbage collector run a young collection every 50,000 allocations, not every 700.
    The join allocates many short-lived objects per message while the request states it keeps grow
    to tens of thousands: with the defaults, collections took 40 % of the join (146 against 86 µs per
    interaction over 40,000 requests; 0.60 against 0.56 CPU ms per event for a whole worker in
    `rankloop bench stream`). What is alive at start (libraries) is frozen out of its reach.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def create_app(s: Settings) -> faust.App:
    keys = s.keys
    partitions = s.kafka.partitions
    app = faust.App(
        keys.stream_app,
        broker=f"kafka://{s.kafka.address}",
        store="memory://",
        datadir=str(s.state_dir / "stream"),
        topic_partitions=partitions,
        topic_allow_declare=True,
        broker_session_timeout=s.stream.session_timeout_s,
        broker_heartbeat_interval=1,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
    )
    raw = dict(key_serializer="raw", value_serializer="raw", partitions=partitions)
    inputs = app.topic(keys.impressions, keys.interactions, keys.stream_ticks, **raw)
    ticks = app.topic(keys.stream_ticks, **raw)
    dead_topic = app.topic(keys.dead_letters, **raw)
    # values are a state's JSON, made and read by pydantic (in Rust) rather than as a dict through faust's json codec
    requests = app.Table(keys.requests_table, default=None, partitions=partitions, value_type=bytes)
    rules, window = s.stream.rules, s.stream.join_window_s
    store = open_labels(s.label_store_url)
    bursts = ClickBursts(s.stream.burst_limit, s.stream.burst_window_s)
    quarantined = {p.identity for p in store.purges() if p.whole_identity}
    metrics = StreamMetrics(s.metrics_host, s.stream.metrics_port)
    activity = open_activity(s.redis_url, keys)
    joined: dict[tuple[str, int], int] = {}  # (topic, partition) -> the last offset joined, for the lag
    ends: dict[TP, int] = {}  # the broker's end offset of each input partition, asked every REPORT_S
    clock: dict[tuple[str, int], float] = {}  # (topic, partition) -> the broker time of the latest message joined
    counts: defaultdict[str, int] = defaultdict(int)  # for the status page, written to Redis every REPORT_S
    online: defaultdict[str, defaultdict[str, float]] = defaultdict(lambda: defaultdict(float))  # per model version
    live: dict[str, RequestState] = {}  # the states of this worker's requests as objects: no parse per message
    deadlines = ExpiryIndex()  # when each request may next be forgotten, per partition: no table scan
    stored = StoredOffsets(s.kafka.address, store)

    def load(key: str) -> RequestState | None:
        if key in live:
            return live[key]
        value = requests.get(key) if key else None
        return RequestState.model_validate_json(value) if value else None

    async def send_dead(dead: list[DeadLetter]) -> None:
        for d in dead:
            await dead_topic.send(key=d.source.encode(), value=d.model_dump_json().encode())
            metrics.dead_letters.labels(d.code.value).inc()
            counts[f"dead:{d.code.value}"] += 1
        if dead:
            await app.producer.flush()  # sent before the labels commit: a crash repeats them, never loses them
            activity.keep_dead_letters([d.model_dump(mode="json") for d in dead])

    def quarantine(burst: Burst) -> None:
        """Every label of a bursting identity, past and future, leaves training (once per identity)."""
        metrics.bursts.inc()
        if burst.identity in quarantined:
            return
        reason = burst.reason(bursts.limit)
        store.purge(Purge(identity=burst.identity, reason=reason, actor="stream", at=time.time()), count=False)
        quarantined.add(burst.identity)
        log.warning("%s", reason)

    owning = asyncio.Lock()  # a batch and a rebalance never interleave

    @app.on_partitions_revoked.connect
    async def forget_live(app: faust.App, revoked: set, **kwargs: object) -> None:
        """Waits for the batch in hand to be stored; then another worker may own these requests:
        their state is read from the table again, the stored offsets from the label table."""
        async with owning:
            live.clear()
            deadlines.clear()
            stored.clear()
            joined.clear()  # how far a partition is joined: from its committed offset when it comes back

    @app.agent(inputs)
    async def join_label(stream: AsyncIterator) -> None:
        async for batch in stream.take_events(s.stream.join_batch, within=s.stream.join_flush_s):  # type: ignore[attr-defined]
            async with owning:
                await join_batch(batch)

    async def join_batch(batch: list[faust.EventT]) -> None:
        """Joins a batch of messages: dead letters sent, then its labels stored in one transaction with
        the offsets they cover, then each changed request written to the table once (and flushed). A message of a
        partition this worker no longer owns (buffered before a rebalance) is left to its new owner."""
        owned = app.consumer.assignment()
        changed: dict[str, tuple[RequestState, faust.EventT]] = {}
        forgotten: set[str] = set()
        labels: list[LabelledExample] = []
        replay_labels: list[LabelledExample] = []  # from messages joined before a crash: stored unless already
        dead: list[DeadLetter] = []
        positions: dict[str, int] = {}
        now = time.time()
        for event in batch:
            msg = event.message
            if msg.tp not in owned:
                counts["left_to_new_owner"] += 1
                continue
            if msg.topic == keys.stream_ticks:
                in_context_of(event)  # a delete goes to this partition's changelog
                dead += expire(msg.partition, now, forgotten)
                continue
            kind = "impression" if msg.topic == keys.impressions else "interaction"
            source = await stored.source(msg.topic, msg.partition)
            replayed = msg.offset <= await stored.offset(source)  # its labels are in the table already
            key = (msg.key or b"").decode(errors="replace")
            # the broker's time of the message: lag in the stream never makes an event late, and a
            # replay after a restart decides as the first pass did
            result = step(load(key), msg.topic, kind, msg.value, rules, window, msg.timestamp or now, bursts)
            if result.state is not None and key:
                result.state.partition = msg.partition
                live[key] = result.state
                changed[key] = result.state, event
                forgotten.discard(key)
                deadlines.push(msg.partition, result.state.forget_after(window), key)
            joined[(msg.topic, msg.partition)] = msg.offset
            clock[(msg.topic, msg.partition)] = max(clock.get((msg.topic, msg.partition), 0.0), msg.timestamp or now)
            dead += result.dead
            if replayed:
                counts["replayed"] += 1
                replay_labels += result.labels
                continue
            positions[source] = msg.offset
            counts[f"{kind}s"] += 1
            counts["duplicates"] += result.repeated
            metrics.events.labels(msg.topic).inc()
            for burst in result.bursts:
                quarantine(burst)
            labels += result.labels
        await send_dead(dead)
        if labels or replay_labels:
            labels = await store_labels(labels, replay_labels, positions)
        counts["labels"] += len(labels)
        metrics.labels.inc(len(labels))
        for key, (state, last) in changed.items():
            if key not in forgotten:
                in_context_of(last)  # the changelog partition: the message's
                requests[key] = state.model_dump_json().encode()
        # the table's changelog on the broker before the batch is acknowledged: a worker that takes
        # these partitions over (after a rebalance or a kill) recovers every state the labels came from
        await app.producer.flush()

    async def store_labels(
        labels: list[LabelledExample], replay_labels: list[LabelledExample], positions: dict[str, int]
    ) -> list[LabelledExample]:
        """Retries until stored (acknowledging the batch without its labels would lose them); returns
        what it wrote: `labels` and the replay's labels that were missing."""
        for attempt in itertools.count():
            try:
                missing = await asyncio.to_thread(not_stored, replay_labels)
                if not labels and not missing:
                    return []  # a replay whose labels are all stored: no empty commit
                await asyncio.to_thread(store.write, labels + missing, positions)
                stored.advance(positions)
                return labels + missing
            except Exception as e:
                log.error("labels not stored (attempt %d), retrying: %s", attempt + 1, e)
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt))

    def not_stored(replay_labels: list[LabelledExample]) -> list[LabelledExample]:
        """The labels of replayed messages the table lacks (this worker alone writes its partitions'
        labels: the read cannot race a write). A label's rows are never older than its impression."""
        if not replay_labels:
            return []
        since = min(lab.timestamp for lab in replay_labels) - window - CLOCK_SKEW_S
        have = store.stored_revisions(replay_labels, since)
        return [lab for lab in replay_labels if (lab.label_id, lab.revision) not in have]

    def resumed_from(tp: TP) -> int | None:
        """The last offset done before this worker took `tp`: its committed offset (faust's record of
        it) minus one. A partition nothing new arrives on after a restart is caught up, not lagging."""
        committed = app.consumer._committed_offset.get(tp)  # faust reads it from the broker on assignment
        return committed - 1 if committed else None

    def stream_time(partition: int, now: float) -> float:
        """What the sweep calls now: the clock while the partition's two topics are caught up, else the
        time of the latest message joined from the one that lags most, so a stream that lags never
        forgets a request whose events (or impression) are still queued: they would be dead-lettered
        as unknown. (A watermark: the minimum over the inputs.)"""
        times = [now]
        for topic in (keys.impressions, keys.interactions):
            tp = TP(topic, partition)
            done = joined.get((topic, partition), resumed_from(tp))
            end = highwater(tp)
            if end is None or (end and (done is None or done + 1 < end)):
                times.append(clock.get((topic, partition), 0.0))  # lagging, or not known yet: nothing is due
        return min(times)

    def expire(partition: int, now: float, forgotten: set[str]) -> list[DeadLetter]:
        """Runs inside the stream (a table may only change there), for the tick's partition only:
        looks only at requests whose deadline passed (the first tick after a start scans once)."""
        now = stream_time(partition, now)
        if not deadlines.knows(partition):
            for key, value in list(requests.items()):
                state = RequestState.model_validate_json(value) if value else None
                if state is not None and state.partition == partition:
                    deadlines.push(partition, state.forget_after(window), key)
            deadlines.mark_known(partition)
        dead: list[DeadLetter] = []
        for key in deadlines.due(partition, now):
            state = load(key)
            if state is None:
                continue
            forget, letters = sweep(state, now, window, keys.interactions, rules)
            dead += letters
            if forget:
                if per_version := request_counts(state):  # what users did with the version's ranking
                    version, seen = per_version
                    for name, n in seen.items():
                        online[version][name] += n
                        metrics.online.labels(version, name).inc(n)
                live.pop(key, None)
                forgotten.add(key)
                if key in requests:
                    del requests[key]
            else:
                deadlines.push(partition, state.forget_after(window), key)
        return dead

    @app.timer(interval=max(1.0, min(10.0, window / 10)), on_leader=True)
    async def tick() -> None:
        """A tick per partition: the join agent sweeps expired requests when it reads one."""
        for partition in range(partitions):
            await ticks.send(value=b"tick", partition=partition)

    def highwater(tp: TP) -> int | None:
        """The end of `tp` on the broker as last seen: by the consumer's latest fetch of it, or by the
        offsets asked for every REPORT_S (a fetch of a partition with a full buffer waits: it goes stale)."""
        if tp not in app.consumer.assignment():
            return None
        fetched = app.consumer.highwater(tp)
        return max(fetched or 0, ends.get(tp, 0)) if fetched is not None or tp in ends else None

    async def measure_lag() -> None:
        """Per input topic: the broker's high-water mark minus what this worker has joined."""
        consumer, lag = app.consumer, {keys.impressions: 0, keys.interactions: 0}
        inputs = [tp for tp in consumer.assignment() if tp.topic in lag]
        try:
            fresh = await asyncio.wait_for(consumer.highwaters(*inputs), REPORT_S)
            ends.clear()
            ends.update(fresh)
        except Exception as e:  # the broker did not answer in time: the fetches' marks only
            log.debug("end offsets unknown: %s", e)
        for tp in inputs:
            done = joined.get((tp.topic, tp.partition), resumed_from(tp))
            try:
                # nothing joined yet: from the consumer's position (which waits for a fetch, hence the bound)
                upto = done + 1 if done is not None else (await asyncio.wait_for(consumer.position(tp), 1.0)) or 0
                lag[tp.topic] += max(0, (highwater(tp) or 0) - upto)
            except Exception as e:  # no fetch yet for this partition: nothing known to lag
                log.debug("lag of %s unknown: %s", tp, e)
        for topic, n in lag.items():
            metrics.lag.labels(topic).set(n)

    @app.timer(interval=REPORT_S)
    async def report() -> None:
        """Every few seconds: activity counts to Redis (the status page), the lag to Prometheus."""
        if counts:
            activity.count(dict(counts))
            counts.clear()
        if online:
            activity.count_online({version: dict(c) for version, c in online.items()})
            online.clear()
        await measure_lag()

    return app
