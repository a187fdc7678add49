"""What an operator sees and steers of the retraining schedule: the trigger rule, pause and resume,
training windows, and one status read from where the scheduler keeps its state (the schedule state in
Redis, MLflow, the label store). Loads no model: `rankloop schedule status` answers in seconds.

A pause is an MLflow experiment tag, not a Redis key: it survives a Redis restart, every scheduler
replica sees it, and a reviewer finds it next to the runs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow import MlflowClient
from pydantic import BaseModel, ConfigDict

from schemas import DependencyUnavailable, InvalidState
from services.config import Settings
from services.control.interleaving import current_experiment
from services.storage import ScheduleState
from training.labels.store import LabelStore
from training.registry import MlflowRegistry

PAUSE_TAG = "rankloop.schedule.paused"


class Pause(BaseModel):
    by: str
    at: float
    reason: str


class TrainingProgress(BaseModel):
    """Where a running training is: its stage, how far, how it goes, and the time left at its pace."""

    task: str  # e.g. "fine-tuning"
    done: int
    total: int
    note: str  # e.g. "loss 0.812"
    eta_s: float | None  # seconds left in this stage at its pace so far (None: not known yet)
    at: float  # when it was reported

    def describe(self) -> str:
        eta = f", about {self.eta_s:.0f} s left" if self.eta_s is not None else ""
        return f"{self.task} {self.done}/{self.total}" + (f", {self.note}" if self.note else "") + eta


class ScheduleStatus(BaseModel):
    """`rankloop schedule status --json` and the control process's `GET /schedule`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"paused": None, "windows": ["22:00-06:00"], "in_window": True, "training_now": False, "labels": 48210,
                 "labels_at_last_run": 46000, "labels_pending": 2210, "next": "2210 new labels >= 2000",
                 "last_run_at": 1795300000.0, "last_outcome": "promoted", "last_message": "better by +0.0241 NDCG@10",
                 "last_version": "7", "last_duration_s": 171.0, "failures_in_a_row": 0, "backoff_until": None, "problems": [],
                 "progress": None}
            ]
        }
    )  # fmt: skip

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
    progress: TrainingProgress | None = None  # the running training's stage (None: none running)


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
        raise InvalidState(f"no MLflow experiment {name!r} yet: open the registry as a writer (it makes it)")
    return str(experiment.experiment_id)


def paused(client: MlflowClient, experiment: str) -> Pause | None:
    """The pause in force (None: none, also before the experiment's first training)."""
    found = client.get_experiment_by_name(experiment)
    value = found.tags.get(PAUSE_TAG) if found is not None else None
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


@dataclass(frozen=True)
class Decision:
    due: bool
    why: str


def should_train(labels_now: int, labels_at_last: int, last_time: float, now: float, s: Settings) -> Decision:
    """Pure trigger rule: enough new labels, or the interval has passed with at least one new label."""
    new = labels_now - labels_at_last
    r = s.retrain
    if new >= r.min_new_labels:
        return Decision(True, f"{new} new labels >= {r.min_new_labels}")
    if new > 0 and now - last_time >= r.interval_s:
        return Decision(True, f"interval of {r.interval_s:.0f}s passed with {new} new labels")
    return Decision(False, f"{new} new labels, next check")


def schedule_status(s: Settings, state: ScheduleState, labels: LabelStore, registry: MlflowRegistry) -> ScheduleStatus:
    """Everything `rankloop schedule status` shows, read (never guessed) from the schedule state,
    MLflow and the labels. With Redis away the counters come from the newest MLflow run and
    `problems` says so."""
    problems = []
    client = registry.client
    try:
        counters = state.read()
        training_now: bool | None = state.locked()
    except DependencyUnavailable as e:
        problems.append(f"Redis unreachable ({e}): counters from the newest MLflow run, training lock unknown")
        counters, training_now = last_run_state(client, s.keys.experiment), None
    now = time.time()
    number = lambda name: float(counters[name]) if counters.get(name) else None  # noqa: E731
    labels_now, at_last = labels.count(), int(number("last_labels") or 0)
    pause = paused(client, s.keys.experiment)
    in_window = in_windows(s.retrain.windows, now)
    backoff = number("backoff_until")
    if pause:
        why = f"paused by {pause.by}: {pause.reason} (`rankloop schedule resume`)"
    elif not in_window:
        why = f"outside the training windows {', '.join(s.retrain.windows)} (UTC)"
    elif backoff and backoff > now:
        why = f"backing off after a failure until {time.strftime('%H:%M:%S', time.gmtime(backoff))} UTC"
    else:
        why = should_train(labels_now, at_last, number("last_time") or now, now, s).why
    if s.interleave.share > 0 and not pause:
        experiment = current_experiment(registry, labels, s.interleave)
        if experiment is not None:
            why = experiment.judgement.describe(experiment.challenger, experiment.champion) + "; no training meanwhile"
    return ScheduleStatus(
        paused=pause,
        windows=s.retrain.windows,
        in_window=in_window,
        training_now=training_now,
        labels=labels_now,
        labels_at_last_run=at_last,
        labels_pending=max(0, labels_now - at_last),
        next=why,
        last_run_at=number("last_run_at"),
        last_outcome=counters.get("last_outcome"),
        last_message=counters.get("last_message"),
        last_version=counters.get("last_version") or None,
        last_duration_s=number("last_duration_s"),
        failures_in_a_row=int(number("failures") or 0),
        backoff_until=backoff,
        problems=problems,
        progress=training_progress(counters) if training_now else None,
    )


def training_progress(counters: dict[str, str]) -> TrainingProgress | None:
    """The progress the scheduler last recorded (`services.control.scheduler.RecordedProgress`)."""
    if not counters.get("progress_task"):
        return None
    eta = counters.get("progress_eta_s")
    return TrainingProgress(
        task=counters["progress_task"],
        done=int(float(counters.get("progress_done") or 0)),
        total=int(float(counters.get("progress_total") or 0)),
        note=counters.get("progress_note") or "",
        eta_s=float(eta) if eta else None,
        at=float(counters.get("progress_at") or 0),
    )


def last_run_state(client: MlflowClient, experiment: str) -> dict[str, str]:
    """The scheduler's counters as the newest training run in MLflow left them."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1) if exp else []
    if not runs:
        return {}
    run = runs[0]
    ended = (run.info.end_time or run.info.start_time) / 1000
    return {
        "last_labels": str(run.data.metrics.get("label_contributions", run.data.metrics.get("labels", 0))),
        "last_time": str(ended),
        "last_run_at": str(ended),
        "last_duration_s": str((ended * 1000 - run.info.start_time) / 1000),
        "last_outcome": run.data.tags.get("outcome", "unknown"),
        "last_message": run.data.tags.get("gate_reason", ""),
        "last_version": "",
    }
