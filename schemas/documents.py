"""Documents of a living corpus and the filters over their fields: one schema for the three ways in
(`PUT /documents`, the `documents` topic, `rankloop index`), so a document refused by one is refused
by all, one by one, with a reason (docs/corpus.md).

A document's `fields` are typed metadata the application filters on. Only declared fields are
accepted (`rankloop index --field lang --field year:number`, or `corpus.fields` in the settings): a
typo in an emitter is an error, not a field silently never matched by a filter.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.events import MAX_ID_CHARS, Id, encodable

MAX_TEXT_CHARS = 100_000  # a document is a passage, a product or a paper's abstract, not a book
MAX_FIELD_CHARS = 1_000
MAX_FIELD_VALUES = 100
MAX_SET_VALUES = 1_000  # values of one `in` filter


class FieldType(str, Enum):
    keyword = "keyword"  # exact strings, or a list of them (tags): exact and set filters
    number = "number"  # int or float: exact, set and range filters


FieldValue = str | int | float | bool | list[str]


class Document(BaseModel):
    """One document as the application sends it. `version` (or `updated_at`) orders changes: an
    upsert older than the stored document is refused, so a replayed feed never undoes an edit."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "p-4983",
                    "title": "Vitamin D and fracture risk",
                    "text": "A meta-analysis of randomised trials of vitamin D supplementation ...",
                    "fields": {"lang": "en", "year": 2021, "tags": ["nutrition", "bone"]},
                    "version": 3,
                }
            ]
        },
    )

    id: Id
    title: Annotated[str, Field(max_length=MAX_FIELD_CHARS * 10)] = ""
    text: Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
    fields: dict[str, FieldValue] = Field(default_factory=dict)
    vector: list[float] | None = Field(None, description="a precomputed all-MiniLM-L6-v2 embedding (384 floats); none: encoded")
    version: int | None = Field(
        None, ge=0, le=2**63 - 1, description="the application's revision; a lower one than stored is refused"
    )
    updated_at: float | None = Field(None, ge=0, description="unix seconds; orders changes when `version` is not given")

    def content(self) -> str:
        """The text the encoders and BM25 see: "title. text"."""
        title, text = self.title.strip(), self.text.strip()
        return f"{title}. {text}" if title else text


class DocumentRefusal(BaseModel):
    """One document (or id) of a batch that was not stored, and why."""

    index: int = Field(description="position in the posted batch")
    id: str | None
    detail: str


def check_document(raw: Any, declared: dict[str, FieldType], dim: int) -> Document:
    """The document, or ValueError with every reason it cannot be stored."""
    try:
        doc = Document.model_validate(raw)
    except ValidationError as e:
        raise ValueError(
            "; ".join(f"{'.'.join(map(str, err['loc'])) or 'document'}: {err['msg']}" for err in e.errors())
        ) from None
    problems = []
    encodable(doc.title)
    encodable(doc.text)
    if not doc.text.strip():
        problems.append("text: empty")
    for name, value in doc.fields.items():
        kind = declared.get(name)
        if kind is None:
            problems.append(f"fields.{name}: not a declared field (declared: {', '.join(sorted(declared)) or 'none'})")
        elif (problem := _field_problem(value, kind)) is not None:
            problems.append(f"fields.{name}: {problem}")
    if doc.vector is not None:
        if len(doc.vector) != dim:
            problems.append(f"vector: {len(doc.vector)} numbers, the index's vectors have {dim}")
        elif not all(math.isfinite(x) for x in doc.vector):
            problems.append("vector: not finite")
    if problems:
        raise ValueError("; ".join(problems))
    return doc


def _field_problem(value: FieldValue, kind: FieldType) -> str | None:
    if kind is FieldType.number:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"a number field, got {value!r:.60}"
        return None
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        return f"a keyword field takes a string or a list of strings, got {value!r:.60}"
    if len(values) > MAX_FIELD_VALUES:
        return f"{len(values)} values, at most {MAX_FIELD_VALUES}"
    if any(len(v) > MAX_FIELD_CHARS for v in values):  # type: ignore[arg-type]
        return f"a value longer than {MAX_FIELD_CHARS} characters"
    return None


# ---- filters ------------------------------------------------------------------------------------
class Range(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None


class Condition(BaseModel):
    """One field's test: `equals` one value, `any_of` a set, or within a `range`."""

    field: str
    kind: FieldType
    equals: str | float | None = None
    any_of: list[str | float] | None = None
    range: Range | None = None


Filters = dict[str, Any]
"""`{"lang": "en", "tags": ["a", "b"], "year": {"gte": 2020}}`: a value is exact, a list is a set
(any of), an object a range; every field's condition must hold."""


def parse_filters(raw: Filters, declared: dict[str, FieldType]) -> list[Condition]:
    """The conditions of a request's filters, or ValueError naming what is wrong (answered 422)."""
    out = []
    for name, spec in raw.items():
        kind = declared.get(name)
        if kind is None:
            raise ValueError(f"filters.{name}: not a declared field (declared: {', '.join(sorted(declared)) or 'none'})")
        if isinstance(spec, dict):
            if kind is not FieldType.number:
                raise ValueError(f"filters.{name}: a range needs a number field, {name} is a keyword field")
            try:
                rng = Range.model_validate(spec)
            except ValidationError as e:
                raise ValueError(f"filters.{name}: a range takes gte, gt, lte, lt numbers ({e.errors()[0]['msg']})") from None
            if all(v is None for v in rng.model_dump().values()):
                raise ValueError(f"filters.{name}: an empty range")
            out.append(Condition(field=name, kind=kind, range=rng))
        elif isinstance(spec, list):
            if not spec or len(spec) > MAX_SET_VALUES:
                raise ValueError(f"filters.{name}: a set takes 1 to {MAX_SET_VALUES} values")
            for v in spec:
                _check_filter_value(name, v, kind)
            out.append(Condition(field=name, kind=kind, any_of=spec))
        else:
            _check_filter_value(name, spec, kind)
            out.append(Condition(field=name, kind=kind, equals=spec))
    return out


def _check_filter_value(name: str, value: Any, kind: FieldType) -> None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is FieldType.number and not number:
        raise ValueError(f"filters.{name}: a number field, got {value!r:.60}")
    if kind is FieldType.keyword and not isinstance(value, str):
        raise ValueError(f"filters.{name}: a keyword field, got {value!r:.60}")


def matches(fields: dict[str, Any], conditions: list[Condition]) -> bool:
    """Whether a document's fields pass every condition (a missing field passes none)."""
    for c in conditions:
        value = fields.get(c.field)
        if value is None:
            return False
        values = value if isinstance(value, list) else [value]
        if c.equals is not None and c.equals not in values:
            return False
        if c.any_of is not None and not set(values) & set(c.any_of):
            return False
        if c.range is not None:
            x = float(values[0])
            r = c.range
            if (
                (r.gte is not None and x < r.gte)
                or (r.gt is not None and x <= r.gt)
                or (r.lte is not None and x > r.lte)
                or (r.lt is not None and x >= r.lt)
            ):
                return False
    return True


# ---- HTTP bodies --------------------------------------------------------------------------------
class DocumentsResponse(BaseModel):
    """`stored` documents are durable and searchable within seconds; `refused` ones were not stored."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "stored": ["p-4983"],
                    "refused": [{"index": 1, "id": "p-17", "detail": "text: empty"}],
                    "generation": 5214,
                }
            ]
        }
    )

    stored: list[str]
    refused: list[DocumentRefusal]
    generation: int = Field(description="the corpus change number of this write; /rank answers from it on include it")


class DeleteDocuments(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"ids": ["p-4983", "p-17"]}]})
    ids: Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]], Field(min_length=1, max_length=10_000)]


class DeletedResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"deleted": ["p-4983"], "missing": ["p-17"], "generation": 5215}]})
    deleted: list[str]
    missing: list[str] = Field(description="ids that were not in the corpus (nothing to delete)")
    generation: int
