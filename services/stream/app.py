"""The stream processor (faust-streaming): each agent is a short loop around a pure function of
`join.py`.

- `join_label` reads impressions and interactions (both keyed by request_id, co-partitioned), keeps
  one `RequestState` per request in a table and applies `step` to each message.
- Expiry: a table may only change inside stream iteration, so a timer sends one tick per partition
  to a co-partitioned ticks topic and the join agent applies `sweep` when it reads one.
- `sink_labels` writes the labels topic to the label store (a Delta table) in batches; each write
  records the last offset it covers in the same transaction, so a redelivered batch is skipped:
  exactly once into the table. `take_events` acks (so commits offsets) only after the labels are stored.
- A click burst (`ClickBursts`) is dead-lettered and its identity quarantined: a purge recorded in the
  label store, so training never sees its labels (`rankloop labels purges` lists it).
Every agent is idempotent: a redelivered message finds its event id in the request state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import faust
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas import DeadLetter, LabelledExample
from services.config import Settings
from services.observability import serve_metrics
from services.storage import open_activity, open_labels
from services.storage.kafka import topic_id
from services.stream.join import Burst, ClickBursts, RequestState, step, sweep
from training.labels.store import Purge, label_source

log = logging.getLogger(__name__)
REPORT_S = 2.0


class StreamMetrics:
    """What a stream worker counts, on its own Prometheus endpoint (`stream.metrics_port`)."""

    def __init__(self, host: str, port: int) -> None:
        self.registry = r = CollectorRegistry()
        self.events = Counter("rankloop_stream_events", "messages joined, by topic (rate(): events/s)", ["topic"], registry=r)
        self.lag = Gauge("rankloop_stream_lag_messages", "messages on its partitions not yet joined", ["topic"], registry=r)
        self.labels = Counter("rankloop_stream_labels", "labels (revisions) emitted", registry=r)
        self.dead_letters = Counter("rankloop_stream_dead_letters", "dead letters by reason", ["code"], registry=r)
        self.bursts = Counter("rankloop_click_bursts", "identities found sending a click burst (quarantined)", registry=r)
        serve_metrics(r, host, port, "stream")


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
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
    )
    raw = dict(key_serializer="raw", value_serializer="raw", partitions=partitions)
    inputs = app.topic(keys.impressions, keys.interactions, keys.stream_ticks, **raw)
    ticks = app.topic(keys.stream_ticks, **raw)
    labels_topic = app.topic(keys.labels, **raw)
    dead_topic = app.topic(keys.dead_letters, **raw)
    requests = app.Table(keys.requests_table, default=None, partitions=partitions)
    rules, window = s.stream.rules, s.stream.join_window_s
    store = open_labels(s.label_store_url)
    bursts = ClickBursts(s.stream.burst_limit, s.stream.burst_window_s)
    quarantined = {p.identity for p in store.purges() if p.whole_identity}
    metrics = StreamMetrics(s.metrics_host, s.stream.metrics_port)
    activity = open_activity(s.redis_url, keys)
    joined: dict[tuple[str, int], int] = {}  # (topic, partition) -> the last offset joined, for the lag
    counts: defaultdict[str, int] = defaultdict(int)  # for the status page, written to Redis every REPORT_S

    def load(key: str) -> RequestState | None:
        stored = requests.get(key) if key else None
        return RequestState.model_validate(stored) if stored else None

    async def publish(labels: list[LabelledExample], dead: list[DeadLetter]) -> None:
        for lab in labels:
            await labels_topic.send(key=lab.label_id.encode(), value=lab.model_dump_json().encode())
        for d in dead:
            await dead_topic.send(key=d.source.encode(), value=d.model_dump_json().encode())
            metrics.dead_letters.labels(d.code.value).inc()
            counts[f"dead:{d.code.value}"] += 1
            activity.dead_letter(d.model_dump(mode="json"))
        metrics.labels.inc(len(labels))

    def quarantine(burst: Burst) -> None:
        """Every label of a bursting identity, past and future, leaves training (once per identity)."""
        metrics.bursts.inc()
        if burst.identity in quarantined:
            return
        reason = burst.reason(bursts.limit)
        store.purge(Purge(identity=burst.identity, reason=reason, actor="stream", at=time.time()), count=False)
        quarantined.add(burst.identity)
        log.warning("%s", reason)

    @app.agent(inputs)
    async def join_label(stream: AsyncIterator) -> None:
        async for event in stream.events():  # type: ignore[attr-defined]
            msg = event.message
            if msg.topic == keys.stream_ticks:
                await expire(msg.partition)
                continue
            kind = "impression" if msg.topic == keys.impressions else "interaction"
            counts[f"{kind}s"] += 1
            metrics.events.labels(msg.topic).inc()
            joined[(msg.topic, msg.partition)] = msg.offset
            key = (msg.key or b"").decode(errors="replace")
            result = step(load(key), msg.topic, kind, msg.value, rules, window, time.time(), bursts)
            if result.state is not None and key:
                result.state.partition = msg.partition
                requests[key] = result.state.model_dump(mode="json")
            for burst in result.bursts:
                quarantine(burst)
            await publish(result.labels, result.dead)

    async def expire(partition: int) -> None:
        """Runs inside the stream (a table may only change there), for the tick's partition only."""
        now = time.time()
        for key, stored in list(requests.items()):
            if stored is None or stored.get("partition") != partition:
                continue
            forget, dead = sweep(RequestState.model_validate(stored), now, window, keys.interactions)
            await publish([], dead)
            if forget:
                del requests[key]

    @app.timer(interval=max(1.0, min(10.0, window / 10)), on_leader=True)
    async def tick() -> None:
        """A tick per partition: the join agent sweeps expired requests when it reads one."""
        for partition in range(partitions):
            await ticks.send(value=b"tick", partition=partition)

    topic_ids: dict[str, str] = {}

    def source_of(partition: int, recheck: bool = False) -> str:
        """The store's name for a labels partition; the topic's id is asked again only when a batch
        looks already stored (a redelivery, or a broker that forgot its topics)."""
        if recheck or keys.labels not in topic_ids:
            topic_ids[keys.labels] = topic_id(s.kafka.address, keys.labels)
        return label_source(keys.labels, topic_ids[keys.labels], partition)

    @app.agent(labels_topic)
    async def sink_labels(stream: AsyncIterator) -> None:
        async for events in stream.take_events(s.stream.label_batch, within=s.stream.label_flush_s):  # type: ignore[attr-defined]
            by_partition: dict[int, list] = {}
            for ev in events:
                by_partition.setdefault(ev.message.partition, []).append(ev)
            for partition, evs in by_partition.items():
                source = source_of(partition)
                done = await asyncio.to_thread(store.stored_offset, source)
                if done is not None and evs[0].message.offset <= done:  # a redelivery, or a topic made anew
                    source = source_of(partition, recheck=True)
                    done = await asyncio.to_thread(store.stored_offset, source)
                fresh = [e for e in evs if done is None or e.message.offset > done]
                if fresh:
                    labs = [LabelledExample.model_validate_json(e.message.value) for e in fresh]
                    await asyncio.to_thread(store.write, labs, source, fresh[-1].message.offset)
                counts["labels"] += len(fresh)

    async def measure_lag() -> None:
        """Per input topic: the broker's high-water mark minus what this worker has joined."""
        consumer, lag = app.consumer, {keys.impressions: 0, keys.interactions: 0}
        for tp in consumer.assignment():
            if tp.topic not in lag:
                continue
            done = joined.get((tp.topic, tp.partition))
            try:
                # nothing joined yet: from the consumer's position (which waits for a fetch, hence the bound)
                upto = done + 1 if done is not None else (await asyncio.wait_for(consumer.position(tp), 1.0)) or 0
                lag[tp.topic] += max(0, (consumer.highwater(tp) or 0) - upto)
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
        await measure_lag()

    return app
