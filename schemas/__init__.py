"""Event contracts shared by every rankloop process. Imports nothing else of rankloop."""

from schemas.events import (
    ALL_SCHEMAS,
    MAX_QUERY_CHARS,
    SCHEMA_VERSION,
    DeadLetter,
    ImpressionEvent,
    InteractionEvent,
    InteractionType,
    LabelledExample,
    ModelEvent,
    ShownItem,
)
from schemas.export import export_json_schemas

__all__ = [
    "ALL_SCHEMAS", "MAX_QUERY_CHARS", "SCHEMA_VERSION", "DeadLetter", "ImpressionEvent",
    "InteractionEvent", "InteractionType", "LabelledExample", "ModelEvent", "ShownItem",
    "export_json_schemas",
]
