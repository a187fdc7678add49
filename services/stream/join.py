"""The join, as pure typed functions the stream's agents loop around (no I/O, tested without a broker).

One `RequestState` per request id: its impression, the interactions seen so far and what was
already emitted. `step` applies one message to it; `sweep` decides when a request is forgotten.
`ClickBursts` is the one piece of state across requests: who clicks one document for one query faster
than a person does.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ValidationError

from schemas import CLOCK_SKEW_S, DeadLetter, ImpressionEvent, InteractionEvent, LabelledExample, RejectCode
from services.stream.anomaly import PositiveRates
from training.labels.rules import POSITIVE, EmittedLabel, LabelRules, changed_labels, identity_of, label_request
from training.labels.store import Hold
from training.ranking.query import normalise_query

Kind = Literal["impression", "interaction"]


class RequestState(BaseModel):
    """What the stream remembers about one request between messages."""

    impression: ImpressionEvent | None = None
    events: list[InteractionEvent] = []  # interactions that are valid against the impression (or wait for it)
    emitted: dict[str, EmittedLabel] = {}  # doc_id -> last label emitted
    first_seen: float
    partition: int | None = None

    def forget_after(self, window_s: float) -> float:
        """When `sweep` may next forget this request (it checks again then)."""
        if self.impression is None:
            return self.first_seen + window_s
        return self.impression.timestamp + 2 * window_s


class ExpiryIndex:
    """Per partition, request keys by the time they may be forgotten (a heap): a sweep looks at the
    requests that are due, not at the whole table. Stale entries are harmless: `sweep` decides."""

    def __init__(self) -> None:
        self.heaps: dict[int, list[tuple[float, str]]] = {}
        self.known: set[int] = set()

    def push(self, partition: int, at: float, key: str) -> None:
        heapq.heappush(self.heaps.setdefault(partition, []), (at, key))

    def due(self, partition: int, now: float) -> list[str]:
        heap, keys = self.heaps.get(partition, []), set()
        while heap and heap[0][0] <= now:
            keys.add(heapq.heappop(heap)[1])
        return sorted(keys)

    def knows(self, partition: int) -> bool:
        """Whether this partition's requests are indexed (after a start or a rebalance: not yet)."""
        return partition in self.known

    def mark_known(self, partition: int) -> None:
        self.known.add(partition)

    def clear(self) -> None:
        self.heaps.clear()
        self.known.clear()


@dataclass
class StepResult:
    state: RequestState | None  # None: leave the stored state as it is
    labels: list[LabelledExample] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    bursts: list[Burst] = field(default_factory=list)  # identities that started a burst with this message
    holds: list[Hold] = field(default_factory=list)  # (query, doc) pairs this message made anomalous
    repeated: bool = False  # a message already applied (redelivered, or resent unchanged): counted, not labelled


@dataclass(frozen=True)
class Burst:
    identity: str
    query: str
    doc_id: str
    count: int
    window_s: float

    def reason(self, limit: int) -> str:
        return (
            f"click burst: {self.identity} sent {self.count} positive events for doc {self.doc_id!r} on query "
            f"{self.query!r} within {self.window_s:.0f}s (limit {limit}); its labels are quarantined"
        )


class ClickBursts:
    """Positive events (click, cite, purchase) per (identity, query, doc) in a sliding window.

    More than `limit` of them is a burst no person makes by hand: the event is dead-lettered and the
    identity reported once, so the stream can quarantine its labels. Memory is bounded by the events
    of one window. Each stream worker counts the requests of its own partitions, so with N workers an
    identity spread evenly over them reaches a worker's limit after about N times as many events.
    """

    def __init__(self, limit: int, window_s: float):
        self.limit, self.window_s = limit, window_s
        self.times: dict[tuple[str, str, str], deque[float]] = {}
        self.flagged: dict[str, float] = {}  # identity -> when it was last reported
        self.pruned_at = 0.0

    def record(self, imp: ImpressionEvent, ev: InteractionEvent, now: float) -> tuple[Burst, bool] | None:
        """Counts one valid positive event: None while within the limit, else the burst and whether
        this identity is reported for the first time in a window."""
        who = identity_of(imp.user, imp.session)
        if self.limit <= 0 or who is None or ev.type not in POSITIVE:
            return None
        self._prune(now)
        times = self.times.setdefault((who, normalise_query(imp.query), ev.doc_id), deque())
        times.append(now)
        if len(times) <= self.limit:
            return None
        first = now - self.flagged.get(who, -float("inf")) > self.window_s
        if first:
            self.flagged[who] = now
        return Burst(who, normalise_query(imp.query), ev.doc_id, len(times), self.window_s), first

    def _prune(self, now: float) -> None:
        if now - self.pruned_at < self.window_s / 10:
            return
        self.pruned_at, horizon = now, now - self.window_s
        for key in list(self.times):
            times = self.times[key]
            while times and times[0] < horizon:
                times.popleft()
            if not times:
                del self.times[key]
        self.flagged = {who: t for who, t in self.flagged.items() if t >= horizon}


def _dead(source: str, code: RejectCode, reason: str, payload: str) -> DeadLetter:
    return DeadLetter(source=source, code=code, reason=reason, payload=payload)


def _invalid(source: str, raw: bytes, e: Exception) -> DeadLetter:
    if isinstance(e, ValidationError):
        why = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'event'}: {err['msg']}" for err in e.errors())
    else:
        why = str(e)
    return _dead(source, RejectCode.invalid_event, f"invalid event: {why}", raw.decode(errors="replace"))


def step(
    state: RequestState | None,
    source: str,
    kind: Kind,
    raw: bytes,
    rules: LabelRules,
    window_s: float,
    now: float,
    bursts: ClickBursts | None = None,
    rates: PositiveRates | None = None,
) -> StepResult:
    """Applies one raw message to a request's state (and, for a joined positive event, to `bursts` and
    `rates`; an impression's shows to `rates`)."""
    state = state.model_copy() if state else RequestState(first_seen=now)
    ev: ImpressionEvent | InteractionEvent
    try:
        ev = ImpressionEvent.model_validate_json(raw) if kind == "impression" else InteractionEvent.model_validate_json(raw)
    except ValidationError as e:
        return StepResult(None, dead=[_invalid(source, raw, e)])

    payload = raw.decode(errors="replace")
    if isinstance(ev, InteractionEvent) and ev.received_at is None:  # sent straight to the broker: the stream receives it
        ev = ev.model_copy(update={"received_at": now})
    if isinstance(ev, ImpressionEvent):
        if state.impression is not None:
            if state.impression == ev:
                return StepResult(None, repeated=True)  # redelivered after a restart: already applied, not a mistake
            return StepResult(
                None, dead=[_dead(source, RejectCode.duplicate_impression, "duplicate impression for request_id", payload)]
            )
        state.impression = ev
        if rates is not None:
            rates.shown(ev, now)
        ok, result = [], StepResult(state)
        for buffered in state.events:  # interactions that arrived before their impression
            if _admit(state.impression, buffered, window_s, source, bursts, rates, now, buffered.model_dump_json(), result):
                ok.append(buffered)
        state.events = ok
        return _relabel(state, rules, result)

    same_id = [e for e in state.events if e.event_id == ev.event_id]
    if same_id:
        if same_content(same_id[0], ev):
            return StepResult(None, repeated=True)  # redelivered after a restart (or resent unchanged): already counted
        return StepResult(None, dead=[_dead(source, RejectCode.duplicate_event, "duplicate event_id", payload)])
    if state.impression is not None:
        checked = StepResult(None)
        if not _admit(state.impression, ev, window_s, source, bursts, rates, now, payload, checked):
            return checked
        checked.state = state
    state.events = [*state.events, ev]
    if state.impression is None:
        return StepResult(state)  # waits for its impression (or the sweep) with the event kept in state
    return _relabel(state, rules, checked)


def same_content(a: InteractionEvent, b: InteractionEvent) -> bool:
    """The same event seen twice: equal but for what a server stamped on receipt (time, key, network)."""
    stamped = {"received_at", "api_key", "client"}
    return a.model_dump(exclude=stamped) == b.model_dump(exclude=stamped)


def check_against(imp: ImpressionEvent, ev: InteractionEvent, window_s: float) -> tuple[RejectCode, str] | None:
    """Why an interaction cannot count for this impression, or None. Lateness goes by the server's
    clock; the client's timestamp must fall between the impression and its receipt (give or take
    `CLOCK_SKEW_S`), so a backdated or future-dated event is refused rather than trusted."""
    if ev.server_time - imp.timestamp > window_s:
        return RejectCode.late_event, (
            f"late event: {ev.server_time - imp.timestamp:.0f}s after its impression (window {window_s:.0f}s)"
        )
    if ev.timestamp < imp.timestamp - CLOCK_SKEW_S:
        return RejectCode.bad_timestamp, (
            f"timestamp {ev.timestamp:.0f} is {imp.timestamp - ev.timestamp:.0f}s before the impression it follows"
        )
    if future := ev.future_dated():
        return RejectCode.bad_timestamp, future
    if ev.doc_id not in {it.doc_id for it in imp.items}:
        return RejectCode.doc_not_shown, f"doc_id {ev.doc_id!r} was not shown in request {ev.request_id!r}"
    return None


def _admit(
    imp: ImpressionEvent,
    ev: InteractionEvent,
    window_s: float,
    source: str,
    bursts: ClickBursts | None,
    rates: PositiveRates | None,
    now: float,
    payload: str,
    result: StepResult,
) -> bool:
    """Whether an interaction counts for its impression; if not, its dead letter (and a newly
    reported burst) go into `result`; if so, a hold it set off does."""
    problem = check_against(imp, ev, window_s)
    if problem is None and bursts is not None:
        found = bursts.record(imp, ev, now)
        if found:
            burst, first = found
            problem = RejectCode.click_burst, burst.reason(bursts.limit)
            if first:
                result.bursts.append(burst)
    if problem:
        result.dead.append(_dead(source, problem[0], problem[1], payload))
    elif rates is not None and (hold := rates.positive(imp, ev, now)):
        result.holds.append(hold)
    return problem is None


def _relabel(state: RequestState, rules: LabelRules, result: StepResult) -> StepResult:
    """The labels of the request's admitted interactions that changed since last emitted."""
    assert state.impression is not None
    revision = len(state.events)
    labels = label_request(state.impression, state.events, rules, unless=state.emitted, revision=revision)
    result.labels, state.emitted = changed_labels(labels, state.emitted, revision)
    return result


def sweep(state: RequestState, now: float, window_s: float, source: str, rules: LabelRules) -> tuple[bool, list[DeadLetter]]:
    """(forget this request?, dead letters). Interactions without an impression after the window
    are dead-lettered; a joined request is kept one more window so late events are recognised, and
    when it is forgotten its events that no label used are dead-lettered (nothing vanishes)."""
    if state.impression is None:
        if now - state.first_seen > window_s:
            return True, [
                _dead(
                    source,
                    RejectCode.unknown_request,
                    "unknown request_id: no impression within the join window",
                    e.model_dump_json(),
                )
                for e in state.events
            ]
        return False, []
    if now - state.impression.timestamp <= 2 * window_s:
        return False, []
    used = {e for lab in label_request(state.impression, state.events, rules).values() for e in lab.event_ids}
    return True, [
        _dead(
            source,
            RejectCode.no_label,
            f"no label rule used this {e.type.value} on {e.doc_id!r} (e.g. a dwell without a click)",
            e.model_dump_json(),
        )
        for e in state.events
        if e.event_id not in used
    ]
