"""PUT /documents, DELETE /documents/{id}, POST /documents/delete: the application's corpus, changed
online (docs/corpus.md). Writes need the `documents:write` scope and are audited in the store."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from schemas import MAX_ID_CHARS, ErrorBody
from schemas.documents import DeleteDocuments, DeletedResponse, Document, DocumentsResponse
from services.auth import ApiKey, Scope
from services.http import BAD_BODY, NO_KEY, caller, parse_json
from services.serve.deps import WorkerDep, events_limit

router = APIRouter()
DOCUMENTS_BODY: dict[str, Any] = {
    "description": 'A JSON array of documents, or {"documents": [...]}; each is validated on its own.',
    "required": True,
    "content": {
        "application/json": {
            "schema": {"type": "array", "items": {"$ref": "#/components/schemas/Document"}},
            "example": Document.model_config["json_schema_extra"]["examples"],  # type: ignore[index]
        }
    },
}


def actor(key: ApiKey | None) -> str:
    return f"key:{key.name}" if key else "open"


@router.put(
    "/documents",
    response_model=DocumentsResponse,
    openapi_extra={"requestBody": DOCUMENTS_BODY},
    dependencies=[Depends(events_limit)],
    responses={
        **NO_KEY,
        400: {"model": ErrorBody, "description": "malformed JSON, or not an array of documents"},
        413: {"model": ErrorBody, "description": "more documents than corpus.max_batch, or a body over serving.max_body_bytes"},
        422: {"model": DocumentsResponse, "description": "no document of the batch was stored"},
    },
)
async def put_documents(
    request: Request, worker: WorkerDep, key: ApiKey | None = Depends(caller(Scope.documents_write))
) -> JSONResponse:
    """Upserts documents, each on its own: the valid ones are stored (on disk before this answers)
    and searchable by every worker within seconds; each refused one comes back with its reason."""
    payload = parse_json(await request.body())
    batch = payload.get("documents") if isinstance(payload, dict) else payload
    if not isinstance(batch, list):
        raise HTTPException(400, 'expected a JSON array of documents or {"documents": [...]}')
    if len(batch) > worker.s.corpus.max_batch:
        raise HTTPException(413, f"batch of {len(batch)} documents exceeds the limit of {worker.s.corpus.max_batch}")
    answer = await run_in_threadpool(worker.upsert_documents, batch, actor(key))
    return JSONResponse(answer.model_dump(mode="json"), status_code=200 if answer.stored or not batch else 422)


@router.delete("/documents/{doc_id}", response_model=DeletedResponse, responses={**NO_KEY, 404: {"model": ErrorBody}})
def delete_document(
    worker: WorkerDep,
    doc_id: str = Path(min_length=1, max_length=MAX_ID_CHARS),
    key: ApiKey | None = Depends(caller(Scope.documents_write)),
) -> DeletedResponse:
    """Deletes one document: once this answers, no worker returns it again (404: it was not there)."""
    answer = worker.delete_documents([doc_id], actor(key))
    if answer.missing:
        raise HTTPException(404, f"no document {doc_id!r} in the corpus")
    return answer


@router.post("/documents/delete", response_model=DeletedResponse, responses={**NO_KEY, **BAD_BODY})
def delete_documents(
    body: DeleteDocuments, worker: WorkerDep, key: ApiKey | None = Depends(caller(Scope.documents_write))
) -> DeletedResponse:
    """Deletes a batch of documents in one change; ids that were not there are listed as missing."""
    return worker.delete_documents(body.ids, actor(key))
