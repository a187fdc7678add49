"""POST /events, GET /dead-letters (what became of them), the event JSON Schemas and the browser SDK."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from schemas import ALL_SCHEMAS, MAX_ID_CHARS, DeadLetter, DependencyUnavailable, ErrorBody, EventsResponse
from services.auth import ApiKey, Scope
from services.dead_letters import DeadLetterLog, DeadLetterQuery, find_dead_letters
from services.http import NO_KEY, caller, client_network, parse_json
from services.serve.deps import WorkerDep, events_limit
from services.serve.routes.ranking import LIMITED

router = APIRouter()
BROWSER_SDK = Path(__file__).parents[1] / "static" / "rankloop.js"
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


@router.post(
    "/events",
    response_model=EventsResponse,
    openapi_extra={"requestBody": EVENTS_BODY},
    dependencies=[Depends(events_limit)],
    responses={
        **NO_KEY,
        **LIMITED,
        400: {"model": ErrorBody, "description": "malformed JSON, or not an array of events"},
        413: {"model": ErrorBody, "description": "batch larger than serving.max_batch, or body than serving.max_body_bytes"},
        422: {"model": EventsResponse, "description": "no event of the batch was accepted"},
        503: {"model": ErrorBody, "description": "cannot record durably now (broker or Redis down): retry"},
    },
)
async def events(request: Request, worker: WorkerDep, key: ApiKey | None = Depends(caller(Scope.events_write))) -> JSONResponse:
    """Interaction events, accepted one by one: the good ones of a batch land even when others
    are rejected, each rejection with its code and detail. Each is stamped with the server's time
    and the key's name."""
    payload = parse_json(await request.body())
    batch = payload.get("events") if isinstance(payload, dict) else payload
    if not isinstance(batch, list):
        raise HTTPException(400, 'expected a JSON array of events or {"events": [...]}')
    if len(batch) > worker.s.serving.max_batch:
        raise HTTPException(413, f"batch of {len(batch)} events exceeds the limit of {worker.s.serving.max_batch}")
    try:
        client = client_network(request, worker.s.auth.trusted_proxies)
        accepted, rejected = await run_in_threadpool(worker.ingest, batch, key.name if key else None, client)
    except DependencyUnavailable as e:
        raise HTTPException(503, str(e), headers={"Retry-After": "5"}) from None
    answer = EventsResponse(accepted=accepted, rejected=rejected)
    return JSONResponse(answer.model_dump(mode="json"), status_code=200 if accepted or not batch else 422)


@router.get(
    "/dead-letters",
    response_model=list[DeadLetter],
    responses={
        200: {"content": {"application/json": {"example": DeadLetter.model_json_schema()["examples"]}}},
        **NO_KEY,
        503: {"model": ErrorBody, "description": "the broker cannot be reached"},
    },
)
def dead_letters(
    request: Request,
    request_id: Annotated[str | None, Query(max_length=MAX_ID_CHARS)] = None,
    since: Annotated[float | None, Query(ge=0, description="unix seconds")] = None,
    code: Annotated[str | None, Query(max_length=64, description="a reject code, e.g. late_event")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    key: ApiKey | None = Depends(caller(Scope.events_write)),
) -> list[DeadLetter]:
    """The newest dead letters (the stream's refusals, each with its code and reason), newest first,
    read from the dead-letter topic as `rankloop dead-letters` reads it: an emitter sees what became
    of its events. A key without `admin` sees only events it sent."""
    own = None if key is None or Scope.admin in key.scopes else key.name
    query = DeadLetterQuery(request_id=request_id, since=since, code=code, api_key=own, limit=limit)
    try:
        log: DeadLetterLog = request.app.state.dead_letters
        return find_dead_letters(log, query)
    except DependencyUnavailable as e:
        raise HTTPException(503, str(e)) from None


@router.get(
    "/schemas",
    responses={200: {"content": {"application/json": {"example": {"interaction": "/schemas/interaction"}}}}, **NO_KEY},
    dependencies=[Depends(caller(Scope.rank, Scope.events_write))],
)
def schemas() -> dict[str, str]:
    """The names of the event JSON Schemas an emitter can validate against, with their paths."""
    return {name: f"/schemas/{name}" for name in ALL_SCHEMAS}


@router.get(
    "/schemas/{name}",
    responses={
        200: {"content": {"application/json": {"example": {"title": "InteractionEvent", "type": "object"}}}},
        **NO_KEY,
        404: {"model": ErrorBody, "description": "no such schema"},
    },
    dependencies=[Depends(caller(Scope.rank, Scope.events_write))],
)
def schema(name: str) -> dict[str, Any]:
    """One event's JSON Schema (draft 2020-12), as `rankloop export-schemas` writes it."""
    if name not in ALL_SCHEMAS:
        raise HTTPException(404, f"no schema {name!r}; see /schemas")
    return ALL_SCHEMAS[name].model_json_schema()


@router.get(
    "/sdk/rankloop.js",
    response_class=Response,
    responses={200: {"content": {"text/javascript": {"example": "function rankloop(base, key) { ... }"}}}},
)
def browser_sdk() -> Response:
    """The browser snippet: `rankloop(base, key).click(request_id, doc_id)` and a helper per interaction type."""
    return Response(BROWSER_SDK.read_text(), media_type="text/javascript")
