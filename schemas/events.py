"""Event schemas: the contract between applications, the serving worker, the stream processor and training.

Every event carries `schema_version` so consumers can refuse what they do not understand.
Unknown fields are rejected (`extra="forbid"`) so a typo in an emitter is an error, not a silent loss.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SCHEMA_VERSION: Literal[1] = 1
FIRST_STAGE = "first-stage"
"""The model version name while no model is champion: the first stage alone serves."""
MAX_QUERY_CHARS = 2000
MAX_ID_CHARS = 200


def encodable(value: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"); such a string cannot be written to the broker or
    Redis, nor tokenised, so it is refused at the door instead of failing halfway through a request."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid UTF-8 text (a lone surrogate)") from None
    return value


Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(encodable)]
Identity = Annotated[str, Field(max_length=MAX_ID_CHARS), AfterValidator(encodable)]
"""A user or session: bounded, so an impression always fits a broker message."""
QueryText = Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS), AfterValidator(encodable)]


def now() -> float:
    return time.time()


CLOCK_SKEW_S = 300.0  # how far a client's clock may be off before its timestamps are refused
LATEST_SECONDS = 1e11  # year 5138: any larger "unix seconds" value is milliseconds or worse


def seconds(value: float) -> float:
    """A unix time in seconds. JavaScript's `Date.now()` gives milliseconds: refused with the fix,
    since accepting it would only dead-letter the event later as being from the far future."""
    if value > LATEST_SECONDS:
        raise ValueError(
            f"{value:.0f} looks like milliseconds (JavaScript's Date.now()); send unix seconds, e.g. Date.now() / 1000"
        )
    return value


UnixSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False), AfterValidator(seconds)]


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: Literal[1] = SCHEMA_VERSION


Team = Literal["champion", "challenger"]


class ShownItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    doc_id: Id
    position: int = Field(ge=1, description="1-based rank the user saw")
    score: float
    team: Team | None = Field(
        None, description="in an interleaved ranking: which model ranks the document higher (none: both alike)"
    )
    credit: float | None = Field(
        None,
        description="in an interleaved ranking: what a like here earns the challenger (negative: the champion): "
        "1/its rank - 1/the champion's rank, scaled so the query's largest credit is 1",
    )


class ImpressionEvent(Event):
    """What the serving worker showed for one request."""

    request_id: Id
    query: QueryText
    user: Identity | None = None
    session: Identity | None = None
    items: list[ShownItem]
    model_version: str = Field(description='registered model version, or "first-stage"')
    index_version: str
    explored: bool = Field(False, description="the top items were shown in a random order (position-bias exploration)")
    challenger_version: str | None = Field(
        None, description="set when the ranking interleaved this challenger with the champion (`model_version`)"
    )
    api_key: str | None = Field(None, description="name of the API key that asked for this ranking (set by the server)")
    user_verified: bool = Field(
        False, description="`user` came with a user token signed by the application (set by the server; docs/security.md)"
    )
    client: str | None = Field(None, description="the network prefix the request came from (set by the server)")
    timestamp: float = Field(default_factory=now, description="unix seconds")


class InteractionType(str, Enum):
    click = "click"
    skip = "skip"
    dwell = "dwell"
    cite = "cite"
    citation_deleted = "citation_deleted"
    purchase = "purchase"
    return_ = "return"


class InteractionEvent(Event):
    """What a user did with one shown document; `value` is seconds for dwell, amount for purchase."""

    event_id: Id
    request_id: Id
    doc_id: Id
    type: InteractionType
    value: float | None = Field(None, ge=0, le=1e9, allow_inf_nan=False)
    timestamp: UnixSeconds = Field(default_factory=now, description="unix seconds, the client's clock (checked, not trusted)")
    received_at: float | None = Field(
        None, description="unix seconds when rankloop received it: set by the server, a client's value is replaced"
    )
    api_key: str | None = Field(
        None, description="name of the API key that sent it: set by the server, a client's value is replaced"
    )
    client: str | None = Field(
        None, description="the network prefix it was sent from: set by the server, a client's value is replaced"
    )

    @property
    def server_time(self) -> float:
        """What the join window and training slices go by (the client's clock only if never received)."""
        return self.received_at if self.received_at is not None else self.timestamp

    def future_dated(self) -> str | None:
        """Why the client's timestamp is too far ahead of the server's receipt to trust, or None."""
        ahead = self.timestamp - self.server_time
        return f"timestamp {self.timestamp:.0f} is {ahead:.0f}s in the future" if ahead > CLOCK_SKEW_S else None


class LabelledExample(Event):
    """One training label for (request, doc). Later revisions of the same `label_id` replace earlier ones."""

    label_id: str
    revision: int = Field(ge=1)
    request_id: str
    query: str
    doc_id: str
    position: int = Field(ge=1)
    grade: int = Field(ge=-2, le=2, description="-2 strong neg, -1 weak neg, 1 pos, 2 strong pos")
    weight: float = Field(ge=0, description="signal strength")
    propensity: float = Field(gt=0, le=1, description="examination probability of the position")
    signals: list[str]
    event_ids: list[str]
    model_version: str
    index_version: str
    identity: str | None = Field(
        None, description="whose evidence: the impression's user, else its session; none when neither was given"
    )
    api_keys: list[str] = Field(
        default_factory=list, description="names of the API keys behind the request: its ranking's and its events'"
    )
    source: str | None = Field(
        None,
        description='who vouches for it: "user:<id>" (a signed user), else "net:<prefix>" (the network the feedback '
        "came from); none on labels from before sources were recorded (they count per identity)",
    )
    trusted: bool | None = Field(None, description="the source is a signed user (none: not assessed, counts as before)")
    challenger_version: str | None = Field(None, description="the impression interleaved this challenger with the champion")
    team: Team | None = Field(None, description="which of the two ranks the document higher (none: both alike)")
    credit: float | None = Field(None, description="what a like on it earns the challenger (negative: the champion)")
    timestamp: float = Field(default_factory=now)


class ModelEvent(Event):
    """Published by the control plane whenever an alias moves (the champion changes, or a challenger is
    nominated for interleaving or withdrawn), so serving workers look at the registry without polling lag."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"schema_version": 1, "action": "promoted", "model_name": "rankloop-reranker", "version": "4",
                 "previous_version": "3", "reason": "approved: per-query wins look right", "actor": "key:ops",
                 "timestamp": 1795300000.0}
            ]
        },
    )  # fmt: skip

    action: Literal["promoted", "rolled_back", "nominated", "withdrawn"]
    model_name: str
    version: str
    previous_version: str | None = None
    reason: str = ""
    actor: str = Field("unknown", description='who moved it: "cli:<user>", "key:<name>", "scheduler", "interleaving", "control"')
    timestamp: float = Field(default_factory=now)


class RejectCode(str, Enum):
    """Why an event was refused at intake or dead-lettered by the stream: metrics are labelled by it."""

    invalid_event = "invalid_event"
    duplicate_event = "duplicate_event"
    duplicate_impression = "duplicate_impression"
    not_recorded = "not_recorded"
    late_event = "late_event"
    bad_timestamp = "bad_timestamp"
    doc_not_shown = "doc_not_shown"
    unknown_request = "unknown_request"
    click_burst = "click_burst"
    no_label = "no_label"
    invalid_document = "invalid_document"


class DeadLetter(Event):
    """An input that could not be used, with why; nothing is dropped silently."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"schema_version": 1, "source": "rankloop.interactions", "code": "unknown_request",
                 "reason": "unknown request_id: no impression within the join window",
                 "payload": '{"event_id": "e7", "request_id": "never-shown", "doc_id": "d1", "type": "click"}',
                 "timestamp": 1795236000.0}
            ]
        },
    )  # fmt: skip

    source: str = Field(description="topic or endpoint the payload came from")
    code: RejectCode
    reason: str = Field(description="what was wrong, for a person")
    payload: str = Field(description="the raw payload, as received")
    timestamp: float = Field(default_factory=now)


ALL_SCHEMAS: dict[str, type[BaseModel]] = {
    "impression": ImpressionEvent,
    "interaction": InteractionEvent,
    "label": LabelledExample,
    "model_event": ModelEvent,
    "dead_letter": DeadLetter,
}
