"""Python SDK: rank and emit interactions in two lines, over HTTP or straight to Kafka.

    client = RankloopClient("http://127.0.0.1:8000")          # or RankloopClient(kafka="host:9092")
    res = client.rank("what causes scurvy?"); client.click(res, res.items[0].doc_id)

Light on purpose: it imports the contracts in `schemas` and httpx (kafka-python only for the Kafka
path), never torch or the ranking code.
"""

from __future__ import annotations

import uuid
from typing import Any

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
from services.keys import Keys


class RankloopClient:
    """`url` is the serving worker; `api_key` one from `rankloop keys create` (scopes rank and
    events:write). With `kafka` set, interactions go straight to the broker (kafka-python producer,
    acks=all) instead of POST /events. `deployment` names the topics."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        kafka: str | None = None,
        deployment: str = "rankloop",
        timeout: float = 30.0,
        api_key: str | None = None,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, timeout=timeout, headers=headers, limits=httpx.Limits(max_connections=32))
        self.topic = Keys(deployment).interactions
        self.producer: Any = None
        if kafka:
            from kafka import KafkaProducer

            self.producer = KafkaProducer(bootstrap_servers=kafka, acks="all", linger_ms=5, retries=5)

    def rank(self, query: str, k: int = 10, user: str | None = None, session: str | None = None) -> RankResponse:
        r = self.http.post("/rank", json={"query": query, "k": k, "user": user, "session": session})
        if r.status_code != 200:
            raise RequestFailed(f"/rank answered {r.status_code}: {r.text}")
        return RankResponse.model_validate(r.json())

    def event(
        self, request_id: str, doc_id: str, type: str | InteractionType, value: float | None = None, event_id: str | None = None
    ) -> InteractionEvent:
        return InteractionEvent(
            event_id=event_id or uuid.uuid4().hex, request_id=request_id, doc_id=doc_id, type=InteractionType(type), value=value
        )

    def emit(self, events: list[InteractionEvent | dict]) -> EventsResponse:
        """Sends a batch; each event is accepted (durably recorded) or rejected with a code."""
        if self.producer is not None:
            return self._emit_kafka(events)
        payload = [e.model_dump(mode="json") if isinstance(e, InteractionEvent) else e for e in events]
        r = self.http.post("/events", json=payload)
        if r.status_code not in (200, 422):
            raise RequestFailed(f"/events answered {r.status_code}: {r.text}")
        return EventsResponse.model_validate(r.json())

    def _emit_kafka(self, events: list[InteractionEvent | dict]) -> EventsResponse:
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

    def click(self, ranked: RankResponse, doc_id: str, **kw: Any) -> EventsResponse:
        return self.emit([self.event(ranked.request_id, doc_id, "click", **kw)])

    def close(self) -> None:
        self.http.close()
        if self.producer is not None:
            self.producer.close()
