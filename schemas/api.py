"""HTTP contracts of the serving worker: what `/rank`, `/events`, `/model` and `/health` take and
answer. The SDK and the server share them, so a client never parses a dict by hand."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from schemas.documents import MAX_TEXT_CHARS, FieldValue, Filters
from schemas.events import Id, Identity, QueryText, RejectCode, encodable
from schemas.trust import MAX_TOKEN_CHARS

UserToken = Annotated[str, Field(min_length=1, max_length=MAX_TOKEN_CHARS, pattern=r"^[A-Za-z0-9._=-]+$")]

MAX_RERANK_CANDIDATES = 1000


class RankRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"query": "does vitamin D prevent fractures?", "k": 10, "user": "u-42", "session": "s-7"},
                {"query": "vitamin D", "k": 5, "filters": {"lang": "en", "year": {"gte": 2020}}, "fields": True},
            ]
        },
    )

    query: QueryText
    k: Annotated[int, Field(ge=1, le=100)] = 10
    user: Identity | None = None
    session: Identity | None = None
    user_token: UserToken | None = Field(
        None,
        description="vouches for `user`: rl1 token the application signed with its user-signing secret "
        "(`schemas.trust.sign_user`); feedback of a signed user counts as that user's, of any other as its network's",
    )
    filters: Filters | None = Field(
        None,
        description='over declared fields: a value is exact ("lang": "en"), a list is any of ("tags": ["a", "b"]), '
        'an object a range ("year": {"gte": 2020}); applied before k is cut; an undeclared field is a 422',
    )
    fields: bool = Field(False, description="return each document's fields")


class InlineCandidate(BaseModel):
    """A candidate the application sends with its text (it is not in the index)."""

    model_config = ConfigDict(extra="forbid")
    id: Id
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(encodable)]
    title: Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(encodable)] = ""
    fields: dict[str, FieldValue] | None = None


class RerankRequest(BaseModel):
    """The application's own candidates, reranked by the served model (as Cohere's and Metarank's
    rerank APIs take them): ids of indexed documents, or inline documents, or both."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "query": "does vitamin D prevent fractures?",
                    "candidates": [
                        "4983",
                        {"id": "kb-17", "title": "Vitamin D FAQ", "text": "Vitamin D helps the body absorb calcium ..."},
                    ],
                    "top_n": 2,
                    "user": "u-42",
                }
            ]
        },
    )

    query: QueryText
    candidates: Annotated[list[Id | InlineCandidate], Field(min_length=1, max_length=MAX_RERANK_CANDIDATES)]
    top_n: Annotated[int, Field(ge=1, le=MAX_RERANK_CANDIDATES)] | None = Field(None, description="how many to return; none: all")
    user: Identity | None = None
    session: Identity | None = None
    user_token: UserToken | None = Field(
        None,
        description="vouches for `user`: rl1 token the application signed with its user-signing secret "
        "(`schemas.trust.sign_user`); feedback of a signed user counts as that user's, of any other as its network's",
    )
    fields: bool = Field(False, description="return each document's fields")


class RankedItem(BaseModel):
    doc_id: str
    score: float
    position: int = Field(description="1-based rank shown to the user")
    title: str
    fields: dict[str, FieldValue] | None = Field(None, description="the document's fields, when asked for")


class RankResponse(BaseModel):
    """Quote `request_id` on every interaction with these results."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "request_id": "5f0c9a7e2b1d4c3a9e8f7a6b5c4d3e2f",
                    "model_version": "3",
                    "items": [{"doc_id": "4983", "score": 0.912, "position": 1, "title": "Vitamin D and fracture risk"}],
                }
            ]
        }
    )

    request_id: str
    model_version: str = Field(description='registered model version, or "first-stage"')
    items: list[RankedItem]


class Rejection(BaseModel):
    """One event of a batch that was not accepted, and why."""

    index: int = Field(description="position of the event in the posted batch")
    event_id: str | None
    code: RejectCode
    detail: str


class EventsResponse(BaseModel):
    """`accepted` events are durably on the broker; `rejected` ones were not recorded."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "accepted": ["e-1"],
                    "rejected": [{"index": 1, "event_id": "e-2", "code": "duplicate_event", "detail": "duplicate event_id"}],
                }
            ]
        }
    )

    accepted: list[str]
    rejected: list[Rejection]


class ModelInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_version": "3",
                    "index_version": "a1b2c3d4e5f6",
                    "mix": {"alpha": 0.75, "beta": 0.5, "tau": 0.5, "bm25_weight": 0.25},
                    "scorer": "mix",
                    "loaded_at": 1793486011.7,
                    "model_name": "rankloop-reranker",
                    "last_swap_error": None,
                    "auth": "keys",
                }
            ]
        }
    )

    model_version: str
    index_version: str
    mix: dict[str, float | None] | None = Field(
        description="the reranker's score mix (bm25_weight: its first-stage fusion, null for the index's); "
        "null while the first stage serves"
    )
    unfamiliar_mix: dict[str, float | None] | None = Field(
        None, description="the mix for queries unlike any users gave feedback on; null: `mix` for every query"
    )
    scorer: Literal["first stage", "mix", "combiner"] = Field(
        "mix",
        description="what scores the head: the tuned mixes, or the learned LightGBM combiner (under `mix`'s fusion), "
        "or nothing before a model is promoted",
    )
    loaded_at: float
    model_name: str
    last_swap_error: str | None


class Health(BaseModel):
    """Readiness: the index and the model are loaded. Kafka and Redis are reported, not gating:
    ranking works without them (impressions wait in a buffer, results go uncached)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ready",
                    "model_version": "3",
                    "index_version": "a1b2c3d4e5f6",
                    "kafka": True,
                    "redis": True,
                    "impressions_buffered": 0,
                    "impressions_dropped": 0,
                    "last_swap_error": None,
                    "auth": "keys",
                }
            ]
        }
    )

    status: Literal["ready", "starting", "behind", "broken"]
    detail: str | None = Field(None, description="why not ready")
    model_version: str
    index_version: str
    kafka: bool = Field(description="the last attempt to publish reached the broker")
    redis: bool
    impressions_buffered: int = Field(description="impressions waiting for the broker")
    impressions_dropped: int = Field(description="impressions lost because the buffer was full")
    last_swap_error: str | None
    auth: Literal["keys", "open"] = Field(description='"open": no API key is required (a local, single-user setup)')


class Liveness(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "alive"}]})

    status: Literal["alive"] = "alive"


class ErrorBody(BaseModel):
    """FastAPI's error answer: `detail` says what was wrong."""

    detail: str


class PromoteRequest(BaseModel):
    """POST /admin/promote: make `version` the champion. `reason` goes on the version in MLflow."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"version": "4", "reason": "gate passed on review"}]}
    )

    version: Id
    reason: Annotated[str, Field(min_length=1, max_length=500)]


class RollbackRequest(BaseModel):
    """POST /admin/rollback: put the `previous` version back as champion."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"reason": "complaints about v4 results"}]})

    reason: Annotated[str, Field(min_length=1, max_length=500)]
