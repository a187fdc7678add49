"""Python SDK: rank and emit interactions in two lines, over HTTP or straight to Kafka.

    client = RankloopClient("http://127.0.0.1:8000")          # or RankloopClient(kafka="host:9092")
    res = client.rank("what causes scurvy?"); client.click(res, res.items[0].doc_id)
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from schemas import InteractionEvent, InteractionType


class RankloopError(RuntimeError):
    pass


class Ranked:
    def __init__(self, data: dict[str, Any]):
        self.request_id: str = data["request_id"]
        self.model_version: str = data["model_version"]
        self.items = [_Item(**it) for it in data["items"]]


class _Item:
    def __init__(self, doc_id: str, score: float, position: int, title: str):
        self.doc_id, self.score, self.position, self.title = doc_id, score, position, title


class RankloopClient:
    """`url` is the serving worker; with `kafka` set, interactions go straight to the broker
    (kafka-python producer, acks=all) instead of POST /events."""

    def __init__(self, url: str = "http://127.0.0.1:8000", kafka: str | None = None,
                 topic: str = "rankloop.interactions", timeout: float = 30.0):
        self.http = httpx.Client(base_url=url, timeout=timeout, limits=httpx.Limits(max_connections=32))
        self.topic = topic
        self.producer = None
        if kafka:
            from services.bus import make_producer

            self.producer = make_producer(kafka, acks="all")

    def rank(self, query: str, k: int = 10, user: str | None = None, session: str | None = None) -> Ranked:
        r = self.http.post("/rank", json={"query": query, "k": k, "user": user, "session": session})
        if r.status_code != 200:
            raise RankloopError(f"/rank answered {r.status_code}: {r.text}")
        return Ranked(r.json())

    def event(self, request_id: str, doc_id: str, type: str | InteractionType, value: float | None = None,
              event_id: str | None = None) -> InteractionEvent:
        return InteractionEvent(event_id=event_id or uuid.uuid4().hex, request_id=request_id, doc_id=doc_id,
                                type=InteractionType(type), value=value)

    def emit(self, events: list[InteractionEvent | dict]) -> dict:
        """Sends a batch; returns {"accepted": [...], "rejected": [{"index", "event_id", "reason"}]}."""
        if self.producer is not None:
            return self._emit_kafka(events)
        payload = [e.model_dump(mode="json") if isinstance(e, InteractionEvent) else e for e in events]
        r = self.http.post("/events", json=payload)
        if r.status_code not in (200, 422):
            raise RankloopError(f"/events answered {r.status_code}: {r.text}")
        return r.json()

    def _emit_kafka(self, events) -> dict:
        accepted, rejected, futures = [], [], []
        for i, e in enumerate(events):
            try:
                ev = e if isinstance(e, InteractionEvent) else InteractionEvent.model_validate(e)
            except ValueError as exc:
                rejected.append({"index": i, "event_id": None, "reason": f"invalid event: {exc}"})
                continue
            futures.append((i, ev, self.producer.send(self.topic, key=ev.request_id, value=ev.model_dump_json())))
        self.producer.flush()
        for i, ev, f in futures:
            try:
                f.get(timeout=10)
                accepted.append(ev.event_id)
            except Exception as exc:  # noqa: BLE001
                rejected.append({"index": i, "event_id": ev.event_id, "reason": f"not recorded: {exc}"})
        return {"accepted": accepted, "rejected": rejected}

    def click(self, ranked: Ranked, doc_id: str, **kw) -> dict:
        return self.emit([self.event(ranked.request_id, doc_id, "click", **kw)])

    def close(self) -> None:
        self.http.close()
        if self.producer is not None:
            self.producer.close()
