"""Online metrics per model version, from real events: what users did with the rankings each version
served. The stream counts a request once it forgets it (its join window closed, so every event that
can count has arrived); the counts add up in Redis, are exported to Prometheus by the stream and are
written onto the MLflow model version by the scheduler.

Interleaved requests are left out: two versions made them (the interleaving tally judges those).
"""

from __future__ import annotations

from pydantic import BaseModel

from schemas import InteractionType
from services.stream.join import RequestState

TOP_K = 10
T = InteractionType


def request_counts(state: RequestState) -> tuple[str, dict[str, float]] | None:
    """(model version, counts) of one forgotten request; None when it has no impression or was interleaved."""
    imp = state.impression
    if imp is None or imp.challenger_version is not None:
        return None
    position = {it.doc_id: it.position for it in imp.items}
    clicks = sorted(position[e.doc_id] for e in state.events if e.type == T.click and e.doc_id in position)
    top = [p for p in clicks if p <= TOP_K]
    kinds = [e.type for e in state.events]
    return imp.model_version, {
        "requests": 1,
        "clicked_top_k": float(bool(top)),
        "first_click_rr": 1.0 / top[0] if top else 0.0,
        "abandoned": float(not clicks),
        "cites": kinds.count(T.cite),
        "citations_deleted": kinds.count(T.citation_deleted),
        "purchases": kinds.count(T.purchase),
        "returns": kinds.count(T.return_),
    }


class OnlineMetrics(BaseModel):
    """Rates of one version over the requests counted so far (None where the denominator is 0)."""

    requests: int
    ctr_at_10: float | None  # share of requests with a click in the top 10
    mrr_of_clicks: float | None  # mean 1 / position of the first click (0 without a click)
    abandonment: float | None  # share of requests without any click
    citation_deletion_rate: float | None  # citations deleted per citation made
    return_rate: float | None  # returns per purchase

    @classmethod
    def of(cls, counts: dict[str, float]) -> OnlineMetrics:
        n = counts.get("requests", 0.0)

        def per(num: str, den: float) -> float | None:
            return round(counts.get(num, 0.0) / den, 4) if den else None

        return cls(
            requests=int(n),
            ctr_at_10=per("clicked_top_k", n),
            mrr_of_clicks=per("first_click_rr", n),
            abandonment=per("abandoned", n),
            citation_deletion_rate=per("citations_deleted", counts.get("cites", 0.0)),
            return_rate=per("returns", counts.get("purchases", 0.0)),
        )
