"""Continuous retraining: when N new labels have arrived or the interval has passed, whichever comes
first. One training at a time across the fleet (the schedule state's lock); a failed run backs off and
never promotes. A run that passes the gate is handed to `Promotions` under the deployment's policy.

`Scheduler.tick` is one check; the control process (`services.control.app`) calls it every
`retrain.check_s` in a thread of its own.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient
from prometheus_client import CollectorRegistry, Counter, Gauge

from schemas import DependencyUnavailable
from services.config import Settings
from services.control import schedule
from services.control.interleaving import check_experiment
from services.control.promotion import Promotions
from services.control.schedule import ScheduleStatus, last_run_state, schedule_status, should_train
from services.online import OnlineMetrics
from services.storage import Activity, ScheduleState, open_activity, open_labels, open_registry, open_schedule_state
from services.storage.kafka import read_topic
from training.labels.rules import identity_of
from training.labels.store import LabelStore
from training.pipeline import TrainingJob, TrainOutcome, train_once
from training.progress import Progress, Tracker, silent
from training.propensity import estimate_examination
from training.ranking.first_stage import FirstStage
from training.registry import MlflowRegistry

log = logging.getLogger("rankloop.schedule")


def impression_click_log(s: Settings, labels: LabelStore) -> pd.DataFrame:
    """Every shown (query, doc, position) from the impressions topic, with whether it was clicked
    (from the interactions topic): the log a click model is estimated on."""
    keys = s.keys
    quarantined = {p.identity for p in labels.purges() if p.whole_identity}
    return click_log(read_topic(s.kafka.address, keys.impressions), read_topic(s.kafka.address, keys.interactions), quarantined)


def click_log(impressions: Iterable[dict], interactions: Iterable[dict], quarantined: set[str | None]) -> pd.DataFrame:
    """Impressions of a quarantined identity are left out: a click burst's fake clicks would
    otherwise bend the examination curve that debiases everyone's labels."""
    clicked = {(e.get("request_id"), e.get("doc_id")) for e in interactions if e.get("type") == "click"}
    rows = [
        (imp["query"], it["doc_id"], it["position"], float((imp["request_id"], it["doc_id"]) in clicked))
        for imp in impressions
        if identity_of(imp.get("user"), imp.get("session")) not in quarantined
        for it in imp.get("items", [])
    ]
    return pd.DataFrame(rows, columns=["query", "doc_id", "position", "clicked"])


def estimated_examination(s: Settings, labels: LabelStore) -> list[float] | None:
    """The examination curve EM recovers from our impression and click logs; None (the configured
    curve is used) while the logs are too uniform to identify it."""
    clicks = impression_click_log(s, labels)
    try:
        est = estimate_examination(clicks["query"], clicks["doc_id"], clicks["position"], clicks["clicked"])
    except ValueError as e:
        log.info("keeping the configured examination curve: %s", e)
        return None
    log.info("examination curve estimated from %d logged impressions: %s", est.impressions, est.examination)
    return est.examination


def training_job(s: Settings, examination: list[float] | None = None, work_dir: Path | None = None) -> TrainingJob:
    """The deployment's settings as the one object a training run takes."""
    return TrainingJob(
        work_dir=work_dir or s.state_dir,
        depth=s.serving.rerank_depth,
        train=s.train,
        gate=s.gate,
        rules=s.stream.rules,
        examination=examination,
    )


@dataclass(frozen=True)
class Round:
    """A training run and what became of its version: skipped, rejected, promoted, interleaving or
    awaiting approval."""

    outcome: TrainOutcome
    fate: str

    @property
    def summary(self) -> str:
        version = f" (version {self.outcome.version})" if self.outcome.version else ""
        return f"{self.fate}: {self.outcome.message}{version}"


class RecordedProgress:
    """A training's progress where operators look: the schedule state (`rankloop schedule status`,
    the status page, the demo read it) at most once a second, the log at most every `log_every_s`
    and at each new stage."""

    def __init__(self, state: ScheduleState, log_every_s: float = 15.0):
        self.state, self.log_every_s = state, log_every_s
        self.tracker = Tracker()
        self.written = self.logged = 0.0

    def __call__(self, task: str, done: int, total: int, note: str = "") -> None:
        new_stage = self.tracker.current is None or self.tracker.current.task != task
        self.tracker(task, done, total, note)
        current, now = self.tracker.current, time.time()
        if current is None:
            return
        if new_stage or now - self.written >= 1.0 or done == total:
            eta = current.eta_s(now)
            with contextlib.suppress(DependencyUnavailable):  # Redis away: the training goes on, the log still says
                self.state.write(
                    progress_task=task,
                    progress_done=done,
                    progress_total=total,
                    progress_note=note,
                    progress_eta_s="" if eta is None else eta,
                    progress_at=now,
                )
            self.written = now
        if new_stage or now - self.logged >= self.log_every_s:
            log.info("training: %s", current.describe())
            self.logged = now

    def clear(self) -> None:
        with contextlib.suppress(DependencyUnavailable):
            self.state.write(progress_task="")


def retrain(
    s: Settings,
    promotions: Promotions | None = None,
    labels: LabelStore | None = None,
    first_stage: FirstStage | None = None,
    registry: MlflowRegistry | None = None,
    progress: Progress = silent,
) -> Round:
    """One training run now (what `rankloop train --once` does), then the deployment's policy for a
    version that passed the gate."""
    registry = registry or open_registry(s)
    labels = labels or open_labels(s.label_store_url)
    promotions = promotions or Promotions.connect(s, registry)
    curve = estimated_examination(s, labels) if s.train.debias != "naive" else None
    outcome = train_once(registry, labels, first_stage or FirstStage.current(s.state_dir), training_job(s, curve), progress)
    if outcome.status != "passed" or outcome.version is None:
        return Round(outcome, outcome.status)
    fate = promotions.after_gate(outcome.version, outcome.message, Promotions.policy(s.retrain.auto_promote, s.interleave.share))
    outcome.record_fate(registry.client, registry.name, fate)
    return Round(outcome, fate)


class ScheduleMetrics:
    """What the scheduler counts, on the control process's /metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.runs = Counter("rankloop_schedule_runs", "trainings by outcome (failed: raised)", ["outcome"], registry=r)
        self.last_run = Gauge("rankloop_schedule_last_run_timestamp_seconds", "when the last training ended", registry=r)
        self.last_duration = Gauge("rankloop_schedule_last_duration_seconds", "how long the last training took", registry=r)
        self.pending = Gauge("rankloop_schedule_labels_pending", "labels arrived since the last training", registry=r)
        self.paused = Gauge("rankloop_schedule_paused", "1 while paused by an operator", registry=r)
        self.in_window = Gauge("rankloop_schedule_in_window", "1 while a training may start (retrain.windows)", registry=r)


class Scheduler:
    """The retraining loop's state and one check (`tick`); its counters live in the schedule state
    (Redis) so any replica can take over."""

    LOCK_TTL_S = 300.0  # renewed every third of it while a training runs

    def __init__(
        self,
        s: Settings,
        promotions: Promotions,
        registry: MlflowRegistry,
        labels: LabelStore,
        state: ScheduleState,
        activity: Activity,
        metrics: CollectorRegistry,
    ):
        self.s, self.promotions, self.registry, self.labels = s, promotions, registry, labels
        self.state, self.activity = state, activity
        self.metrics_registry = metrics
        self.metrics = ScheduleMetrics(metrics)
        self.online_written = 0.0
        self._first_stage: FirstStage | None = None

    @classmethod
    def connect(cls, s: Settings, promotions: Promotions, registry: MlflowRegistry, metrics: CollectorRegistry) -> Scheduler:
        return cls(
            s,
            promotions,
            registry,
            open_labels(s.label_store_url),
            open_schedule_state(s.redis_url, s.keys),
            open_activity(s.redis_url, s.keys),
            metrics,
        )

    @property
    def client(self) -> MlflowClient:
        """MLflow, for the pause tag, the runs and the counters a Redis restart lost."""
        return self.registry.client

    @property
    def first_stage(self) -> FirstStage:
        """Loaded at the first training (the control process answers before it has an index)."""
        if self._first_stage is None:
            self._first_stage = FirstStage.current(self.s.state_dir)
        return self._first_stage

    def _number(self, field: str, default: float) -> float:
        value = self.state.read().get(field)
        return float(value) if value else default

    def restore_counters(self, now: float) -> None:
        """After Redis lost them (a restart without persistence), the counters are rebuilt from
        the newest training run in MLflow, so a lost hash never causes a wasted retrain."""
        if "last_time" in self.state.read():
            return
        try:
            found = last_run_state(self.client, self.s.keys.experiment)
        except Exception as e:  # MLflow away: start counting from now
            log.warning("could not rebuild the training counters from MLflow: %s", e)
            found = {}
        if found:
            log.info("training counters rebuilt from the newest MLflow run: %s labels", found["last_labels"])
        self.state.write(**(found or {"last_labels": "0", "last_time": str(now)}))

    def status(self) -> ScheduleStatus:
        return schedule_status(self.s, self.state, self.labels, self.registry)

    def record_online_metrics(self, now: float) -> None:
        """Every `retrain.online_metrics_s`: what users did with each version's rankings (counted by
        the stream in Redis) as tags on its MLflow model version, beside the offline gate's figures."""
        if now - self.online_written < self.s.retrain.online_metrics_s:
            return
        self.online_written = now
        try:
            for v in self.registry.versions():
                m = OnlineMetrics.of(self.activity.online(v.version))
                if m.requests and m.requests != int(float(v.tags.get("online_requests", -1))):
                    tags = {f"online_{k}": "" if x is None else str(x) for k, x in m.model_dump().items()}
                    for key, value in tags.items():
                        self.registry.tag(v.version, key, value)
        except Exception as e:  # Redis or MLflow away: written at a later check
            log.warning("online metrics not written to the model versions: %s", e)

    def tick(self) -> Round | None:
        now = time.time()
        self.record_online_metrics(now)
        in_window = schedule.in_windows(self.s.retrain.windows, now)
        self.metrics.in_window.set(float(in_window))
        try:
            pause = schedule.paused(self.client, self.s.keys.experiment)
        except Exception as e:  # cannot tell whether an operator paused it: do not train
            log.warning("not retraining: the pause state cannot be read from MLflow: %s", e)
            return None
        self.metrics.paused.set(float(pause is not None))
        if now < self._number("backoff_until", 0) or pause or not in_window:
            return None
        if self.s.interleave.share > 0 and self.interleaving_runs():
            return None  # no new challenger while one is being judged online
        self.restore_counters(now)
        self.metrics.last_run.set(self._number("last_run_at", 0))  # a restarted scheduler reports the last run too
        self.metrics.last_duration.set(self._number("last_duration_s", 0))
        labels_now, at_last = self.labels.count(), int(self._number("last_labels", 0))
        self.metrics.pending.set(max(0, labels_now - at_last))
        decision = should_train(labels_now, at_last, self._number("last_time", now), now, self.s)
        if not decision.due:
            log.debug("not retraining: %s", decision.why)
            return None
        lock = self.state.try_lock(self.LOCK_TTL_S)
        if lock is None:
            log.info("another training holds the lock")
            return None
        started = time.time()
        progress = RecordedProgress(self.state)
        with lock:
            try:
                log.info("retraining: %s", decision.why)
                done = retrain(self.s, self.promotions, self.labels, self.first_stage, self.registry, progress)
            except Exception as e:
                progress.clear()
                self._record(started, "failed", str(e), None)
                failures = self.state.add_failure()
                wait = min(self.s.retrain.backoff_s * 2 ** (failures - 1), 6 * 3600)
                self.state.write(backoff_until=time.time() + wait)
                log.exception("training failed (%d in a row); backing off %.0fs, nothing promoted", failures, wait)
                return None
            progress.clear()
            self._record(started, done.fate, done.outcome.message, done.outcome.version)
            self.state.write(last_labels=done.outcome.labels, last_time=time.time(), failures=0)
            log.info("training %s", done.summary)
            self.compact_if_due()
            return done

    def interleaving_runs(self) -> bool:
        """Judges the challenger being interleaved (promotes or withdraws it once the rule decides);
        True while its experiment goes on."""
        try:
            experiment = check_experiment(self.promotions, self.labels, self.s.interleave, self.client)
        except Exception as e:  # MLflow or the label store away: judge at the next check, train nothing meanwhile
            log.warning("could not judge the interleaving experiment: %s", e)
            return True
        if experiment is None:
            return False
        if experiment.running:
            log.debug("%s", experiment.judgement.describe(experiment.challenger, experiment.champion))
        return experiment.running

    def compact_if_due(self) -> None:
        """Many small files (the stream commits every second or so) make every read slower: compact
        them, still under the training lock so two replicas never compact at once."""
        if self.labels.files() < self.s.retrain.compact_after_files:
            return
        try:
            done = self.labels.compact()
            log.info("label store compacted: %s", done)
        except Exception as e:  # a concurrent commit won: the next training tries again, nothing is lost
            log.warning("label store compaction failed (retried after the next training): %s", e)

    def _record(self, started: float, outcome: str, message: str, version: str | None) -> None:
        ended = time.time()
        self.metrics.runs.labels(outcome).inc()
        self.metrics.last_run.set(ended)
        self.metrics.last_duration.set(ended - started)
        self.state.write(
            last_run_at=ended,
            last_duration_s=ended - started,
            last_outcome=outcome,
            last_message=message[:500],
            last_version=version or "",
        )
