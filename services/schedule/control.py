"""What an operator sees and steers of the retraining schedule: pause and resume, training windows,
and one status read from where the scheduler keeps its state (Redis counters, MLflow, the label store).

A pause is an MLflow experiment tag, not a Redis key: it survives a Redis restart, every scheduler
replica sees it, and a reviewer finds it next to the runs."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from mlflow import MlflowClient
from pydantic import BaseModel

from schemas import InvalidState

PAUSE_TAG = "rankloop.schedule.paused"


class Pause(BaseModel):
    by: str
    at: float
    reason: str


class ScheduleStatus(BaseModel):
    """`rankloop schedule status --json`."""

    paused: Pause | None
    windows: list[str]  # UTC; empty: any time
    in_window: bool
    training_now: bool | None  # the training lock is held (None: Redis unreachable)
    labels: int
    labels_at_last_run: int
    labels_pending: int
    next: str  # why the next check would or would not train
    last_run_at: float | None
    last_outcome: str | None  # skipped, rejected, passed, promoted, failed
    last_message: str | None
    last_version: str | None
    last_duration_s: float | None
    failures_in_a_row: int
    backoff_until: float | None
    problems: list[str] = []  # sources that could not be read


def in_windows(windows: list[str], now: float) -> bool:
    """Whether `now` falls in one of the "HH:MM-HH:MM" UTC windows (one may wrap past midnight)."""
    if not windows:
        return True
    t = datetime.fromtimestamp(now, UTC).strftime("%H:%M")
    for window in windows:
        start, end = window.split("-")
        if (start <= t < end) if start <= end else (t >= start or t < end):
            return True
    return False


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise InvalidState(f"no MLflow experiment {name!r} yet: run `rankloop up` (or a training) first")
    return str(experiment.experiment_id)


def paused(client: MlflowClient, experiment: str) -> Pause | None:
    value = client.get_experiment(_experiment_id(client, experiment)).tags.get(PAUSE_TAG)
    return Pause.model_validate_json(value) if value else None


def pause(client: MlflowClient, experiment: str, by: str, reason: str) -> Pause:
    """No training starts until `resume` (one already running finishes)."""
    p = Pause(by=by, at=time.time(), reason=reason)
    client.set_experiment_tag(_experiment_id(client, experiment), PAUSE_TAG, json.dumps(p.model_dump()))
    return p


def resume(client: MlflowClient, experiment: str) -> Pause | None:
    """Lifts the pause; returns the one lifted (None: it was not paused)."""
    was = paused(client, experiment)
    if was:
        client.delete_experiment_tag(_experiment_id(client, experiment), PAUSE_TAG)
    return was
