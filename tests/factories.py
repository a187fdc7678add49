"""Small builders for events used across tests."""

import itertools

from schemas import ImpressionEvent, InteractionEvent, ShownItem

_ids = itertools.count()


def impression(request_id="r1", docs=("d1", "d2", "d3", "d4", "d5"), timestamp=1000.0, query="q", user=None, session=None):
    return ImpressionEvent(
        request_id=request_id,
        query=query,
        user=user,
        session=session,
        timestamp=timestamp,
        model_version="first-stage",
        index_version="v1",
        items=[ShownItem(doc_id=d, position=i + 1, score=1.0 / (i + 1)) for i, d in enumerate(docs)],
    )


def interaction(doc_id, type, request_id="r1", value=None, timestamp=1010.0, event_id=None, received_at=None):
    return InteractionEvent(
        event_id=event_id or f"e{next(_ids)}",
        request_id=request_id,
        doc_id=doc_id,
        type=type,
        value=value,
        timestamp=timestamp,
        received_at=received_at,
    )
