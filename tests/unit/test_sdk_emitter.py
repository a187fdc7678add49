"""The background emitter: batches, retries what was not recorded, reports the rest, never blocks."""

from __future__ import annotations

import json
import threading

import httpx

from services.sdk import EventEmitter, RankloopClient


def client_answering(handler) -> RankloopClient:
    client = RankloopClient("http://rankloop.test")
    client.http = httpx.Client(base_url="http://rankloop.test", transport=httpx.MockTransport(handler))
    return client


def answer(events, accepted=None, rejected=()):
    ids = [e["event_id"] for e in events]
    return httpx.Response(200, json={"accepted": ids if accepted is None else accepted, "rejected": list(rejected)})


def test_events_are_batched_and_a_5xx_is_retried_until_recorded():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)
        calls.append(len(events))
        if len(calls) == 1:
            return httpx.Response(503, json={"detail": "Kafka unavailable"}, headers={"Retry-After": "0"})
        return answer(events)

    emitter = EventEmitter(client_answering(handler), batch=100, flush_s=0.2, backoff_s=0.01)
    for i in range(50):
        assert emitter.click("r1", f"d{i}")
    assert emitter.flush(10)
    emitter.close()
    assert emitter.sent == 50 and emitter.failed == 0 and calls == [50, 50]


def test_not_recorded_is_retried_a_duplicate_on_retry_counts_as_sent_and_a_real_rejection_is_reported():
    seen: list[str] = []
    reported = []

    def handler(request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)
        if not seen:  # first attempt: e0 accepted, e1 not recorded, e2 invalid for the server (late)
            seen.extend(e["event_id"] for e in events)
            return answer(
                events,
                accepted=[events[0]["event_id"]],
                rejected=[
                    {"index": 1, "event_id": events[1]["event_id"], "code": "not_recorded", "detail": "timeout"},
                    {"index": 2, "event_id": events[2]["event_id"], "code": "late_event", "detail": "late"},
                ],
            )
        # the retry: e1 was in fact written the first time
        dup = {"index": 0, "event_id": events[0]["event_id"], "code": "duplicate_event", "detail": "duplicate"}
        return answer(events, accepted=[], rejected=[dup])

    emitter = EventEmitter(
        client_answering(handler), flush_s=0.1, backoff_s=0.01, on_rejected=lambda ev, rej: reported.append(rej.code.value)
    )
    for i in range(3):
        emitter.click("r1", f"d{i}")
    emitter.close()
    assert (emitter.sent, emitter.rejected, emitter.failed) == (2, 1, 0) and reported == ["late_event"]


def test_a_full_queue_drops_instead_of_blocking_and_giving_up_is_reported():
    sending, release = threading.Event(), threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        sending.set()  # the sender is busy with the first batch while the caller goes on
        release.wait(10)
        raise httpx.ConnectError("connection refused")

    reported = []
    emitter = EventEmitter(
        client_answering(handler), capacity=2, flush_s=0.05, max_attempts=2, backoff_s=0.01,
        on_rejected=lambda ev, rej: reported.append(rej.detail),
    )  # fmt: skip
    assert emitter.dwell("r1", "d0", 3.0)
    assert sending.wait(10)  # the first event is on its way
    results = [emitter.dwell("r1", f"d{i}", 3.0) for i in range(1, 6)]
    assert results == [True, True, False, False, False] and emitter.dropped == 3  # the caller learns at once
    release.set()
    emitter.close(timeout=10)
    assert emitter.failed == 3 and len(reported) == 3 and all("ConnectError" in d for d in reported)


def test_the_blocking_client_has_every_event_type_the_emitter_has():
    """`client.skip(res, doc)`, `client.cite(...)`, ...: one request each, as `click` was."""
    posted: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)
        posted.extend(events)
        return answer(events)

    client = client_answering(handler)
    helpers = ("click", "skip", "cite", "citation_deleted", "return_")
    for name in helpers:
        assert getattr(client, name)("r1", "d1").accepted
    client.dwell("r1", "d1", 42.0)
    client.purchase("r1", "d1", 19.9)
    assert [(e["type"], e["value"]) for e in posted] == [
        ("click", None), ("skip", None), ("cite", None), ("citation_deleted", None), ("return", None),
        ("dwell", 42.0), ("purchase", 19.9),
    ]  # fmt: skip
    assert {name for name in dir(EventEmitter) if not name.startswith("_")} - {"emit", "send", "flush", "close"} <= set(
        dir(client)
    )
