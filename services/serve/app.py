"""The serving worker's HTTP face (FastAPI): `build_worker` wires the real storage from the settings,
`create_app` mounts the routers (`routes/`) on any worker. A serving replica only reads the registry:
admin routes and the status page belong to the control process (`services.control.app`)."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from schemas import InteractionEvent
from schemas.documents import Document
from services.config import Settings
from services.dead_letters import DeadLetterLog, KafkaDeadLetterLog
from services.http import new_app
from services.serve.documents_feed import DocumentFeed
from services.serve.routes import documents, events, health, ranking
from services.serve.worker import Worker
from services.storage import open_caches, open_publisher, open_registry
from services.storage.health import status
from training import self_check
from training.ranking.first_stage import FirstStage

log = logging.getLogger("rankloop.serve")


def build_worker(s: Settings) -> Worker:
    """A worker on the configured broker, Redis and MLflow, serving the current index. It starts
    even when one of them is down (ranking needs none of them) and says so loudly."""
    for c in status(s):
        if not c.up:
            log.warning("%s at %s is down: serving without it until it is back", c.name, c.address)
    first_stage = FirstStage.current(s.state_dir)
    if s.corpus.fields:
        first_stage.store.declare(s.corpus.fields)
    caches = open_caches(s.redis_url, s.keys, s.serving.cache_ttl_s, int(s.stream.join_window_s * 2))
    publisher = open_publisher(s.kafka.address, s.keys.topics(), s.kafka.partitions, s.serving.impression_buffer)
    worker = Worker(s, first_stage, caches, publisher, open_registry(s, reader=True))
    worker.documents_feed = DocumentFeed(s.kafka.address, s.keys.documents, s.keys.dead_letters, first_stage.store, publisher)
    worker.index_problem = self_check.probe(first_stage)
    if worker.index_problem:  # answers anyway (what else), but never reports itself ready
        log.error("%s", worker.index_problem)
    exempt_from_gc()
    return worker


def exempt_from_gc() -> None:
    """Moves everything alive now (imported libraries, the index) out of the garbage collector's reach.
    A full collection of a serving process walks ~720k objects and stopped every request for ~400 ms
    at random moments (p99 190 ms, max 550 ms under 8 clients, no swap in progress). Called before any
    model is loaded: models have reference cycles and must stay collectable, or each swap would leak one.
    """
    gc.collect()
    gc.freeze()


def app_from_environment() -> FastAPI:
    """The app of one worker process under `rankloop serve --workers N` (uvicorn's factory): settings
    from the environment, one torch thread unless configured."""
    from services import logs
    from training.ranking.encoder import use_threads

    s = Settings()
    logs.configure(s.log_format)
    use_threads(s.torch_threads or 1)
    return create_app(s)


def watch_model_events(worker: Worker, s: Settings) -> None:
    """A model event only says "look now": the registry stays the source of truth."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        s.keys.model_events,
        bootstrap_servers=s.kafka.address,
        group_id=None,
        auto_offset_reset="latest",
        consumer_timeout_ms=1000,
    )
    while not worker.stopped:
        for _ in consumer:
            worker.wake()
    consumer.close()


def create_app(
    s: Settings, worker: Worker | None = None, watch_events: bool = True, dead_letters: DeadLetterLog | None = None
) -> FastAPI:
    """The app of one serving worker; `worker` built from the settings and the dead letters read from
    the broker when not given (tests hand in their own)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        w = worker or build_worker(s)
        app.state.worker = w
        if app.state.key_gate.open:
            log.warning(
                "NO AUTHENTICATION: %s holds no API key, so anyone who reaches this port may rank and emit events. "
                "Create keys with `rankloop keys create` (or set RANKLOOP_AUTH__REQUIRED=true) before exposing it.",
                s.keys_file,
            )
        threading.Thread(target=w.watch_registry, name="registry-watch", daemon=True).start()
        threading.Thread(target=w.watch_corpus, name="corpus-watch", daemon=True).start()
        if watch_events:
            threading.Thread(target=watch_model_events, args=(w, s), name="model-events", daemon=True).start()
        log.info("serving worker %s on %s (/rank /events /health/ready /metrics)", w.name, s.base_url)
        yield
        w.stop()

    app = new_app(
        s,
        "rankloop serving worker",
        "Rank with the current champion model and take in what users did with the results.",
        lifespan,
    )
    app.state.dead_letters = dead_letters or KafkaDeadLetterLog(s.kafka.address, s.keys.dead_letters)
    if s.serving.cors_origins:  # browsers on these origins may send events and rank (keys still apply)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=s.serving.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=3600,
        )
    for router in (ranking.router, documents.router, events.router, health.router):
        app.include_router(router)

    def openapi() -> dict[str, Any]:
        """The generated schema, plus InteractionEvent: /events reads its body by hand (one by one)."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            event_schema = InteractionEvent.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(event_schema.pop("$defs", {}))
            components["InteractionEvent"] = event_schema
            doc_schema = Document.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(doc_schema.pop("$defs", {}))
            components["Document"] = doc_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
