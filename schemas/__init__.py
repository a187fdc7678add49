"""Contracts shared by every rankloop process and client: events, HTTP bodies, errors.

Imports nothing else of rankloop and nothing heavy (pydantic only), so any emitter can use it.
"""

from schemas.api import (
    ErrorBody,
    EventsResponse,
    Health,
    Liveness,
    ModelInfo,
    PromoteRequest,
    RankedItem,
    RankRequest,
    RankResponse,
    Rejection,
    RollbackRequest,
)
from schemas.errors import DependencyUnavailable, InvalidInput, InvalidState, NotFound, RankloopError, RequestFailed
from schemas.events import (
    ALL_SCHEMAS,
    CLOCK_SKEW_S,
    FIRST_STAGE,
    MAX_ID_CHARS,
    MAX_QUERY_CHARS,
    SCHEMA_VERSION,
    DeadLetter,
    ImpressionEvent,
    InteractionEvent,
    InteractionType,
    LabelledExample,
    ModelEvent,
    RejectCode,
    ShownItem,
    encodable,
)
from schemas.export import export_json_schemas

__all__ = [
    "ALL_SCHEMAS",
    "CLOCK_SKEW_S",
    "FIRST_STAGE",
    "MAX_ID_CHARS",
    "MAX_QUERY_CHARS",
    "SCHEMA_VERSION",
    "DeadLetter",
    "DependencyUnavailable",
    "ErrorBody",
    "EventsResponse",
    "Health",
    "ImpressionEvent",
    "InteractionEvent",
    "InteractionType",
    "InvalidInput",
    "InvalidState",
    "LabelledExample",
    "Liveness",
    "ModelEvent",
    "ModelInfo",
    "NotFound",
    "PromoteRequest",
    "RankRequest",
    "RankResponse",
    "RankedItem",
    "RankloopError",
    "RejectCode",
    "Rejection",
    "RequestFailed",
    "RollbackRequest",
    "ShownItem",
    "encodable",
    "export_json_schemas",
]
