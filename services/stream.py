"""Stream processor (faust-streaming): join interactions to impressions, label, dead-letter the rest.

- `join_label` reads impressions and interactions (both keyed by request_id, co-partitioned) and keeps
  one state per request in a table; `step` is the pure function it applies to each message.
- `sweep` dead-letters interactions whose impression never arrived within the window, and forgets
  requests older than the window. A table may only change inside stream iteration, so a timer sends
  one tick per partition to a co-partitioned ticks topic and the join agent sweeps when it reads one.
- `sink_labels` writes the labels topic to Parquet shards; `take_events` acks (so commits offsets)
  only after the shard is on disk.
Every agent is idempotent: a redelivered message finds its event id in the request state.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import faust
from pydantic import ValidationError

from schemas import DeadLetter, ImpressionEvent, InteractionEvent, LabelledExample
from services.config import Settings
from training.dataset import write_shard
from training.labels import LabelRules, changed_labels, label_request


@dataclass
class StepResult:
    state: dict | None  # None: leave the stored state as it is
    labels: list[LabelledExample] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


def _invalid(source: str, raw: bytes, e: Exception) -> DeadLetter:
    if isinstance(e, ValidationError):
        why = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'event'}: {err['msg']}" for err in e.errors())
    else:
        why = str(e)
    return DeadLetter(source=source, reason=f"invalid event: {why}", payload=raw.decode(errors="replace"))


def step(state: dict | None, source: str, kind: str, raw: bytes, rules: LabelRules, window_s: float, now: float) -> StepResult:
    """Applies one raw message to a request's state. Pure: no I/O, so it is tested without a broker.

    state = {"impression": dict | None, "events": [dict], "emitted": {doc_id: [rev, grade, weight, signals]},
             "first_seen": float}
    """
    state = dict(state) if state else {"impression": None, "events": [], "emitted": {}, "first_seen": now}
    try:
        data = json.loads(raw)
        ev = ImpressionEvent.model_validate(data) if kind == "impression" else InteractionEvent.model_validate(data)
    except (ValueError, ValidationError) as e:
        return StepResult(None, dead=[_invalid(source, raw, e)])

    payload = raw.decode(errors="replace")
    if isinstance(ev, ImpressionEvent):
        if state["impression"] is not None:
            return StepResult(None, dead=[DeadLetter(source=source, reason="duplicate impression for request_id", payload=payload)])
        state["impression"] = ev.model_dump(mode="json")
        return _relabel(state, rules, window_s, source)

    if any(e["event_id"] == ev.event_id for e in state["events"]):
        return StepResult(None, dead=[DeadLetter(source=source, reason="duplicate event_id", payload=payload)])
    if state["impression"] is not None:
        problem = _check_against(ImpressionEvent.model_validate(state["impression"]), ev, window_s)
        if problem:
            return StepResult(None, dead=[DeadLetter(source=source, reason=problem, payload=payload)])
    state["events"] = [*state["events"], ev.model_dump(mode="json")]
    if state["impression"] is None:
        return StepResult(state)  # waits for its impression (or the sweep) with the event kept in state
    return _relabel(state, rules, window_s, source)


def _check_against(imp: ImpressionEvent, ev: InteractionEvent, window_s: float) -> str | None:
    if ev.timestamp - imp.timestamp > window_s:
        return f"late event: {ev.timestamp - imp.timestamp:.0f}s after its impression (window {window_s:.0f}s)"
    if ev.doc_id not in {it.doc_id for it in imp.items}:
        return f"doc_id {ev.doc_id!r} was not shown in request {ev.request_id!r}"
    return None


def _relabel(state: dict, rules: LabelRules, window_s: float, source: str) -> StepResult:
    imp = ImpressionEvent.model_validate(state["impression"])
    ok, dead = [], []
    for e in state["events"]:
        ev = InteractionEvent.model_validate(e)
        problem = _check_against(imp, ev, window_s)
        if problem:  # buffered before the impression arrived, invalid against it
            dead.append(DeadLetter(source=source, reason=problem, payload=json.dumps(e)))
        else:
            ok.append(ev)
    state["events"] = [e.model_dump(mode="json") for e in ok]
    emitted = {k: list(v) for k, v in state["emitted"].items()}
    labels = changed_labels(label_request(imp, ok, rules), emitted)
    state["emitted"] = emitted
    return StepResult(state, labels, dead)


def sweep(state: dict, now: float, window_s: float, source: str) -> tuple[bool, list[DeadLetter]]:
    """(forget this request?, dead letters). Interactions without an impression after the window
    are dead-lettered; a joined request is kept one more window so late events are recognised."""
    if state["impression"] is None:
        if now - state["first_seen"] > window_s:
            return True, [DeadLetter(source=source, reason="unknown request_id: no impression within the join window",
                                     payload=json.dumps(e)) for e in state["events"]]
        return False, []
    return now - state["impression"]["timestamp"] > 2 * window_s, []


def create_app(s: Settings) -> faust.App:
    app = faust.App(
        "rankloop-stream",
        broker=f"kafka://{s.bootstrap}",
        store="memory://",
        datadir=str(s.state_dir / "stream"),
        topic_partitions=s.partitions,
        topic_allow_declare=True,
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
    )
    raw = dict(key_serializer="raw", value_serializer="raw", partitions=s.partitions)
    inputs = app.topic(s.topic_impressions, s.topic_interactions, s.topic_ticks, **raw)
    ticks = app.topic(s.topic_ticks, **raw)
    labels_topic = app.topic(s.topic_labels, **raw)
    dead_topic = app.topic(s.topic_dead_letters, **raw)
    requests = app.Table("rankloop-requests", default=None, partitions=s.partitions)
    rules, window = s.label_rules, s.join_window_s

    async def publish(result_labels, dead):
        for lab in result_labels:
            await labels_topic.send(key=lab.label_id.encode(), value=lab.model_dump_json().encode())
        for d in dead:
            await dead_topic.send(key=d.source.encode(), value=d.model_dump_json().encode())

    @app.agent(inputs)
    async def join_label(stream):
        async for event in stream.events():
            msg = event.message
            if msg.topic == s.topic_ticks:
                await expire(msg.partition)
                continue
            kind = "impression" if msg.topic == s.topic_impressions else "interaction"
            key = (msg.key or b"").decode(errors="replace")
            result = step(requests.get(key) if key else None, msg.topic, kind, msg.value, rules, window, time.time())
            if result.state is not None and key:
                requests[key] = {**result.state, "partition": msg.partition}
            await publish(result.labels, result.dead)

    async def expire(partition: int) -> None:
        """Runs inside the stream (a table may only change there), for the tick's partition only."""
        now = time.time()
        for key, state in list(requests.items()):
            if state is None or state.get("partition") != partition:
                continue
            forget, dead = sweep(state, now, window, s.topic_interactions)
            await publish([], dead)
            if forget:
                del requests[key]

    @app.timer(interval=max(1.0, min(10.0, window / 10)), on_leader=True)
    async def tick():
        """A tick per partition: the join agent sweeps expired requests when it reads one."""
        for partition in range(s.partitions):
            await ticks.send(value=b"tick", partition=partition)

    @app.agent(labels_topic)
    async def sink_labels(stream):
        async for events in stream.take_events(1000, within=s.label_flush_s):
            by_partition: dict[int, list] = {}
            for ev in events:
                by_partition.setdefault(ev.message.partition, []).append(ev)
            for partition, evs in by_partition.items():
                labs = [LabelledExample.model_validate_json(e.message.value) for e in evs]
                offsets = [e.message.offset for e in evs]
                write_shard(labs, s.label_dir, partition, min(offsets), max(offsets))

    return app
