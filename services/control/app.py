"""The control process (`rankloop schedule`): the one place that decides which model serves.

It runs the retraining loop (`Scheduler.tick` every `retrain.check_s`) and the champion watch
(`ChampionWatch.check` every `serving.champion_poll_s`) in threads of their own, and serves the admin
API on `control.host:control.port` (default http://127.0.0.1:8001):

- `POST /admin/promote`, `/admin/approve`, `/admin/rollback`: audited moves, admin key required
- `GET /schedule`: the schedule's status (what `rankloop schedule status` prints)
- `GET /status`: the status page; `GET /metrics`: Prometheus; `GET /health/live`, `/health/ready`

Serving replicas only read the registry; every alias move goes through `Promotions`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from schemas import (
    DeadLetter,
    DependencyUnavailable,
    ErrorBody,
    InvalidState,
    Liveness,
    ModelEvent,
    NotFound,
    PromoteRequest,
    RollbackRequest,
)
from services.auth import Scope
from services.config import Settings
from services.control.promotion import Moved, Promotions
from services.control.schedule import ScheduleStatus
from services.control.scheduler import Scheduler
from services.control.status import MINUTES, StatusPage, read_trainings
from services.control.watch import ChampionWatch
from services.dead_letters import DeadLetterLog, DeadLetterQuery, KafkaDeadLetterLog, find_dead_letters
from services.http import BAD_BODY, NO_KEY, admin, caller, new_app, pages
from services.storage import Activity, Fleet, open_activity, open_fleet, open_registry

log = logging.getLogger("rankloop.control")


class ControlHealth(Liveness):
    """`/health/ready` of the control process: ready while its loops run and the registry answers."""

    ready: bool
    detail: str | None = None
    last_training_check: float | None = None
    last_champion_check: float | None = None


@dataclass
class Loop:
    """A check run every `every_s` seconds in a thread; the last error is kept for /health/ready."""

    name: str
    check: Callable[[], object]
    every_s: float
    last_ok: float | None = None
    error: str | None = None
    thread: threading.Thread | None = field(default=None, repr=False)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.check()
                self.last_ok, self.error = time.time(), None
            except Exception as e:  # a dependency away: said on /health/ready, retried at the next turn
                self.error = f"{type(e).__name__}: {e}"
                log.exception("%s failed", self.name)
            stop.wait(self.every_s)

    def start(self, stop: threading.Event) -> None:
        self.thread = threading.Thread(target=self.run, args=(stop,), name=self.name, daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class ControlPlane:
    """What the control process holds: promotions, the scheduler, the champion watch, and the stores
    its pages read."""

    def __init__(
        self,
        s: Settings,
        promotions: Promotions,
        scheduler: Scheduler,
        fleet: Fleet,
        activity: Activity,
        dead_letters: DeadLetterLog,
    ):
        self.s, self.promotions, self.scheduler, self.fleet, self.activity = s, promotions, scheduler, fleet, activity
        self.dead_letters = dead_letters
        self.metrics = scheduler.metrics_registry
        self.rollbacks = Counter("rankloop_automatic_rollbacks", "champions rolled back because workers could not load them",
                                 registry=self.metrics)  # fmt: skip
        self.watch = ChampionWatch(promotions, fleet, s.serving.max_load_failures, self.report_age_s)
        self.loops = [
            Loop("retraining", scheduler.tick, s.retrain.check_s),
            Loop("champion-watch", self.check_champion, s.serving.champion_poll_s),
        ]
        self._stop = threading.Event()

    @property
    def report_age_s(self) -> float:
        """A serving worker that has not reported for three polls is taken as gone."""
        return 3 * self.s.serving.champion_poll_s + 5

    @classmethod
    def connect(cls, s: Settings) -> ControlPlane:
        registry = open_registry(s)
        promotions = Promotions.connect(s, registry)
        metrics = CollectorRegistry()
        scheduler = Scheduler.connect(s, promotions, registry, metrics)
        dead = KafkaDeadLetterLog(s.kafka.address, s.keys.dead_letters, timeout_s=4)
        return cls(s, promotions, scheduler, open_fleet(s.redis_url, s.keys), open_activity(s.redis_url, s.keys), dead)

    def check_champion(self) -> Moved | None:
        moved = self.watch.check()
        if moved is not None:
            self.rollbacks.inc()
        return moved

    def start(self) -> None:
        for loop in self.loops:
            loop.start(self._stop)

    def stop(self) -> None:
        self._stop.set()

    def health(self) -> ControlHealth:
        problems = [f"{loop.name}: {loop.error}" for loop in self.loops if loop.error]
        problems += [f"{loop.name} loop is not running" for loop in self.loops if loop.thread and not loop.alive]
        started = all(loop.thread for loop in self.loops)
        if not started:
            problems.append("starting")
        return ControlHealth(
            ready=started and not problems,
            detail="; ".join(problems) or None,
            last_training_check=self.loops[0].last_ok,
            last_champion_check=self.loops[1].last_ok,
        )

    def status_page(self, auth: str) -> str:
        """The page; `auth` is whether the process runs open ("open") or with keys ("keys")."""
        s = self.s
        page = StatusPage(s.deployment, auth, self.report_age_s)
        registry = self.promotions.registry
        readers: list[tuple[str, Callable[[], None]]] = [
            ("serving workers (Redis)", lambda: setattr(page, "workers", self.fleet.reports(self.report_age_s))),
            ("schedule", lambda: setattr(page, "schedule", self.scheduler.status())),
            ("model registry", lambda: setattr(page, "versions", sorted(registry.versions(), key=lambda v: -int(v.version)))),
            ("training runs (MLflow)", lambda: self._read_trainings(page)),
            ("activity counts (Redis)", lambda: setattr(page, "minutes", self.activity.minutes(MINUTES))),
            ("dead letters (Kafka)", lambda: setattr(page, "dead_letters", self.newest_dead_letters())),
        ]
        for name, read in readers:
            try:
                read()
            except Exception as e:  # shown on the page, never as an empty history
                page.problems.append(f"{name}: {e}")
        return page.render()

    def _read_trainings(self, page: StatusPage) -> None:
        page.trainings, page.rounds = read_trainings(self.scheduler.client, self.s.keys.experiment)

    def newest_dead_letters(self) -> list[DeadLetter]:
        return find_dead_letters(self.dead_letters, DeadLetterQuery(limit=10))


def get_plane(request: Request) -> ControlPlane:
    return request.app.state.plane


Plane = Annotated[ControlPlane, Depends(get_plane)]
ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    **NO_KEY,
    **BAD_BODY,
    404: {"model": ErrorBody, "description": "no such version"},
    409: {"model": ErrorBody, "description": "already the champion, no previous version, or not awaiting approval"},
    503: {"model": ErrorBody, "description": "the registry cannot be reached"},
}


def moved(change: Callable[[], Moved]) -> ModelEvent:
    """An alias move as an HTTP answer; Promotions' error policy mapped to status codes."""
    try:
        return change().event
    except NotFound as e:
        raise HTTPException(404, str(e)) from None
    except InvalidState as e:
        raise HTTPException(409, str(e)) from None
    except DependencyUnavailable as e:
        raise HTTPException(503, str(e)) from None


def create_app(s: Settings, plane: ControlPlane | None = None, run_loops: bool = True) -> FastAPI:
    """The control process's app; `plane` and `run_loops` are for tests (a plane of their own, no threads)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        current = plane or ControlPlane.connect(s)
        app.state.plane = current
        if app.state.key_gate.open:
            log.warning("NO AUTHENTICATION: %s holds no API key; the admin routes still need an admin key", s.keys_file)
        if run_loops:
            current.start()
        log.info("control plane on http://%s:%d (admin API, /status, /metrics)", s.control.host, s.control.port)
        yield
        current.stop()

    app = new_app(
        s,
        "rankloop control plane",
        "Which model serves: audited promotions and rollbacks, the retraining schedule, the status page.",
        lifespan,
    )

    @app.post("/admin/promote", response_model=ModelEvent, responses=ADMIN_ERRORS)
    def promote(body: PromoteRequest, plane: Plane, actor: str = Depends(admin)) -> ModelEvent:
        """Make a version the champion (audited on the version: who, when, why); every worker swaps."""
        return moved(lambda: plane.promotions.promote(body.version, body.reason, actor))

    @app.post("/admin/approve", response_model=ModelEvent, responses=ADMIN_ERRORS)
    def approve(body: PromoteRequest, plane: Plane, actor: str = Depends(admin)) -> ModelEvent:
        """Promote the challenger that passed the gate and awaits approval (`retrain.auto_promote`
        off); 409 for any other version."""
        return moved(lambda: plane.promotions.approve(body.version, body.reason, actor))

    @app.post("/admin/rollback", response_model=ModelEvent, responses=ADMIN_ERRORS)
    def rollback(body: RollbackRequest, plane: Plane, actor: str = Depends(admin)) -> ModelEvent:
        """Put the previous version back as champion (audited on the version rolled back)."""
        return moved(lambda: plane.promotions.rollback(body.reason, actor))

    @app.get(
        "/schedule",
        response_model=ScheduleStatus,
        responses={**NO_KEY, 503: {"model": ErrorBody, "description": "MLflow or the label store cannot be read"}},
        dependencies=[Depends(caller(Scope.admin))],
    )
    def schedule(plane: Plane) -> ScheduleStatus:
        """Paused or not, windows, the last training and its outcome, labels pending, what the next check will do."""
        try:
            return plane.scheduler.status()
        except Exception as e:
            raise HTTPException(503, f"the schedule cannot be read: {e}") from None

    @app.get("/health/live", response_model=Liveness)
    def live() -> Liveness:
        """The process answers (the liveness probe: a failure means restart it)."""
        return Liveness()

    @app.get("/health/ready", response_model=ControlHealth, responses={503: {"model": ControlHealth}})
    def ready(plane: Plane) -> JSONResponse:
        """Ready while both loops run and their last turn worked (the registry and the stores answered)."""
        health = plane.health()
        return JSONResponse(health.model_dump(), status_code=200 if health.ready else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST: {"example": 'rankloop_schedule_runs_total{outcome="promoted"} 3.0\n'}}}
        },
        dependencies=[Depends(pages)],
    )
    def metrics(plane: Plane) -> Response:
        """Prometheus metrics: trainings by outcome, labels pending, paused, automatic rollbacks."""
        return Response(generate_latest(plane.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/status",
        response_class=HTMLResponse,
        responses={200: {"content": {"text/html": {"example": "<!doctype html><html>…</html>"}}}, **NO_KEY},
        dependencies=[Depends(pages)],
    )
    def status_page(request: Request, plane: Plane) -> HTMLResponse:
        """The status page (HTML): what each serving worker serves, the schedule, model history, recent
        trainings with their metric by round, events and labels per minute, dead letters."""
        return HTMLResponse(plane.status_page("open" if request.app.state.key_gate.open else "keys"))

    return app
