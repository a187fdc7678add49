"""Probes and metrics: /health/live, /health/ready and /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from schemas import Health, Liveness
from services.http import NO_KEY, KeyGate, pages
from services.serve.deps import WorkerDep
from services.serve.worker import Worker

router = APIRouter()


def health(worker: Worker, gate: KeyGate) -> tuple[bool, Health]:
    ok, why = worker.readiness()
    return ok, Health(
        status=worker.status(),
        detail=why,
        model_version=worker.serving.version,
        index_version=worker.first_stage.version,
        kafka=worker.publisher.healthy,
        redis=worker.caches.ping(),
        impressions_buffered=worker.publisher.buffered,
        impressions_dropped=worker.publisher.dropped,
        last_swap_error=worker.last_swap_error,
        auth="open" if gate.open else "keys",
    )


@router.get("/health/live", response_model=Liveness)
def live() -> Liveness:
    """The process answers (the liveness probe: a failure means restart it)."""
    return Liveness()


@router.get(
    "/health/ready",
    response_model=Health,
    responses={503: {"model": Health, "description": "starting, or behind the registry's champion"}},
)
def ready(request: Request, worker: WorkerDep) -> JSONResponse:
    """Ready once the index is loaded, the registry was asked which model to serve and that model
    serves (a swap may take `serving.swap_grace_s`). Kafka and Redis are reported but do not gate:
    ranking works without them."""
    ok, body = health(worker, request.app.state.key_gate)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


router.add_api_route("/health", ready, methods=["GET"], response_model=Health, include_in_schema=False)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"example": 'rankloop_rank_requests_total{cache="hit"} 1234.0\n'}},
            "description": "Prometheus text format",
        },
        **NO_KEY,
    },
    dependencies=[Depends(pages)],
)
def metrics(worker: WorkerDep) -> Response:
    """Prometheus metrics: requests and latency by cache hit, events, swaps, publish failures."""
    return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)
