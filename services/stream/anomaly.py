"""Which (query, doc) is being clicked far more than its positions predict, by identities nobody
vouches for: a pure detector the join feeds (`join.step`), no I/O.

Per (query, doc) it keeps, over a sliding window, what the positions it was shown at predict
(each show adds the click rate of a top result times the examination curve at its position) and the
positives it got. A pair is held for review when its positives reach `min_positives`, exceed
`ratio` times the prediction, and come from at least `min_identities` distinct unsigned identities:
many free user ids agreeing on a document users do not choose. The click rate of a top result is
estimated from the stream itself (positives at position 1 over shows there, with a prior), which an
attacker lifting a low-ranked document does not move.

Memory grows with the distinct (query, doc) pairs shown in one window (per-minute buckets), and
each stream worker watches the requests of its own partitions.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from schemas import ImpressionEvent, InteractionEvent
from training.labels.rules import POSITIVE, identity_of
from training.labels.store import Hold, hold_id
from training.ranking.query import normalise_query

PRIOR_SHOWS = 50.0  # the prior's weight in the top-result click rate, in shows
PRIOR_TOP_RATE = 0.3


@dataclass
class PairWatch:
    expected: deque[tuple[int, float]] = field(default_factory=deque)  # (minute, positives its shows predict)
    positives: deque[tuple[float, str, bool]] = field(default_factory=deque)  # (time, identity, signed)

    def prune(self, horizon: float) -> None:
        while self.expected and (self.expected[0][0] + 1) * 60 < horizon:
            self.expected.popleft()
        while self.positives and self.positives[0][0] < horizon:
            self.positives.popleft()


class PositiveRates:
    """See the module's docstring; `min_identities` 0 switches holds off."""

    def __init__(self, window_s: float, ratio: float, min_positives: int, min_identities: int, examination: list[float]) -> None:
        self.window_s, self.ratio = window_s, ratio
        self.min_positives, self.min_identities = min_positives, min_identities
        self.examination = examination
        self.pairs: dict[tuple[str, str], PairWatch] = {}
        self.counted: dict[tuple[str, str], float] = {}  # (request, doc) whose positive was counted, and when
        self.flagged: set[tuple[str, str]] = set()
        self.top_shows, self.top_positives = 0.0, 0.0
        self.pruned_at = 0.0

    @property
    def on(self) -> bool:
        return self.min_identities > 0

    def top_rate(self) -> float:
        return (self.top_positives + PRIOR_TOP_RATE * PRIOR_SHOWS) / (self.top_shows + PRIOR_SHOWS)

    def _exam(self, position: int) -> float:
        curve = self.examination
        return curve[position - 1] if position <= len(curve) else curve[-1]

    def shown(self, imp: ImpressionEvent, now: float) -> None:
        if not self.on:
            return
        self._prune(now)
        query, minute, rate = normalise_query(imp.query), int(now // 60), self.top_rate()
        for it in imp.items:
            watch = self.pairs.setdefault((query, it.doc_id), PairWatch())
            add = min(1.0, rate * self._exam(it.position))
            if watch.expected and watch.expected[-1][0] == minute:
                watch.expected[-1] = (minute, watch.expected[-1][1] + add)
            else:
                watch.expected.append((minute, add))
            if it.position == 1:
                self.top_shows += 1

    def positive(self, imp: ImpressionEvent, ev: InteractionEvent, now: float) -> Hold | None:
        """Counts an admitted positive event (once per request and doc): a new hold, or None."""
        if not self.on or ev.type not in POSITIVE or (imp.request_id, ev.doc_id) in self.counted:
            return None
        self._prune(now)
        self.counted[(imp.request_id, ev.doc_id)] = now
        position = next((it.position for it in imp.items if it.doc_id == ev.doc_id), None)
        if position == 1:
            self.top_positives += 1
        key = (normalise_query(imp.query), ev.doc_id)
        watch = self.pairs.setdefault(key, PairWatch())
        who = identity_of(imp.user, imp.session) or f"request:{imp.request_id}"
        watch.positives.append((now, who, imp.user_verified))
        if key in self.flagged or len(watch.positives) < self.min_positives:
            return None
        expected = sum(e for _, e in watch.expected)
        unsigned = {w for _, w, signed in watch.positives if not signed}
        if len(watch.positives) <= self.ratio * expected or len(unsigned) < self.min_identities:
            return None
        self.flagged.add(key)
        since = watch.positives[0][0] - 60  # the labels of the first of them are stamped on receipt, a moment before
        reason = (
            f"{len(watch.positives)} positives for doc {ev.doc_id!r} on query {key[0]!r} within {self.window_s:.0f}s, "
            f"{len(watch.positives) / max(expected, 1e-9):.0f}x what its positions predict ({expected:.1f}), from "
            f"{len(unsigned)} unsigned identities: held for review"
        )
        return Hold(
            hold_id=hold_id(key[0], ev.doc_id, since),
            query=key[0],
            doc_id=ev.doc_id,
            since=since,
            reason=reason,
            actor="stream",
            at=now,
        )

    def _prune(self, now: float) -> None:
        if now - self.pruned_at < self.window_s / 10:
            return
        self.pruned_at, horizon = now, now - self.window_s
        for key in list(self.pairs):
            watch = self.pairs[key]
            watch.prune(horizon)
            if not watch.expected and not watch.positives:
                del self.pairs[key]
                self.flagged.discard(key)  # quiet for a window: a new burst is a new hold
        self.counted = {k: t for k, t in self.counted.items() if t >= horizon}
