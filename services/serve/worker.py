"""The serving worker's logic: rank, take in events, swap models. No HTTP here (see `app.py`) and no
storage of its own: caches, the publisher and the registry are handed in, so all of it runs in unit
tests on in-memory storage.

Hot swap: a background thread watches model events on Kafka and polls the registry's `champion`
alias; a new version is downloaded, loaded and warmed off the request path, then swapped in with one
reference assignment. A request takes its own reference at the start, so requests in flight finish
on the model they began with and no request ever fails because of a swap.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas import (
    DependencyUnavailable,
    ImpressionEvent,
    InteractionEvent,
    RankedItem,
    RankRequest,
    RankResponse,
    RejectCode,
    Rejection,
    ShownItem,
)
from services.config import Settings
from services.serve.metrics import ServingMetrics
from services.storage import Caches, Publisher
from training.ranking.first_stage import Candidate, FirstStage
from training.ranking.query import query_key
from training.ranking.rank import FIRST_STAGE, rank
from training.ranking.reranker import EmbeddingCache, Reranker
from training.registry import ModelRegistry

log = logging.getLogger("rankloop.serve")
ModelLoader = Callable[..., Reranker]


@dataclass(frozen=True)
class Serving:
    """What one request ranks with; replaced whole on a swap."""

    version: str
    reranker: Reranker | None
    loaded_at: float


def validation_detail(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'event'}: {err['msg']}" for err in e.errors())


class Worker:
    def __init__(
        self,
        s: Settings,
        first_stage: FirstStage,
        caches: Caches,
        publisher: Publisher,
        registry: ModelRegistry,
        load_model: Callable[[Any, str, EmbeddingCache], Reranker] = Reranker,
        rng: random.Random | None = None,
    ):
        self.s, self.keys = s, s.keys
        self.first_stage = first_stage
        self.caches = caches
        self.publisher = publisher
        self.registry = registry
        self.load_model = load_model
        self.metrics = ServingMetrics()
        self.rng = rng or random.Random()
        self.serving = Serving(FIRST_STAGE, None, time.time())
        self.last_swap_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._swap_lock = threading.Lock()

    # ---- ranking -------------------------------------------------------------------------
    def candidates(self, query: str) -> list[Candidate]:
        k = self.s.serving.candidates_k
        key = self.keys.candidates(self.first_stage.version, k, query_key(query))
        cached = self._cache_get(key)
        if cached is not None:
            return [Candidate(*row) for row in cached]
        cands = self.first_stage.search(query, k)
        self._cache_set(key, [[c.doc_id, c.bm25, c.dense, c.fused] for c in cands])
        return cands

    def rank(self, req: RankRequest) -> RankResponse:
        started = time.perf_counter()
        serving = self.serving  # one reference for the whole request: a swap cannot change it midway
        key = self.keys.results(self.first_stage.version, serving.version, req.k, query_key(req.query))
        items = self._cache_get(key)
        hit = items is not None
        if items is None:
            ranking = rank(
                req.query, self.candidates(req.query), serving.reranker, self.first_stage.text, self.s.serving.rerank_depth
            )
            items = [[doc, score] for doc, score in ranking[: req.k]]
            self._cache_set(key, items)
        items, explored = explore(items, self.rng, self.s.serving.explore_rate, self.s.serving.explore_depth)
        response = RankResponse(
            request_id=uuid.uuid4().hex,
            model_version=serving.version,
            items=[
                RankedItem(doc_id=d, score=round(s, 6), position=i + 1, title=self.first_stage.title(d))
                for i, (d, s) in enumerate(items)
            ],
        )
        impression = ImpressionEvent(
            request_id=response.request_id,
            query=req.query,
            user=req.user,
            session=req.session,
            items=[ShownItem(doc_id=it.doc_id, position=it.position, score=it.score) for it in response.items],
            model_version=serving.version,
            index_version=self.first_stage.version,
            explored=explored,
        )
        if self._publish(self.keys.impressions, response.request_id, impression) is not None:
            self.metrics.impressions.inc()
        label = "hit" if hit else "miss"
        self.metrics.explored.inc(explored)
        self.metrics.requests.labels(label).inc()
        self.metrics.latency.labels(label).observe(time.perf_counter() - started)
        return response

    def _cache_get(self, key: str) -> Any | None:
        try:
            return self.caches.ranking.get(key)
        except DependencyUnavailable as e:
            self.metrics.cache_errors.inc()
            log.warning("cache read failed, serving without cache: %s", e)
            return None

    def _cache_set(self, key: str, value: Any) -> None:
        try:
            self.caches.ranking.set(key, value)
        except DependencyUnavailable as e:
            self.metrics.cache_errors.inc()
            log.warning("cache write failed: %s", e)

    def _publish(self, topic: str, key: str, event: BaseModel) -> Future | None:
        future = self.publisher.publish(topic, key, event)
        if future is None:
            self.metrics.publish_failures.labels(topic).inc()
        else:
            future.add_done_callback(lambda f: f.exception() and self.metrics.publish_failures.labels(topic).inc())
        return future

    # ---- event intake --------------------------------------------------------------------
    def ingest(self, events: list) -> tuple[list[str], list[Rejection]]:
        """Validates each event on its own; valid ones are written to the broker (acks=all) before
        the answer, so "accepted" means durable. Duplicates (in the batch or seen before) are rejected;
        an event that was not recorded is forgotten by de-duplication, so a retry is accepted."""
        accepted: list[str] = []
        rejected: list[Rejection] = []
        pending: list[tuple[int, InteractionEvent, Future | None]] = []
        seen: set[str] = set()
        for i, raw in enumerate(events):
            try:
                ev = InteractionEvent.model_validate(raw)
            except ValidationError as e:
                event_id = raw.get("event_id") if isinstance(raw, dict) else None
                rejected.append(
                    Rejection(
                        index=i,
                        event_id=event_id if isinstance(event_id, str) else None,
                        code=RejectCode.invalid_event,
                        detail=f"invalid event: {validation_detail(e)}",
                    )
                )
                continue
            if ev.event_id in seen or not self.caches.seen.first_sighting(ev.event_id):
                rejected.append(
                    Rejection(index=i, event_id=ev.event_id, code=RejectCode.duplicate_event, detail="duplicate event_id")
                )
                continue
            seen.add(ev.event_id)
            pending.append((i, ev, self._publish(self.keys.interactions, ev.request_id, ev)))
        self.publisher.flush(timeout=10)
        for i, ev, future in pending:
            try:
                if future is None:
                    raise RuntimeError("producer refused the event")
                future.result(timeout=10)
                accepted.append(ev.event_id)
            except Exception as e:
                self.caches.seen.forget(ev.event_id)
                rejected.append(
                    Rejection(
                        index=i,
                        event_id=ev.event_id,
                        code=RejectCode.not_recorded,
                        detail=f"not recorded: Kafka unavailable ({e})",
                    )
                )
        self.metrics.events_accepted.inc(len(accepted))
        for r in rejected:
            self.metrics.events_rejected.labels(r.code.value).inc()
        rejected.sort(key=lambda r: r.index)
        return accepted, rejected

    # ---- hot swap ------------------------------------------------------------------------
    def check_champion(self) -> bool:
        """Loads and swaps in the registry's champion if it differs from what is served."""
        with self._swap_lock:
            current = self.registry.champion()
            if current is None or current.version == self.serving.version:
                return False
            try:
                reranker = self.load_model(self.registry.fetch(current), current.version, self.caches.embeddings)
                rank("warm up", self.candidates("warm up")[:8], reranker, self.first_stage.text, 8)
            except Exception as e:
                self.metrics.swap_failures.inc()
                self.last_swap_error = f"version {current.version}: {e}"
                log.exception("failed to load model version %s; still serving %s", current.version, self.serving.version)
                return False
            self.serving = Serving(current.version, reranker, time.time())
            self.metrics.swaps.inc()
            self.metrics.model_version.set(int(current.version) if current.version.isdigit() else -1)
            log.info("hot-swapped to model version %s", current.version)
            return True

    def watch_registry(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_champion()
            except Exception:
                log.exception("champion check failed")
            self._wake.wait(self.s.serving.champion_poll_s)
            self._wake.clear()

    def wake(self) -> None:
        """Check the registry now (a model event arrived)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.publisher.flush(timeout=5)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


def explore(items: list, rng: random.Random, rate: float, depth: int) -> tuple[list, bool]:
    """With probability `rate`, the top `depth` items in a uniformly random order (RandTop-n,
    Joachims et al. 2017): the same documents at many positions is what lets the examination curve be
    estimated from our own clicks. The rest of the list, and every item's score, is unchanged."""
    if rate <= 0 or len(items) < 2 or rng.random() >= rate:
        return items, False
    head = items[:depth]
    rng.shuffle(head)
    return head + items[depth:], True
