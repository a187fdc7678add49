"""The stream processor (faust-streaming): a faust app wired around `JoinProcessor`.

- `join_label` reads impressions, interactions and ticks (all keyed by request_id, co-partitioned) in
  batches and hands each batch to the processor; the request table is changelogged, each state to the
  partition its request came in on (`FaustRequestTable`: faust's public `send_changelog`, no stream
  context needed).
- A timer sends one tick per partition to the ticks topic, so expiry runs inside the stream, where a
  table may change.
- On a rebalance the processor forgets what it held; on an assignment it learns the group's committed
  offsets (from the broker, with Kafka's admin API).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import faust
from faust.types import TP, TableT
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas import DeadLetter
from services.config import Settings
from services.observability import serve_metrics
from services.storage import open_activity, open_labels
from services.storage.kafka import committed_offsets, topic_id
from services.stream.processor import JoinConfig, JoinProcessor, Message

log = logging.getLogger(__name__)
REPORT_S = 2.0


class StreamMetrics:
    """What a stream worker counts, on its own Prometheus endpoint (`stream.metrics_port`)."""

    def __init__(self, host: str, port: int) -> None:
        self.registry = r = CollectorRegistry()
        self.events = Counter("rankloop_stream_events", "messages joined, by topic (rate(): events/s)", ["topic"], registry=r)
        self.lag = Gauge("rankloop_stream_lag_messages", "messages on its partitions not yet joined", ["topic"], registry=r)
        self.partitions = Gauge("rankloop_stream_partitions", "input partitions this worker owns now", registry=r)
        self.recovering = Gauge("rankloop_stream_recovering", "1 while faust restores the join table", registry=r)
        self.labels = Counter("rankloop_stream_labels", "labels (revisions) emitted", registry=r)
        self.dead_letters = Counter("rankloop_stream_dead_letters", "dead letters by reason", ["code"], registry=r)
        self.bursts = Counter("rankloop_click_bursts", "identities found sending a click burst (quarantined)", registry=r)
        self.holds = Counter("rankloop_label_holds", "(query, doc) pairs held for review as anomalous", registry=r)
        self.online_counts = Counter(
            "rankloop_online",
            "what users did with a model version's rankings, counted when a request is forgotten (services.online): "
            "requests, clicked_top_k, first_click_rr, abandoned, cites, citations_deleted, purchases, returns",
            ["version", "count"],
            registry=r,
        )
        serve_metrics(r, host, port, "stream")

    def joined(self, topic: str) -> None:
        self.events.labels(topic).inc()

    def labelled(self, n: int) -> None:
        self.labels.inc(n)

    def dead_lettered(self, code: str) -> None:
        self.dead_letters.labels(code).inc()

    def burst(self) -> None:
        self.bursts.inc()

    def held(self) -> None:
        self.holds.inc()

    def online(self, version: str, name: str, n: float) -> None:
        self.online_counts.labels(version, name).inc(n)


class FaustRequestTable:
    """A faust table written with the changelog partition named: the partition of the request's input
    messages, whatever the table's key serializer would hash to."""

    def __init__(self, table: TableT):
        self.table = table

    def get(self, key: str) -> bytes | None:
        return self.table.data.get(key)

    def items(self) -> list[tuple[str, bytes | None]]:
        return list(self.table.data.items())

    def put(self, key: str, value: bytes, partition: int) -> None:
        self.table.send_changelog(partition, key, value)
        self.table.data[key] = value

    def remove(self, key: str, partition: int) -> None:
        self.table.send_changelog(partition, key, None, value_serializer="raw")
        del self.table.data[key]

    def __contains__(self, key: object) -> bool:
        return key in self.table.data


class FaustOutputs:
    """Dead letters to their topic and the table's changelog, both through the app's producer."""

    def __init__(self, app: faust.App, dead_topic: faust.TopicT):
        self.app, self.dead_topic = app, dead_topic

    async def send_dead(self, dead: list[DeadLetter]) -> None:
        for d in dead:
            await self.dead_topic.send(key=d.source.encode(), value=d.model_dump_json().encode())
        if dead:
            await self.app.producer.flush()

    async def flush(self) -> None:
        await self.app.producer.flush()


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


def message(event: faust.EventT) -> Message:
    m = event.message
    return Message(m.topic, m.partition, m.offset, m.key, m.value or b"", m.timestamp)


def create_app(s: Settings) -> faust.App:
    keys, partitions, bootstrap = s.keys, s.kafka.partitions, s.kafka.address
    app = faust.App(
        keys.stream_app,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=str(s.state_dir / "stream"),
        topic_partitions=partitions,
        topic_allow_declare=True,
        broker_session_timeout=s.stream.session_timeout_s,
        broker_heartbeat_interval=1,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        # the check guards on-disk (RocksDB) table state against a topic made anew; the table here is in
        # memory and rebuilt from its changelog after every start. A broker's end offset read just after
        # a rebalance can trail what this worker itself read a moment before (seen with the local Tansu
        # broker: 276 read, 275 reported), and the check then crashed the recovery for good.
        recovery_consistency_check=False,
    )

    def topic(*names: str) -> faust.TopicT:
        """Bytes in, bytes out: pydantic parses the messages (in Rust), not faust's codecs."""
        return app.topic(*names, key_serializer="raw", value_serializer="raw", partitions=partitions)

    inputs = topic(keys.impressions, keys.interactions, keys.stream_ticks)
    ticks = topic(keys.stream_ticks)
    # values are a state's JSON, made and read by pydantic (in Rust) rather than as a dict through faust's json codec
    requests = app.Table(keys.requests_table, default=None, partitions=partitions, value_type=bytes)
    metrics = StreamMetrics(s.metrics_host, s.stream.metrics_port)
    ends: dict[TP, int] = {}  # the broker's end offset of each input partition, asked every REPORT_S

    def highwater(topic: str, partition: int) -> int | None:
        """The end of a partition on the broker as last seen: by the consumer's latest fetch of it, or
        by the offsets asked for every REPORT_S (a fetch of a partition with a full buffer waits)."""
        tp = TP(topic, partition)
        if tp not in app.consumer.assignment():
            return None
        fetched = app.consumer.highwater(tp)
        return max(fetched or 0, ends.get(tp, 0)) if fetched is not None or tp in ends else None

    st = s.stream
    anomaly = (st.anomaly_window_s, st.anomaly_ratio, st.anomaly_min_positives, st.anomaly_min_identities)
    cfg = JoinConfig(keys, st.rules, st.join_window_s, st.burst_limit, st.burst_window_s, anomaly)
    processor = JoinProcessor(
        cfg,
        open_labels(s.label_store_url),
        FaustRequestTable(requests),
        FaustOutputs(app, topic(keys.dead_letters)),
        metrics,
        open_activity(s.redis_url, keys),
        topic_id=lambda topic: topic_id(bootstrap, topic),
        highwater=highwater,
    )

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # faust's signal types admit no coroutine function
    async def forget_live(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        await processor.revoked()

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def learn_committed(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        """`args[0]`: the partitions now assigned (faust's signal sends them)."""
        assigned: set[TP] = args[0]
        try:
            found = await asyncio.to_thread(committed_offsets, bootstrap, keys.stream_app)
        except Exception as e:  # not known: the partition counts as lagging until a message arrives
            log.warning("committed offsets unknown after an assignment: %s", e)
            return
        mine = {(tp.topic, tp.partition) for tp in assigned}
        processor.assigned({tp: offset for tp, offset in found.items() if tp in mine})

    @app.agent(inputs)
    async def join_label(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(s.stream.join_batch, within=s.stream.join_flush_s):  # type: ignore[attr-defined]
            async with processor.owning:
                owned = {(tp.topic, tp.partition) for tp in app.consumer.assignment()}
                await processor.join_batch([message(e) for e in batch], owned)

    @app.timer(interval=max(1.0, min(10.0, s.stream.join_window_s / 10)), on_leader=True)
    async def tick() -> None:
        """A tick per partition: the join agent sweeps expired requests when it reads one."""
        for partition in range(partitions):
            await ticks.send(value=b"tick", partition=partition)

    async def measure_lag() -> None:
        consumer = app.consumer
        assigned = [tp for tp in consumer.assignment() if tp.topic in (keys.impressions, keys.interactions)]
        metrics.partitions.set(len(assigned))
        metrics.recovering.set(1 if app.in_recovery else 0)
        try:
            fresh = await asyncio.wait_for(consumer.highwaters(*assigned), REPORT_S)
            ends.clear()
            ends.update(fresh)
        except Exception as e:  # the broker did not answer in time: the fetches' marks only
            log.debug("end offsets unknown: %s", e)
        positions: dict[tuple[str, int], int | None] = {}
        for tp in assigned:
            if processor.done(tp.topic, tp.partition) is not None:
                continue
            try:  # nothing joined yet: from the consumer's position (which waits for a fetch, hence the bound)
                positions[(tp.topic, tp.partition)] = await asyncio.wait_for(consumer.position(tp), 1.0)
            except Exception as e:
                log.debug("position of %s unknown: %s", tp, e)
        for topic, n in processor.lag([(tp.topic, tp.partition) for tp in assigned], positions.get).items():
            metrics.lag.labels(topic).set(n)

    @app.timer(interval=REPORT_S)
    async def report() -> None:
        """Every few seconds: activity counts to Redis (the status page), the lag to Prometheus."""
        processor.report()
        await measure_lag()

    return app
