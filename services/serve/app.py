"""The serving worker's HTTP face (FastAPI): /rank, /events, /model, /admin/*, /dead-letters, /schemas, /status,
/health, /metrics.
`build_worker` wires the real storage from the settings; `create_app` takes any worker."""

from __future__ import annotations

import gc
import json
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from schemas import (
    ALL_SCHEMAS,
    MAX_ID_CHARS,
    DeadLetter,
    DependencyUnavailable,
    ErrorBody,
    EventsResponse,
    Health,
    InteractionEvent,
    InvalidState,
    Liveness,
    ModelEvent,
    ModelInfo,
    NotFound,
    PromoteRequest,
    RankRequest,
    RankResponse,
    RollbackRequest,
)
from services.auth import ApiKey, KeyStore, Scope, digest
from services.config import Settings
from services.serve.status import StatusPage, read_activity, read_trainings
from services.serve.worker import Worker
from services.storage import open_caches, open_publisher
from services.storage.health import status
from training import self_check
from training.ranking.first_stage import FirstStage
from training.registry import MlflowRegistry
from training.registry import approve as approve_challenger

BROWSER_SDK = Path(__file__).parent / "static" / "rankloop.js"
log = logging.getLogger("rankloop.serve")


def build_worker(s: Settings) -> Worker:
    """A worker on the configured broker, Redis and MLflow, serving the current index. It starts
    even when one of them is down (ranking needs none of them) and says so loudly."""
    for c in status(s):
        if not c.up:
            log.warning("%s at %s is down: serving without it until it is back", c.name, c.address)
    first_stage = FirstStage.current(s.state_dir)
    caches = open_caches(s.redis_url, s.keys, s.serving.cache_ttl_s, int(s.stream.join_window_s * 2))
    registry = MlflowRegistry.reader(s.tracking_uri, s.keys.model_name, s.versions_dir)
    publisher = open_publisher(s.kafka.address, s.keys.topics(), s.kafka.partitions, s.serving.impression_buffer)
    worker = Worker(s, first_stage, caches, publisher, registry)
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


class BodyLimit:
    """ASGI middleware: refuses a body over `limit` bytes with 413 as soon as the declared length or the
    bytes read so far exceed it, so a 200 MB post never sits in memory."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body over the limit of {self.limit} bytes (serving.max_body_bytes)"
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": too_large}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, too_large)  # FastAPI passes it through body parsing as a 413
            return message

        await self.app(scope, limited, send)


def parse_json(body: bytes) -> Any:
    """The body as JSON, or 400 with the reason: malformed, not UTF-8, NaN/Infinity (not JSON, and
    no score or time can be NaN), or nested too deep to parse."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        return json.loads(body, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise HTTPException(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise HTTPException(400, "malformed JSON: nested too deep") from None


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with where and what, without echoing the input back (it may be huge, or not encodable)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors]
    return JSONResponse({"detail": detail}, status_code=422)


EVENTS_BODY = {
    "description": 'A JSON array of interaction events, or {"events": [...]}; each is validated on its own.',
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"type": "array", "items": {"$ref": "#/components/schemas/InteractionEvent"}},
                    {
                        "type": "object",
                        "properties": {"events": {"type": "array", "items": {"$ref": "#/components/schemas/InteractionEvent"}}},
                        "required": ["events"],
                    },
                ]
            },
            "example": [{"event_id": "e-1", "request_id": "5f0c9a7e2b1d4c3a9e8f7a6b5c4d3e2f", "doc_id": "4983", "type": "click"}],
        }
    },
}


bearer = HTTPBearer(auto_error=False, description="an API key from `rankloop keys create`")
Credentials = HTTPAuthorizationCredentials | None


def key_checker(keys: KeyStore, required: bool) -> Callable[..., Callable[..., ApiKey | None]]:
    """`require(scope, ...)`: a route dependency answering 401 without a valid key, 403 without one of the scopes.
    With no key in the file and `required` off, everything is open (the local default)."""

    def require(*scopes: Scope) -> Callable[..., ApiKey | None]:
        def check(credentials: Credentials = Depends(bearer)) -> ApiKey | None:
            if not (required or keys.enabled):
                return None
            challenge = {"WWW-Authenticate": "Bearer"}
            if credentials is None:
                raise HTTPException(401, "an API key is required: send `Authorization: Bearer rk_...`", headers=challenge)
            key = keys.verify(credentials.credentials)
            if key is None:
                raise HTTPException(401, "unknown or revoked API key", headers=challenge)
            if not any(key.allows(scope) for scope in scopes):
                wanted = " or ".join(repr(scope.value) for scope in scopes)
                raise HTTPException(403, f"the key {key.name!r} lacks the {wanted} scope")
            return key

        return check

    return require


def matches(dead: DeadLetter, request_id: str | None, since: float | None, key_name: str | None) -> bool:
    """Whether a dead letter is about `request_id`, not older than `since`, and from an event the key
    `key_name` sent (None: any)."""
    if since is not None and dead.timestamp < since:
        return False
    if request_id is None and key_name is None:
        return True
    try:
        payload = json.loads(dead.payload)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return False  # unreadable: nothing ties it to a request or a key
    return (request_id is None or payload.get("request_id") == request_id) and (
        key_name is None or payload.get("api_key") == key_name
    )


def rate_limiter(state: dict[str, Worker], s: Settings) -> Callable[[float], Callable[..., None]]:
    """`limit(rate)`: a route dependency answering 429 with Retry-After once the caller's API key has
    used its bucket (an open, keyless server trusts its callers and is not limited). With Redis down
    it lets requests through: ranking must not depend on Redis, and a limiter failing closed would be
    an outage."""
    warned = {"down": False}

    def limit(rate_per_s: float) -> Callable[..., None]:
        def check(request: Request, credentials: Credentials = Depends(bearer)) -> None:
            if rate_per_s <= 0 or credentials is None:
                return
            bucket = f"key:{digest(credentials.credentials)[:16]}"
            try:
                wait = state["w"].caches.limits.take(bucket, rate_per_s, max(1.0, rate_per_s * s.auth.burst_s))
            except DependencyUnavailable as e:
                if not warned["down"]:
                    log.warning("rate limits not enforced while their store is down: %s", e)
                warned["down"] = True
                return
            warned["down"] = False
            if wait > 0:
                state["w"].metrics.rate_limited.labels(request.url.path).inc()
                detail = f"rate limit of {rate_per_s:g} requests/s exceeded; retry in {wait:.1f}s"
                raise HTTPException(429, detail, headers={"Retry-After": str(math.ceil(wait))})

        return check

    return limit


def create_app(s: Settings, worker: Worker | None = None, watch_events: bool = True) -> FastAPI:
    state: dict[str, Worker] = {}
    keys = KeyStore(s.keys_file)
    require = key_checker(keys, s.auth.required)
    limit = rate_limiter(state, s)
    no_key: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorBody, "description": "no valid API key"},
        403: {"model": ErrorBody, "description": "the key lacks the scope"},
        429: {"model": ErrorBody, "description": "rate limit exceeded; see Retry-After"},
    }
    bad_body: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorBody, "description": "malformed JSON"},
        413: {"model": ErrorBody, "description": "body larger than serving.max_body_bytes"},
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        w = worker or build_worker(s)
        state["w"] = w
        if not (s.auth.required or keys.enabled):
            log.warning(
                "NO AUTHENTICATION: %s holds no API key, so anyone who reaches this port may rank and emit events. "
                "Create keys with `rankloop keys create` (or set RANKLOOP_AUTH__REQUIRED=true) before exposing it.",
                s.keys_file,
            )
        threading.Thread(target=w.watch_registry, name="registry-watch", daemon=True).start()
        if watch_events:
            threading.Thread(target=watch_model_events, args=(w, s), name="model-events", daemon=True).start()
        yield
        w.stop()

    app = FastAPI(
        title="rankloop serving worker",
        lifespan=lifespan,
        description="Rank with the current champion model and take in what users did with the results.",
        exception_handlers={RequestValidationError: validation_error},
    )
    app.add_middleware(BodyLimit, limit=s.serving.max_body_bytes)
    if s.serving.cors_origins:  # browsers on these origins may send events and rank (keys still apply)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=s.serving.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=3600,
        )

    @app.post(
        "/rank",
        response_model=RankResponse,
        responses={**bad_body, 422: {"description": "invalid request"}, **no_key},
        dependencies=[Depends(limit(s.auth.rank_per_s))],
    )
    def rank(req: RankRequest, key: ApiKey | None = Depends(require(Scope.rank))) -> RankResponse:
        """Ranked documents for a query; every answer is recorded as an impression (with the key's name)."""
        return state["w"].rank(req, key.name if key else None)

    @app.post(
        "/events",
        response_model=EventsResponse,
        openapi_extra={"requestBody": EVENTS_BODY},
        dependencies=[Depends(limit(s.auth.events_per_s))],
        responses={
            **no_key,
            400: {"model": ErrorBody, "description": "malformed JSON, or not an array of events"},
            413: {"model": ErrorBody, "description": "batch larger than serving.max_batch, or body than serving.max_body_bytes"},
            422: {"model": EventsResponse, "description": "no event of the batch was accepted"},
            503: {"model": ErrorBody, "description": "cannot record durably now (broker or Redis down): retry"},
        },
    )
    async def events(request: Request, key: ApiKey | None = Depends(require(Scope.events_write))) -> JSONResponse:
        """Interaction events, accepted one by one: the good ones of a batch land even when others
        are rejected, each rejection with its code and detail. Each is stamped with the server's time
        and the key's name."""
        payload = parse_json(await request.body())
        batch = payload.get("events") if isinstance(payload, dict) else payload
        if not isinstance(batch, list):
            raise HTTPException(400, 'expected a JSON array of events or {"events": [...]}')
        if len(batch) > s.serving.max_batch:
            raise HTTPException(413, f"batch of {len(batch)} events exceeds the limit of {s.serving.max_batch}")
        try:
            accepted, rejected = await run_in_threadpool(state["w"].ingest, batch, key.name if key else None)
        except DependencyUnavailable as e:
            raise HTTPException(503, str(e), headers={"Retry-After": "5"}) from None
        answer = EventsResponse(accepted=accepted, rejected=rejected)
        return JSONResponse(answer.model_dump(mode="json"), status_code=200 if accepted or not batch else 422)

    @app.get("/model", response_model=ModelInfo, responses=no_key, dependencies=[Depends(require(Scope.rank))])
    def model() -> ModelInfo:
        """The model version served now, its score mix and the last failed swap."""
        w = state["w"]
        sv = w.serving
        return ModelInfo(
            model_version=sv.version,
            index_version=w.first_stage.version,
            mix=sv.reranker.mix.as_dict() if sv.reranker else None,
            unfamiliar_mix=sv.reranker.unfamiliar_mix.as_dict() if sv.reranker and sv.reranker.unfamiliar_mix else None,
            loaded_at=sv.loaded_at,
            model_name=s.keys.model_name,
            last_swap_error=w.last_swap_error,
        )

    admin_errors: dict[int | str, dict[str, Any]] = {
        **no_key,
        **bad_body,
        404: {"model": ErrorBody, "description": "no such version"},
        409: {"model": ErrorBody, "description": "already the champion, no previous version, or not awaiting approval"},
        503: {"model": ErrorBody, "description": "the registry cannot be reached"},
    }

    def admin(key: ApiKey | None = Depends(require(Scope.admin))) -> str:
        """Moving the model always needs an admin key, even on a server that is otherwise open."""
        if key is None:
            raise HTTPException(
                401,
                "moving the model needs an admin key even on an open server: `rankloop keys create NAME --scope admin`",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return f"key:{key.name}"

    def move_model(change: Callable[[], ModelEvent]) -> ModelEvent:
        w = state["w"]
        try:
            event = change()
        except NotFound as e:
            raise HTTPException(404, str(e)) from None
        except InvalidState as e:
            raise HTTPException(409, str(e)) from None
        except Exception as e:  # MLflow unreachable or refusing: nothing moved that we know of
            raise HTTPException(503, f"the model registry cannot be reached: {e}") from None
        w.publish_model_event(event)
        w.wake()
        return event

    @app.post("/admin/promote", response_model=ModelEvent, responses=admin_errors)
    def promote(body: PromoteRequest, actor: str = Depends(admin)) -> ModelEvent:
        """Make a version the champion (audited on the version: who, when, why); every worker swaps."""
        return move_model(lambda: state["w"].registry.promote(body.version, body.reason, actor=actor))

    @app.post("/admin/approve", response_model=ModelEvent, responses=admin_errors)
    def approve(body: PromoteRequest, actor: str = Depends(admin)) -> ModelEvent:
        """Promote the challenger that passed the gate and awaits approval (`retrain.auto_promote`
        off); 409 for any other version."""
        return move_model(lambda: approve_challenger(state["w"].registry, body.version, body.reason, actor=actor))

    @app.post("/admin/rollback", response_model=ModelEvent, responses=admin_errors)
    def rollback(body: RollbackRequest, actor: str = Depends(admin)) -> ModelEvent:
        """Put the previous version back as champion (audited on the version rolled back)."""
        return move_model(lambda: state["w"].registry.rollback(body.reason, actor=actor))

    @app.get(
        "/schemas",
        responses={200: {"content": {"application/json": {"example": {"interaction": "/schemas/interaction"}}}}, **no_key},
        dependencies=[Depends(require(Scope.rank, Scope.events_write))],
    )
    def schemas() -> dict[str, str]:
        """The names of the event JSON Schemas an emitter can validate against, with their paths."""
        return {name: f"/schemas/{name}" for name in ALL_SCHEMAS}

    @app.get(
        "/schemas/{name}",
        responses={
            200: {"content": {"application/json": {"example": {"title": "InteractionEvent", "type": "object"}}}},
            **no_key,
            404: {"model": ErrorBody, "description": "no such schema"},
        },
        dependencies=[Depends(require(Scope.rank, Scope.events_write))],
    )
    def schema(name: str) -> dict[str, Any]:
        """One event's JSON Schema (draft 2020-12), as `rankloop schemas` exports it."""
        if name not in ALL_SCHEMAS:
            raise HTTPException(404, f"no schema {name!r}; see /schemas")
        return ALL_SCHEMAS[name].model_json_schema()

    @app.get(
        "/dead-letters",
        response_model=list[DeadLetter],
        responses={
            200: {"content": {"application/json": {"example": DeadLetter.model_json_schema()["examples"]}}},
            **no_key,
            503: {"model": ErrorBody, "description": "Redis unavailable"},
        },
    )
    def dead_letters(
        request_id: Annotated[str | None, Query(max_length=MAX_ID_CHARS)] = None,
        since: Annotated[float | None, Query(ge=0, description="unix seconds")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        key: ApiKey | None = Depends(require(Scope.events_write)),
    ) -> list[DeadLetter]:
        """The newest dead letters (the stream's refusals, each with its code and reason), newest first:
        an emitter sees what became of its events. A key without `admin` sees only events it sent."""
        try:
            found = state["w"].caches.activity.dead_letters()
        except DependencyUnavailable as e:
            raise HTTPException(503, str(e)) from None
        own = None if key is None or Scope.admin in key.scopes else key.name
        out = [d for d in (DeadLetter.model_validate(d) for d in found) if matches(d, request_id, since, own)]
        return out[:limit]

    @app.get(
        "/sdk/rankloop.js",
        response_class=Response,
        responses={200: {"content": {"text/javascript": {"example": "function rankloop(base, key) { ... }"}}}},
    )
    def browser_sdk() -> Response:
        """The browser snippet: `rankloop(base, key).click(request_id, doc_id)` and a helper per interaction type."""
        return Response(BROWSER_SDK.read_text(), media_type="text/javascript")

    @app.get("/health/live", response_model=Liveness)
    def live() -> Liveness:
        """The process answers (the liveness probe: a failure means restart it)."""
        return Liveness()

    def health() -> tuple[bool, Health]:
        w = state["w"]
        ok, why = w.readiness()
        return ok, Health(
            status="ready" if ok else "broken" if w.index_problem else "starting" if not w.champion_checked else "behind",
            detail=why,
            model_version=w.serving.version,
            index_version=w.first_stage.version,
            kafka=w.publisher.healthy,
            redis=w.caches.ping(),
            impressions_buffered=w.publisher.buffered,
            impressions_dropped=w.publisher.dropped,
            last_swap_error=w.last_swap_error,
            auth="keys" if s.auth.required or keys.enabled else "open",
        )

    @app.get(
        "/health/ready",
        response_model=Health,
        responses={503: {"model": Health, "description": "starting, or behind the registry's champion"}},
    )
    def ready() -> JSONResponse:
        """Ready once the index is loaded, the registry was asked which model to serve and that model
        serves (a swap may take `serving.swap_grace_s`). Kafka and Redis are reported but do not gate:
        ranking works without them."""
        ok, body = health()
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    app.add_api_route("/health", ready, methods=["GET"], response_model=Health, include_in_schema=False)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE_LATEST: {"example": 'rankloop_rank_requests_total{cache="hit"} 1234.0\n'}},
                "description": "Prometheus text format",
            },
            **no_key,
        },
        dependencies=[] if s.auth.metrics_public else [Depends(require(Scope.admin))],
    )
    def metrics() -> Response:
        """Prometheus metrics: requests and latency by cache hit, events, swaps, publish failures."""
        return Response(generate_latest(state["w"].metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/status",
        response_class=HTMLResponse,
        responses={
            200: {"content": {"text/html": {"example": "<!doctype html><html>…</html>"}}, "description": "the status page"},
            **no_key,
        },
        dependencies=[] if s.auth.metrics_public else [Depends(require(Scope.admin))],
    )
    def status_page() -> HTMLResponse:
        """The status page (HTML): served version and model history, recent trainings with their metric
        by round, events and labels per minute, dead letters by reason. Open with `auth.metrics_public`."""
        w = state["w"]
        page = StatusPage(s.deployment, health()[1].model_dump(), [])
        try:
            page.versions = sorted(w.registry.versions(), key=lambda v: -int(v.version))
            if isinstance(w.registry, MlflowRegistry):
                page.trainings, page.rounds = read_trainings(w.registry.client, s.keys.experiment)
        except Exception as e:  # shown on the page, never as an empty history
            page.problems.append(f"model registry: {e}")
        try:
            page.minutes, page.dead_letters = read_activity(w.caches.activity)
        except Exception as e:
            page.problems.append(f"activity counts (Redis): {e}")
        return HTMLResponse(page.render())

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            event_schema = InteractionEvent.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(event_schema.pop("$defs", {}))
            components["InteractionEvent"] = event_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
