"""Python SDK: rank and emit interactions in two lines, over HTTP or straight to Kafka.

    client = RankloopClient("http://127.0.0.1:8000")          # or RankloopClient(kafka="host:9092")
    res = client.rank("what causes scurvy?"); client.click(res, res.items[0].doc_id)

In an application, emit through `client.emitter()`: it never blocks a request, batches, retries what
was not recorded, and flushes at exit.

    events = client.emitter()
    events.click(res.request_id, doc_id); events.dwell(res.request_id, doc_id, 42.0)

Light on purpose: it imports the contracts in `schemas` and httpx (kafka-python only for the Kafka
path), never torch or the ranking code.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import httpx

from schemas import (
    EventsResponse,
    InteractionEvent,
    InteractionType,
    RankResponse,
    RejectCode,
    Rejection,
    RequestFailed,
)
from schemas.documents import DeletedResponse, DocumentsResponse
from schemas.trust import sign_user
from services.keys import Keys

log = logging.getLogger("rankloop.sdk")
Answer = TypeVar("Answer")


class EventHelpers(Generic[Answer]):
    """One method per interaction type, the same on the blocking client (answers `EventsResponse`) and
    on the background emitter (answers whether the event was queued). `request` is a `/rank` answer or
    its request id."""

    def _one(self, request_id: str, doc_id: str, type: InteractionType, value: float | None = None) -> Answer:
        raise NotImplementedError

    def _send(self, request: RankResponse | str, doc_id: str, type: InteractionType, value: float | None = None) -> Answer:
        return self._one(request.request_id if isinstance(request, RankResponse) else request, doc_id, type, value)

    def click(self, request: RankResponse | str, doc_id: str) -> Answer:
        return self._send(request, doc_id, InteractionType.click)

    def skip(self, request: RankResponse | str, doc_id: str) -> Answer:
        return self._send(request, doc_id, InteractionType.skip)

    def dwell(self, request: RankResponse | str, doc_id: str, seconds: float) -> Answer:
        return self._send(request, doc_id, InteractionType.dwell, seconds)

    def cite(self, request: RankResponse | str, doc_id: str) -> Answer:
        return self._send(request, doc_id, InteractionType.cite)

    def citation_deleted(self, request: RankResponse | str, doc_id: str) -> Answer:
        return self._send(request, doc_id, InteractionType.citation_deleted)

    def purchase(self, request: RankResponse | str, doc_id: str, amount: float | None = None) -> Answer:
        return self._send(request, doc_id, InteractionType.purchase, amount)

    def return_(self, request: RankResponse | str, doc_id: str) -> Answer:
        return self._send(request, doc_id, InteractionType.return_)


class RankloopClient(EventHelpers[EventsResponse]):
    """`url` is the serving worker; `api_key` one from `rankloop keys create` (scopes rank and
    events:write). With `kafka` set, interactions go straight to the broker (kafka-python producer,
    acks=all) instead of POST /events. `deployment` names the topics. `user_secret` (from `rankloop keys
    user-secret`; on a backend only) signs every `user` it passes, so their feedback counts as people's."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        kafka: str | None = None,
        deployment: str = "rankloop",
        timeout: float = 30.0,
        api_key: str | None = None,
        user_secret: str | None = None,
    ):
        self.user_secret = user_secret
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=32))
        self.topic = Keys(deployment).interactions
        self.producer: Any = None
        if kafka:
            from kafka import KafkaProducer

            self.producer = KafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=5, retries=5)

    def _vouch(self, user: str | None) -> dict[str, str]:
        """A user token for `user` when this client holds the user-signing secret (a backend that
        authenticated the user): the server then counts the user's feedback as a person's."""
        return {"user_token": sign_user(self.user_secret, user)} if self.user_secret and user else {}

    def rank(
        self,
        query: str,
        k: int = 10,
        user: str | None = None,
        session: str | None = None,
        filters: dict[str, Any] | None = None,
        fields: bool = False,
    ) -> RankResponse:
        """The top `k` for a query, among documents passing `filters` (`{"lang": "en", "year": {"gte": 2020}}`)."""
        body: dict[str, Any] = {"query": query, "k": k, "user": user, "session": session, **self._vouch(user)}
        if filters:
            body["filters"] = filters
        if fields:
            body["fields"] = True
        r = self.http.post("/rank", json=body)
        if r.status_code != 200:
            raise RequestFailed(f"/rank answered {r.status_code}: {r.text}")
        return RankResponse.model_validate(r.json())

    def rerank(
        self,
        query: str,
        candidates: Sequence[str | dict[str, Any]],
        top_n: int | None = None,
        user: str | None = None,
        session: str | None = None,
    ) -> RankResponse:
        """Your own candidates in the served model's order: ids of indexed documents, or inline
        `{"id", "text", "title"?}` documents. Report clicks on the answer as for `rank`."""
        body = {"query": query, "candidates": list(candidates), "top_n": top_n, "user": user, "session": session}
        body.update(self._vouch(user))
        r = self.http.post("/rerank", json=body)
        if r.status_code != 200:
            raise RequestFailed(f"/rerank answered {r.status_code}: {r.text}")
        return RankResponse.model_validate(r.json())

    def put_documents(self, documents: Sequence[dict[str, Any]]) -> DocumentsResponse:
        """Upserts documents (`schemas.documents.Document`); each is stored or refused with its reason."""
        r = self.http.put("/documents", json=list(documents))
        if r.status_code not in (200, 422):
            raise RequestFailed(f"/documents answered {r.status_code}: {r.text}")
        return DocumentsResponse.model_validate(r.json())

    def delete_documents(self, ids: Sequence[str]) -> DeletedResponse:
        """Deletes documents: once this returns, no answer shows them."""
        r = self.http.post("/documents/delete", json={"ids": list(ids)})
        if r.status_code != 200:
            raise RequestFailed(f"/documents/delete answered {r.status_code}: {r.text}")
        return DeletedResponse.model_validate(r.json())

    def event(
        self, request_id: str, doc_id: str, type: str | InteractionType, value: float | None = None, event_id: str | None = None
    ) -> InteractionEvent:
        return InteractionEvent(
            event_id=event_id or uuid.uuid4().hex, request_id=request_id, doc_id=doc_id, type=InteractionType(type), value=value
        )

    def emit(self, events: Sequence[InteractionEvent | dict]) -> EventsResponse:
        """Sends a batch; each event is accepted (durably recorded) or rejected with a code."""
        if self.producer is not None:
            return self._emit_kafka(events)
        payload = [e.model_dump(mode="json") if isinstance(e, InteractionEvent) else e for e in events]
        r = self.http.post("/events", json=payload)
        if r.status_code not in (200, 422):
            raise RequestFailed(f"/events answered {r.status_code}: {r.text}")
        return EventsResponse.model_validate(r.json())

    def _emit_kafka(self, events: Sequence[InteractionEvent | dict]) -> EventsResponse:
        accepted, rejected, futures = [], [], []
        for i, e in enumerate(events):
            try:
                ev = e if isinstance(e, InteractionEvent) else InteractionEvent.model_validate(e)
            except ValueError as exc:
                rejected.append(Rejection(index=i, event_id=None, code=RejectCode.invalid_event, detail=f"invalid event: {exc}"))
                continue
            futures.append(
                (i, ev, self.producer.send(self.topic, key=ev.request_id.encode(), value=ev.model_dump_json().encode()))
            )
        self.producer.flush()
        for i, ev, f in futures:
            try:
                f.get(timeout=10)
                accepted.append(ev.event_id)
            except Exception as exc:
                rejected.append(
                    Rejection(index=i, event_id=ev.event_id, code=RejectCode.not_recorded, detail=f"not recorded: {exc}")
                )
        return EventsResponse(accepted=accepted, rejected=sorted(rejected, key=lambda r: r.index))

    def _one(self, request_id: str, doc_id: str, type: InteractionType, value: float | None = None) -> EventsResponse:
        """One event, sent now (the helpers `click`, `skip`, `dwell`, ... call it)."""
        return self.emit([self.event(request_id, doc_id, type, value)])

    def emitter(self, **options: Any) -> EventEmitter:
        """A background, batching sender on this client (see `EventEmitter` for the options)."""
        return EventEmitter(self, **options)

    def close(self) -> None:
        self.http.close()
        if self.producer is not None:
            self.producer.close()


Rejected = Callable[[InteractionEvent, Rejection], None]


class EventEmitter(EventHelpers[bool]):
    """Sends interaction events without blocking the caller. Events wait in a bounded queue
    (`capacity`; when it is full `emit` returns False and counts the event in `dropped`); a background
    thread sends them in batches of up to `batch`, at least every `flush_s`. What was not recorded
    (connection errors, 429, 5xx, `not_recorded`) is retried with exponential backoff from `backoff_s`
    (or the server's Retry-After), up to `max_attempts`; then it counts as `failed`. Events the server
    refuses for a reason (invalid, late, duplicate) count as `rejected`; both go to `on_rejected`. A
    duplicate on a retry means an earlier attempt was recorded after all: it counts as `sent`.
    `flush()` waits for everything queued; `close()` flushes and stops, and also runs at exit."""

    def __init__(
        self,
        client: RankloopClient,
        batch: int = 500,
        flush_s: float = 1.0,
        capacity: int = 100_000,
        max_attempts: int = 8,
        backoff_s: float = 0.5,
        on_rejected: Rejected | None = None,
    ):
        self.client, self.batch, self.flush_s = client, batch, flush_s
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.on_rejected = on_rejected or (lambda ev, rej: log.warning("event %s not taken: %s", ev.event_id, rej.detail))
        self.queue: queue.Queue[InteractionEvent] = queue.Queue(capacity)
        self.sent = self.rejected = self.failed = self.dropped = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rankloop-emitter", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _one(self, request_id: str, doc_id: str, type: InteractionType, value: float | None = None) -> bool:
        return self.emit(request_id, doc_id, type, value)

    def emit(self, request_id: str, doc_id: str, type: str | InteractionType, value: float | None = None) -> bool:
        """Queues one event (validated now, so a bad one raises here, in the caller's code)."""
        return self.send(self.client.event(request_id, doc_id, type, value))

    def send(self, event: InteractionEvent) -> bool:
        try:
            self.queue.put_nowait(event)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until every queued event was sent, rejected or given up; False on timeout."""
        deadline = time.monotonic() + timeout
        while self.queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.queue.unfinished_tasks

    def close(self, timeout: float = 30.0) -> None:
        if self._stop.is_set():
            return
        self.flush(timeout)
        self._stop.set()
        self._thread.join(timeout=5)
        atexit.unregister(self.close)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                events = [self.queue.get(timeout=self.flush_s)]
            except queue.Empty:
                continue
            due = time.monotonic() + self.flush_s  # a batch waits at most flush_s for company
            while len(events) < self.batch and not self._stop.is_set():
                try:
                    events.append(self.queue.get(timeout=max(0.0, due - time.monotonic())))
                except queue.Empty:
                    break
            try:
                self._deliver(events)
            finally:
                for _ in events:
                    self.queue.task_done()

    def _deliver(self, events: list[InteractionEvent]) -> None:
        retried: set[str] = set()
        for attempt in range(self.max_attempts):
            events, wait = self._attempt(events, retried)
            if not events:
                return
            retried |= {e.event_id for e in events}
            if attempt + 1 < self.max_attempts:
                time.sleep(wait or min(30.0, self.backoff_s * 2**attempt))
        self.failed += len(events)
        for ev in events:
            self.on_rejected(
                ev, Rejection(index=0, event_id=ev.event_id, code=RejectCode.not_recorded, detail=str(self.last_error))
            )

    def _give_up(self, events: list[InteractionEvent]) -> None:
        self.failed += len(events)
        for ev in events:
            self.on_rejected(
                ev, Rejection(index=0, event_id=ev.event_id, code=RejectCode.not_recorded, detail=str(self.last_error))
            )

    def _attempt(self, events: list[InteractionEvent], retried: set[str]) -> tuple[list[InteractionEvent], float]:
        """One send: the events to try again, and how long the server asked to wait (0: back off)."""
        if self.client.producer is not None:
            answer = self.client.emit(list(events))
        else:
            try:
                r = self.client.http.post("/events", json=[e.model_dump(mode="json") for e in events])
            except httpx.HTTPError as e:
                self.last_error = f"{type(e).__name__}: {e}"
                return events, 0.0
            if r.status_code == 429 or r.status_code >= 500:
                self.last_error = f"/events answered {r.status_code}: {r.text[:200]}"
                return events, float(r.headers.get("Retry-After", 0) or 0)
            if r.status_code not in (200, 422):  # the batch itself is refused (401, 403, 413): retrying cannot help
                self.last_error = f"/events answered {r.status_code}: {r.text[:200]}"
                self.failed += len(events)
                for ev in events:
                    self.on_rejected(
                        ev, Rejection(index=0, event_id=ev.event_id, code=RejectCode.not_recorded, detail=self.last_error)
                    )
                return [], 0.0
            answer = EventsResponse.model_validate(r.json())
        self.sent += len(answer.accepted)
        again = []
        for rej in answer.rejected:
            ev = events[rej.index]
            if rej.code == RejectCode.not_recorded:
                self.last_error = rej.detail
                again.append(ev)
            elif rej.code == RejectCode.duplicate_event and ev.event_id in retried:
                self.sent += 1  # an earlier attempt was recorded after all
            else:
                self.rejected += 1
                self.on_rejected(ev, rej)
        return again, 0.0
