"""Labelling rules: a pure function from one impression and its interactions to training labels.

The stream processor calls `label_request` each time a new interaction for a request arrives and
emits only the labels that changed (as a new revision of the same `label_id`), so the rules can look
at the whole request (e.g. "shown above the lowest click") while staying incremental and idempotent.
A revision is the number of the request's interactions it was computed from, so (label_id, revision)
names one content whichever order the impression and its interactions were read in (a replay after a
crash may interleave the two topics differently from the first pass).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field

from schemas import ImpressionEvent, InteractionEvent, InteractionType, LabelledExample

# Yandex WSCD 2012 sample, click-through rate by position 1..10 (shared/data/clicklogs/.../stats.json),
# normalised to 1 at the top: the default examination curve until one is estimated from our own logs.
DEFAULT_EXAMINATION = [1.0, 0.969, 0.661, 0.599, 0.412, 0.284, 0.268, 0.183, 0.195, 0.175]


class LabelRules(BaseModel):
    """Weights and thresholds of the labelling rules (all configurable)."""

    model_config = ConfigDict(extra="forbid")

    click_weight: float = 1.0
    dwell_threshold_s: float = 30.0
    long_dwell_weight: float = 1.5
    strong_positive_weight: float = 2.0
    skip_weight: float = 0.3
    strong_negative_weight: float = 2.0
    infer_skips_above_click: bool = True
    examination: list[float] = Field(default_factory=lambda: list(DEFAULT_EXAMINATION))
    min_propensity: float = 0.05

    def propensity(self, position: int) -> float:
        curve = self.examination
        p = curve[position - 1] if position <= len(curve) else curve[-1]
        return max(self.min_propensity, min(1.0, p))


T = InteractionType
POSITIVE = {T.click, T.cite, T.purchase}


def identity_of(user: str | None, session: str | None) -> str | None:
    """Whose evidence a request's labels are: its user, else its session (capped per identity in training)."""
    if user:
        return f"user:{user}"
    return f"session:{session}" if session else None


def source_of(impression: ImpressionEvent, events: Iterable[InteractionEvent]) -> tuple[str | None, bool | None]:
    """(source, trusted) of a request's labels: a signed user is its own source; any other feedback is
    its network's (where its events came from, else where the ranking was asked from), since user
    ids cost nothing to mint and networks do. (None, None): the server recorded neither (events written
    straight to the broker by an application's backend, labels from before sources)."""
    if impression.user_verified and impression.user:
        return f"user:{impression.user}", True
    network = next((e.client for e in events if e.client), None) or impression.client
    return (f"net:{network}", False) if network else (None, None)


def label_request(
    impression: ImpressionEvent,
    interactions: Iterable[InteractionEvent],
    rules: LabelRules | None = None,
    unless: Mapping[str, EmittedLabel] | None = None,
    revision: int = 1,
) -> dict[str, LabelledExample]:
    """Labels for every shown doc that has evidence, keyed by doc_id; with `unless` (what the stream
    last emitted), only those whose grade, weight or signals differ from it: the stream relabels a
    request on every interaction, and building the unchanged labels was most of its cost.

    Precedence, strongest evidence first: strong negative (citation deleted, purchase returned) >
    strong positive (cite, purchase) > click (heavier with a long dwell) > weak negative (explicit
    skip, or shown above the lowest positive and not clicked). Duplicate event ids count once.
    """
    rules = rules or LabelRules()
    positions = {it.doc_id: it.position for it in impression.items}
    teams = {it.doc_id: (it.team, it.credit) for it in impression.items}
    by_doc: dict[str, list[InteractionEvent]] = {}
    seen: set[str] = set()
    for ev in sorted(interactions, key=lambda e: (e.server_time, e.event_id)):
        if ev.event_id in seen or ev.doc_id not in positions:
            continue
        seen.add(ev.event_id)
        by_doc.setdefault(ev.doc_id, []).append(ev)

    named = [impression.api_key, *(e.api_key for evs in by_doc.values() for e in evs)]
    source, trusted = source_of(impression, (e for evs in by_doc.values() for e in evs))
    api_keys = sorted({k for k in named if k is not None})
    positive_positions = [positions[d] for d, evs in by_doc.items() if any(e.type in POSITIVE for e in evs)]
    lowest_positive = max(positive_positions, default=0)

    labels: dict[str, LabelledExample] = {}
    for doc_id, position in positions.items():
        evs = by_doc.get(doc_id, [])
        graded = _grade(evs, rules) if evs else None
        if graded is None and rules.infer_skips_above_click and position < lowest_positive:
            graded = (-1, rules.skip_weight, ["skip_above_click"])
        if graded is None:
            continue
        grade, weight, signals = graded
        if unless is not None and doc_id in unless and unless[doc_id].same(grade, weight, signals):
            continue
        labels[doc_id] = LabelledExample(
            label_id=f"{impression.request_id}:{doc_id}",
            revision=revision,
            request_id=impression.request_id,
            query=impression.query,
            doc_id=doc_id,
            position=position,
            grade=grade,
            weight=weight,
            propensity=rules.propensity(position),
            signals=signals,
            event_ids=[e.event_id for e in evs],
            model_version=impression.model_version,
            index_version=impression.index_version,
            identity=identity_of(impression.user, impression.session),
            api_keys=api_keys,
            source=source,
            trusted=trusted,
            challenger_version=impression.challenger_version,
            team=teams[doc_id][0],
            credit=teams[doc_id][1],
            timestamp=max((e.server_time for e in evs), default=impression.timestamp),  # training slices by it
        )
    return labels


def _grade(evs: Sequence[InteractionEvent], rules: LabelRules) -> tuple[int, float, list[str]] | None:
    dwell = max((e.value or 0.0 for e in evs if e.type is T.dwell), default=0.0)
    return grade_of({e.type for e in evs}, dwell, rules)


def grade_of(types: set[InteractionType], dwell_s: float, rules: LabelRules) -> tuple[int, float, list[str]] | None:
    """(grade, weight, signals) of one shown document from the kinds of its interactions and its longest
    dwell; None: no evidence. Also how an interleaved session is credited (a grade > 0 is a vote)."""
    signals = sorted(t.value for t in types)
    if T.citation_deleted in types or T.return_ in types:
        return -2, rules.strong_negative_weight, signals
    if T.cite in types or T.purchase in types:
        return 2, rules.strong_positive_weight, signals
    if T.click in types:
        long = dwell_s >= rules.dwell_threshold_s
        return 1, rules.long_dwell_weight if long else rules.click_weight, signals
    if T.skip in types:
        return -1, rules.skip_weight, signals
    return None  # dwell alone (no click) is not evidence either way


class EmittedLabel(BaseModel):
    """What the stream last emitted for one (request, doc)."""

    revision: int
    grade: int
    weight: float
    signals: list[str]

    def same(self, grade: int, weight: float, signals: list[str]) -> bool:
        return (self.grade, self.weight, self.signals) == (grade, weight, signals)

    def same_as(self, label: LabelledExample) -> bool:
        return self.same(label.grade, label.weight, label.signals)


def changed_labels(
    new: dict[str, LabelledExample], emitted: Mapping[str, EmittedLabel], revision: int
) -> tuple[list[LabelledExample], dict[str, EmittedLabel]]:
    """Labels that differ from what was already emitted, as `revision` (the count of interactions
    they were computed from: it grows with every change), and the updated emitted map (the caller
    stores it, so a replay of the same events yields nothing new)."""
    out, after = [], dict(emitted)
    for doc_id, label in new.items():
        prev = emitted.get(doc_id)
        if prev is not None and prev.same_as(label):
            continue
        # built from a validated label: no second validation (this runs for every interaction)
        after[doc_id] = EmittedLabel.model_construct(
            revision=revision, grade=label.grade, weight=label.weight, signals=label.signals
        )
        out.append(label if label.revision == revision else label.model_copy(update={"revision": revision}))
    return out, after
