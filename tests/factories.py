"""Small builders used across tests: events, and the control plane on in-memory storage."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from schemas import ImpressionEvent, InteractionEvent, ShownItem

if TYPE_CHECKING:
    from services.config import Settings
    from services.control.app import ControlPlane
    from services.control.promotion import Promotions
    from services.storage.memory import MemoryPublisher
    from training.registry import MemoryRegistry

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


def promotions_on(registry: MemoryRegistry, publisher: MemoryPublisher | None = None) -> Promotions:
    """The control plane's one owner of alias moves, on an in-memory registry and publisher."""
    from services.control.promotion import Promotions
    from services.keys import Keys
    from services.storage.memory import MemoryPublisher

    return Promotions(registry, registry, publisher or MemoryPublisher(), Keys().model_events)


def control_plane(s: Settings, registry: MemoryRegistry, publisher: MemoryPublisher | None = None) -> ControlPlane:
    """The control process's parts on memory: no MLflow, Redis or broker (its loops are not started)."""
    from prometheus_client import CollectorRegistry

    from services.control.app import ControlPlane
    from services.control.scheduler import Scheduler
    from services.storage.memory import MemoryActivity, MemoryDeadLetterLog, MemoryFleet, MemoryLabelStore, MemoryScheduleState

    promotions = promotions_on(registry, publisher)
    activity = MemoryActivity()
    scheduler = Scheduler(s, promotions, registry, MemoryLabelStore(), MemoryScheduleState(), activity, CollectorRegistry())  # type: ignore[arg-type]
    dead = MemoryDeadLetterLog(promotions.publisher, s.keys.dead_letters)  # type: ignore[arg-type]
    return ControlPlane(s, promotions, scheduler, MemoryFleet(), activity, dead)
