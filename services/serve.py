"""The serving worker: POST /rank, POST /events, GET /model, /health, /metrics.

Hot swap: a background thread watches model events on Kafka and polls the MLflow `champion` alias;
a new version is downloaded, loaded and warmed off the request path, then swapped in with one
reference assignment. A request takes its own reference at the start, so requests in flight finish
on the model they began with and no request ever fails because of a swap.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from kafka import KafkaConsumer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field, ValidationError
from redis import Redis
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from schemas import MAX_QUERY_CHARS, ImpressionEvent, InteractionEvent, ShownItem
from services.bus import EventPublisher, RankCache, RedisEmbeddingCache, make_producer
from services.config import Settings
from services.infra import kafka_reachable, require
from training import registry
from training.reranker import FIRST_STAGE, Reranker, first_stage_order
from training.retrieval import Candidate, FirstStage

log = logging.getLogger("rankloop.serve")


class RankRequest(BaseModel):
    query: Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)]
    k: Annotated[int, Field(ge=1, le=100)] = 10
    user: str | None = None
    session: str | None = None


class RankedItem(BaseModel):
    doc_id: str
    score: float
    position: int
    title: str


class RankResponse(BaseModel):
    request_id: str
    model_version: str
    items: list[RankedItem]


@dataclass(frozen=True)
class Serving:
    """What one request ranks with; replaced whole on a swap."""

    version: str
    reranker: Reranker | None
    loaded_at: float


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rankloop_rank_requests", "rank requests", ["cache"], registry=r)
        self.latency = Histogram("rankloop_rank_latency_seconds", "rank latency", ["cache"], registry=r,
                                 buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.events_accepted = Counter("rankloop_events_accepted", "interaction events accepted", registry=r)
        self.events_rejected = Counter("rankloop_events_rejected", "interaction events rejected", ["reason"], registry=r)
        self.publish_failures = Counter("rankloop_publish_failures", "events that could not be recorded on Kafka", ["topic"], registry=r)
        self.impressions = Counter("rankloop_impressions_published", "impressions handed to Kafka", registry=r)
        self.swaps = Counter("rankloop_model_swaps", "model hot swaps", registry=r)
        self.swap_failures = Counter("rankloop_model_swap_failures", "model versions that failed to load", registry=r)
        self.cache_errors = Counter("rankloop_cache_errors", "Redis errors (served without cache)", registry=r)
        self.explored = Counter("rankloop_explored_requests", "requests shown in a randomised order", registry=r)
        self.model_version = Gauge("rankloop_model_version", "served model version (0 = first stage)", registry=r)


class Worker:
    def __init__(self, s: Settings, first_stage: FirstStage | None = None):
        require(s, "kafka", "redis")
        self.s = s
        self.first_stage = first_stage or FirstStage.current(s.state_dir)
        self.redis = Redis.from_url(s.redis)
        self.cache = RankCache(self.redis, s.cache_ttl_s)
        self.embeddings = RedisEmbeddingCache(self.redis)
        self.metrics = Metrics()
        self.rng = random.Random()
        self.publisher = EventPublisher(make_producer(s.bootstrap, acks="all"),
                                        on_error=lambda t: self.metrics.publish_failures.labels(t).inc())
        self.serving = Serving(FIRST_STAGE, None, time.time())
        self.client = registry.connect(s.tracking_uri, s.artifact_dir)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._swap_lock = threading.Lock()
        self.last_swap_error: str | None = None

    # ---- ranking -------------------------------------------------------------------------
    def candidates(self, query: str) -> list[Candidate]:
        key = self.cache.candidates_key(self.first_stage.version, query, self.s.candidates_k)
        cached = self._cache_get(key)
        if cached is not None:
            return [Candidate(*row) for row in cached]
        cands = self.first_stage.search(query, self.s.candidates_k)
        self._cache_set(key, [[c.doc_id, c.bm25, c.dense, c.fused] for c in cands])
        return cands

    def rank(self, req: RankRequest) -> RankResponse:
        started = time.perf_counter()
        serving = self.serving  # one reference for the whole request: a swap cannot change it midway
        key = self.cache.results_key(self.first_stage.version, serving.version, req.query, req.k)
        items = self._cache_get(key)
        hit = items is not None
        if not hit:
            cands = self.candidates(req.query)
            if serving.reranker is None:
                ranking = first_stage_order(cands)
            else:
                depth = self.s.train.rerank_depth
                ranking = serving.reranker.rerank(req.query, cands[:depth], self.first_stage.text)
                ranking += first_stage_order(cands[depth:])
            items = [[doc, score] for doc, score in ranking[: req.k]]
            self._cache_set(key, items)
        items, explored = explore(items, self.rng, self.s.explore_rate, self.s.explore_depth)
        response = RankResponse(
            request_id=uuid.uuid4().hex,
            model_version=serving.version,
            items=[RankedItem(doc_id=d, score=round(s, 6), position=i + 1, title=self.first_stage.title(d))
                   for i, (d, s) in enumerate(items)],
        )
        impression = ImpressionEvent(
            request_id=response.request_id, query=req.query, user=req.user, session=req.session,
            items=[ShownItem(doc_id=it.doc_id, position=it.position, score=it.score) for it in response.items],
            model_version=serving.version, index_version=self.first_stage.version, explored=explored,
        )
        if self.publisher.publish(self.s.topic_impressions, response.request_id, impression) is not None:
            self.metrics.impressions.inc()
        label = "hit" if hit else "miss"
        self.metrics.explored.inc(explored)
        self.metrics.requests.labels(label).inc()
        self.metrics.latency.labels(label).observe(time.perf_counter() - started)
        return response

    def _cache_get(self, key):
        try:
            return self.cache.get(key)
        except RedisError as e:
            self.metrics.cache_errors.inc()
            log.warning("redis get failed, serving without cache: %s", e)
            return None

    def _cache_set(self, key, value):
        try:
            self.cache.set(key, value)
        except RedisError as e:
            self.metrics.cache_errors.inc()
            log.warning("redis set failed: %s", e)

    # ---- event intake --------------------------------------------------------------------
    def ingest(self, events: list) -> tuple[list[str], list[dict]]:
        """Validates each event on its own; valid ones are written to Kafka (acks=all) before the
        answer, so "accepted" means durable. Duplicates (in the batch or seen before) are rejected."""
        accepted, rejected, pending = [], [], []
        seen: set[str] = set()
        for i, raw in enumerate(events):
            try:
                ev = InteractionEvent.model_validate(raw)
            except ValidationError as e:
                reason = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'event'}: {err['msg']}" for err in e.errors())
                rejected.append({"index": i, "event_id": raw.get("event_id") if isinstance(raw, dict) else None,
                                 "reason": f"invalid event: {reason}"})
                continue
            if ev.event_id in seen or not self._first_sighting(ev.event_id):
                rejected.append({"index": i, "event_id": ev.event_id, "reason": "duplicate event_id"})
                continue
            seen.add(ev.event_id)
            pending.append((i, ev, self.publisher.publish(self.s.topic_interactions, ev.request_id, ev)))
        self.publisher.producer.flush(timeout=10)
        for i, ev, future in pending:
            try:
                if future is None:
                    raise RuntimeError("producer refused the event")
                future.get(timeout=10)
                accepted.append(ev.event_id)
            except Exception as e:  # noqa: BLE001 - any broker failure rejects this event only
                self.redis.delete(self._seen_key(ev.event_id))
                rejected.append({"index": i, "event_id": ev.event_id, "reason": f"not recorded: Kafka unavailable ({e})"})
        self.metrics.events_accepted.inc(len(accepted))
        for r in rejected:
            self.metrics.events_rejected.labels(r["reason"].split(":")[0]).inc()
        return accepted, rejected

    def _seen_key(self, event_id: str) -> str:
        return f"rankloop:event:{event_id}"

    def _first_sighting(self, event_id: str) -> bool:
        ttl = int(self.s.join_window_s * 2)
        return bool(self.redis.set(self._seen_key(event_id), 1, nx=True, ex=ttl))

    # ---- hot swap ------------------------------------------------------------------------
    def check_champion(self) -> bool:
        """Loads and swaps in the registry's champion if it differs from what is served."""
        with self._swap_lock:
            current = registry.champion(self.client, self.s.model_name)
            if current is None or current.version == self.serving.version:
                return False
            try:
                folder = registry.download(current.source, self.s.state_dir / "versions" / current.version)
                reranker = Reranker(folder, current.version, self.embeddings)
                reranker.rerank("warm up", self.candidates("warm up")[:8], self.first_stage.text)
            except Exception as e:  # noqa: BLE001 - a bad version must not take serving down
                self.metrics.swap_failures.inc()
                self.last_swap_error = f"version {current.version}: {e}"
                log.exception("failed to load model version %s; still serving %s", current.version, self.serving.version)
                return False
            self.serving = Serving(current.version, reranker, time.time())
            self.metrics.swaps.inc()
            self.metrics.model_version.set(int(current.version))
            log.warning("hot-swapped to model version %s", current.version)
            return True

    def _watch_registry(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_champion()
            except Exception:  # noqa: BLE001
                log.exception("champion check failed")
            self._wake.wait(self.s.champion_poll_s)
            self._wake.clear()

    def _watch_model_events(self) -> None:
        consumer = KafkaConsumer(self.s.topic_model_events, bootstrap_servers=self.s.bootstrap, group_id=None,
                                 auto_offset_reset="latest", consumer_timeout_ms=1000)
        while not self._stop.is_set():
            for _ in consumer:
                self._wake.set()  # the registry stays the source of truth; the event only says "look now"
        consumer.close()

    def start_background(self) -> None:
        threading.Thread(target=self._watch_registry, name="registry-watch", daemon=True).start()
        threading.Thread(target=self._watch_model_events, name="model-events", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.publisher.producer.flush(timeout=5)


def explore(items: list, rng: random.Random, rate: float, depth: int) -> tuple[list, bool]:
    """With probability `rate`, the top `depth` items in a uniformly random order (RandTop-n,
    Joachims et al. 2017): the same documents at many positions is what lets the examination curve be
    estimated from our own clicks. The rest of the list, and every item's score, is unchanged."""
    if rate <= 0 or len(items) < 2 or rng.random() >= rate:
        return items, False
    head = items[:depth]
    rng.shuffle(head)
    return head + items[depth:], True


def create_app(s: Settings, worker: Worker | None = None) -> FastAPI:
    state: dict[str, Worker] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        w = worker or Worker(s)
        state["w"] = w
        w.start_background()
        yield
        w.stop()

    app = FastAPI(title="rankloop serving worker", lifespan=lifespan)

    @app.post("/rank", response_model=RankResponse)
    def rank(req: RankRequest) -> RankResponse:
        return state["w"].rank(req)

    @app.post("/events")
    async def events(request: Request):
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPException(400, f"malformed JSON: {e}") from None
        batch = payload.get("events") if isinstance(payload, dict) else payload
        if not isinstance(batch, list):
            raise HTTPException(422, 'expected a JSON array of events or {"events": [...]}')
        if len(batch) > s.max_batch:
            raise HTTPException(413, f"batch of {len(batch)} events exceeds the limit of {s.max_batch}")
        accepted, rejected = await run_in_threadpool(state["w"].ingest, batch)
        status = 200 if accepted or not batch else 422
        return JSONResponse({"accepted": accepted, "rejected": rejected}, status_code=status)

    @app.get("/model")
    def model():
        w = state["w"]
        sv = w.serving
        return {"model_version": sv.version, "index_version": w.first_stage.version,
                "alpha": sv.reranker.alpha if sv.reranker else None, "loaded_at": sv.loaded_at,
                "model_name": s.model_name, "last_swap_error": w.last_swap_error}

    @app.get("/health")
    def health():
        w = state["w"]
        try:
            redis_ok = bool(w.redis.ping())
        except RedisError:
            redis_ok = False
        kafka_ok = kafka_reachable(s.bootstrap)
        ok = redis_ok and kafka_ok
        return JSONResponse({"status": "ok" if ok else "degraded", "redis": redis_ok, "kafka": kafka_ok,
                             "model_version": w.serving.version}, status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(state["w"].metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
