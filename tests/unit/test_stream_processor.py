"""The stream's join as an object, without faust or a broker: a batch stores its labels with the offsets
they cover, a replay after a crash stores nothing twice, expiry follows the partition's stream time,
and a rebalance forgets what the worker held."""

from __future__ import annotations

import asyncio

from schemas import DeadLetter
from services.keys import Keys
from services.storage.memory import MemoryActivity, MemoryLabelStore
from services.stream.processor import JoinConfig, JoinProcessor, Message
from tests.factories import impression, interaction
from training.labels.rules import LabelRules

KEYS = Keys()
WINDOW = 100.0


class Table(dict):
    """The request table as a dict, with the partition each write was changelogged to."""

    def __init__(self) -> None:
        super().__init__()
        self.partitions: dict[str, int] = {}

    def put(self, key: str, value: bytes, partition: int) -> None:
        self[key], self.partitions[key] = value, partition

    def remove(self, key: str, partition: int) -> None:
        assert self.partitions.pop(key) == partition
        del self[key]


class Outputs:
    def __init__(self) -> None:
        self.dead: list[DeadLetter] = []
        self.flushes = 0

    async def send_dead(self, dead: list[DeadLetter]) -> None:
        self.dead += dead

    async def flush(self) -> None:
        self.flushes += 1


class Counts:
    def __init__(self) -> None:
        self.joined_by_topic: dict[str, int] = {}
        self.labels = 0

    def joined(self, topic: str) -> None:
        self.joined_by_topic[topic] = self.joined_by_topic.get(topic, 0) + 1

    def labelled(self, n: int) -> None:
        self.labels += n

    def dead_lettered(self, code: str) -> None: ...
    def burst(self) -> None: ...
    def held(self) -> None: ...
    def online(self, version: str, name: str, n: float) -> None: ...


def processor(store: MemoryLabelStore, table: Table, ends: dict | None = None, anomaly=(3600.0, 5.0, 20, 0)) -> JoinProcessor:
    cfg = JoinConfig(KEYS, LabelRules(), WINDOW, burst_limit=10, burst_window_s=600.0, anomaly=anomaly)
    return JoinProcessor(
        cfg,
        store,
        table,
        Outputs(),
        Counts(),
        MemoryActivity(),
        topic_id=lambda topic: "id1",
        highwater=lambda topic, partition: (ends or {}).get((topic, partition)),
    )


def msg(topic: str, offset: int, event, partition: int = 0) -> Message:
    return Message(topic, partition, offset, event.request_id.encode(), event.model_dump_json().encode(), event.timestamp)


def tick(partition: int = 0, offset: int = 0) -> Message:
    return Message(KEYS.stream_ticks, partition, offset, None, b"tick", None)


OWNED = {(KEYS.impressions, 0), (KEYS.interactions, 0), (KEYS.stream_ticks, 0)}
BATCH = [
    msg(KEYS.impressions, 0, impression("r1", timestamp=1000.0)),
    msg(KEYS.interactions, 0, interaction("d3", "click", "r1", timestamp=1010.0, event_id="c1", received_at=1010.0)),
]


def test_a_batch_stores_its_labels_with_the_offsets_they_cover_then_writes_the_table():
    store, table = MemoryLabelStore(), Table()
    p = processor(store, table)
    asyncio.run(p.join_batch(BATCH, OWNED, now=1020.0))
    df, _ = store.read()
    assert sorted(df["doc_id"]) == ["d1", "d2", "d3"]  # the click and the two skipped above it
    assert store.stored_offset(f"{KEYS.impressions}@id1-p0") == 0 and store.stored_offset(f"{KEYS.interactions}@id1-p0") == 0
    assert table.partitions == {"r1": 0} and p.outputs.flushes == 1  # type: ignore[attr-defined]  # its input partition
    assert p.metrics.labels == 3  # type: ignore[attr-defined]


def test_a_replay_after_a_crash_rebuilds_the_state_and_stores_nothing_twice():
    """A new worker (nothing in memory, the table lost its last write) joins the same messages again:
    the labels are in the store already, so none is written again; a message past the stored offset is new."""
    store = MemoryLabelStore()
    asyncio.run(processor(store, Table()).join_batch(BATCH, OWNED, now=1020.0))
    before = store.count()
    again = processor(store, Table())
    later = msg(KEYS.interactions, 1, interaction("d5", "click", "r1", timestamp=1015.0, event_id="c2", received_at=1015.0))
    asyncio.run(again.join_batch([*BATCH, later], OWNED, now=1030.0))
    rows = store.rows
    assert len({(r["label_id"], r["revision"]) for r in rows}) == len(rows)  # no (label, revision) twice
    assert store.count() > before and again.counts["replayed"] == 2
    assert store.stored_offset(f"{KEYS.interactions}@id1-p0") == 1


def test_a_partition_this_worker_no_longer_owns_is_left_to_its_new_owner():
    store = MemoryLabelStore()
    p = processor(store, Table())
    asyncio.run(p.join_batch(BATCH, owned={(KEYS.stream_ticks, 0)}, now=1020.0))
    assert store.count() == 0 and p.counts["left_to_new_owner"] == 2


def test_expiry_forgets_a_request_two_windows_after_its_impression_and_dead_letters_an_unknown_one():
    store, table = MemoryLabelStore(), Table()
    p = processor(store, table, {(KEYS.impressions, 0): 1, (KEYS.interactions, 0): 2})  # both read to their ends
    orphan = msg(KEYS.interactions, 1, interaction("d1", "click", "nobody", timestamp=1010.0, event_id="o1", received_at=1010.0))
    asyncio.run(p.join_batch([*BATCH, orphan], OWNED, now=1020.0))
    assert set(table) == {"r1", "nobody"}
    asyncio.run(p.join_batch([tick()], OWNED, now=1000.0 + 2 * WINDOW + 1))
    assert set(table) == set() and not p.live
    codes = [d.code.value for d in p.outputs.dead]  # type: ignore[attr-defined]
    assert codes == ["unknown_request"]


def test_a_lagging_topic_holds_expiry_back_until_its_messages_are_joined():
    """Stream time is a watermark: while the interactions partition has unread messages, the sweep goes by
    the time of the latest one joined, so a request whose events are still queued is not forgotten."""
    store, table = MemoryLabelStore(), Table()
    ends = {(KEYS.impressions, 0): 1, (KEYS.interactions, 0): 50}  # 49 interactions not read yet
    p = processor(store, table, ends)
    asyncio.run(p.join_batch(BATCH, OWNED, now=1020.0))
    asyncio.run(p.join_batch([tick()], OWNED, now=5000.0))
    assert "r1" in table and p.stream_time(0, 5000.0) == 1010.0
    ends[(KEYS.interactions, 0)] = 1  # caught up
    asyncio.run(p.join_batch([tick()], OWNED, now=5000.0))
    assert "r1" not in table


def test_a_rebalance_forgets_live_state_and_reads_it_back_from_the_table():
    store, table = MemoryLabelStore(), Table()
    p = processor(store, table)
    asyncio.run(p.join_batch(BATCH, OWNED, now=1020.0))
    asyncio.run(p.revoked())
    assert not p.live and not p.joined and not p.stored
    state = p.load("r1")
    assert state is not None and state.impression is not None and len(state.events) == 1


def test_an_assignment_learns_where_the_group_stands_so_an_idle_partition_is_caught_up():
    p = processor(MemoryLabelStore(), Table(), {(KEYS.impressions, 3): 10, (KEYS.interactions, 3): 7})
    assert p.stream_time(3, 5000.0) == 0.0  # nothing known of partition 3: nothing is due
    p.assigned({(KEYS.impressions, 3): 10, (KEYS.interactions, 3): 7})  # committed: the next offsets to read
    assert p.stream_time(3, 5000.0) == 5000.0
    assert p.lag([(KEYS.impressions, 3), (KEYS.interactions, 3)], lambda tp: None) == {KEYS.impressions: 0, KEYS.interactions: 0}


def test_clicks_from_many_unsigned_ids_on_a_low_document_are_held_not_trained_on():
    store, table = MemoryLabelStore(), Table()
    p = processor(store, table, anomaly=(3600.0, 5.0, 20, 5))
    docs = tuple(f"d{i}" for i in range(1, 21))
    batch = []
    for i in range(100):
        imp = impression(f"r{i}", docs=docs, timestamp=1000.0 + i, query="statins", user=f"bot-{i}")
        ev = interaction("d15", "click", request_id=f"r{i}", timestamp=1000.5 + i, received_at=1000.5 + i)
        batch += [msg(KEYS.impressions, i, imp), msg(KEYS.interactions, i, ev)]
    asyncio.run(p.join_batch(batch, {(KEYS.impressions, 0), (KEYS.interactions, 0)}, now=1200.0))
    [hold] = store.holds()
    assert (hold.query, hold.doc_id, hold.status) == ("statins", "d15", "held")
    df, lineage = store.read()
    assert "d15" not in set(df["doc_id"]) and lineage["held"] == 100  # stored, held for review, not trained on
