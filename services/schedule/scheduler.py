"""Continuous retraining: when N new labels have arrived or the interval has passed, whichever comes
first. One training at a time across the fleet (a Redis lock); a failed run backs off and never promotes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
from mlflow import MlflowClient
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis import Redis
from redis.exceptions import LockError, RedisError
from redis.lock import Lock

from services.config import Settings
from services.observability import serve_metrics
from services.online import OnlineMetrics
from services.registry import connect_registry
from services.schedule import control
from services.schedule.control import ScheduleStatus
from services.schedule.interleaving import check_experiment, current_experiment
from services.storage import Publisher, open_activity, open_labels, open_publisher
from services.storage.health import require
from services.storage.kafka import read_topic
from training.labels.rules import identity_of
from training.labels.store import LabelStore
from training.pipeline import TrainOutcome, train_once
from training.propensity import estimate_examination
from training.ranking.first_stage import FirstStage
from training.registry import MlflowRegistry

log = logging.getLogger("rankloop.schedule")


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


def impression_click_log(s: Settings) -> pd.DataFrame:
    """Every shown (query, doc, position) from the impressions topic, with whether it was clicked
    (from the interactions topic): the log a click model is estimated on."""
    keys = s.keys
    quarantined = {p.identity for p in open_labels(s.label_store_url).purges() if p.whole_identity}
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


def estimated_examination(s: Settings) -> list[float] | None:
    """The examination curve EM recovers from our impression and click logs; None (the configured
    curve is used) while the logs are too uniform to identify it."""
    clicks = impression_click_log(s)
    try:
        est = estimate_examination(clicks["query"], clicks["doc_id"], clicks["position"], clicks["clicked"])
    except ValueError as e:
        log.info("keeping the configured examination curve: %s", e)
        return None
    log.info("examination curve estimated from %d logged impressions: %s", est.impressions, est.examination)
    return est.examination


def retrain(
    s: Settings, first_stage: FirstStage | None = None, publisher: Publisher | None = None, labels: LabelStore | None = None
) -> TrainOutcome:
    """One training run now (what `rankloop train --once` does); publishes the model event on promotion."""
    require(s, "kafka", "mlflow")
    curve = estimated_examination(s) if s.train.debias != "naive" else None
    outcome = train_once(
        connect_registry(s),
        labels or open_labels(s.label_store_url),
        first_stage or FirstStage.current(s.state_dir),
        s.state_dir,
        s.serving.rerank_depth,
        s.train,
        s.gate,
        s.stream.rules,
        ("interleave" if s.interleave.share > 0 else "promote") if s.retrain.auto_promote else "nominate",
        curve,
    )
    if outcome.event is not None:
        pub = publisher or open_publisher(s.kafka.address)
        future = pub.publish(s.keys.model_events, s.keys.model_name, outcome.event)
        pub.flush(timeout=10)
        if future is not None:
            future.result(timeout=10)
    return outcome


class ScheduleMetrics:
    """The scheduler's Prometheus endpoint (`retrain.metrics_port`)."""

    def __init__(self, host: str, port: int) -> None:
        r = CollectorRegistry()
        self.runs = Counter("rankloop_schedule_runs", "trainings by outcome (failed: raised)", ["outcome"], registry=r)
        self.last_run = Gauge("rankloop_schedule_last_run_timestamp_seconds", "when the last training ended", registry=r)
        self.last_duration = Gauge("rankloop_schedule_last_duration_seconds", "how long the last training took", registry=r)
        self.pending = Gauge("rankloop_schedule_labels_pending", "labels arrived since the last training", registry=r)
        self.paused = Gauge("rankloop_schedule_paused", "1 while paused by an operator", registry=r)
        self.in_window = Gauge("rankloop_schedule_in_window", "1 while a training may start (retrain.windows)", registry=r)
        serve_metrics(r, host, port, "scheduler")


class LockKeeper:
    """Renews the training lock while a training runs, so a long one never loses it to a second
    scheduler; a lock Redis forgot (a restart) is taken again if it is free. The lock must be made
    with `thread_local=False`: the renewing thread needs its token."""

    def __init__(self, lock: Lock, ttl_s: float):
        self.lock, self.ttl_s = lock, ttl_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._renew, name="training-lock", daemon=True)

    def __enter__(self) -> LockKeeper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def _renew(self) -> None:
        while not self.done.wait(self.ttl_s / 3):
            try:
                self.lock.reacquire()
            except LockError:
                try:
                    lost = not self.lock.acquire(blocking=False)
                except RedisError as e:
                    lost = True
                    log.warning("training lock not renewed: %s", e)
                if lost:
                    log.warning("training lock lost and now held elsewhere (Redis restarted?)")
            except RedisError as e:
                log.warning("training lock not renewed (Redis away?): %s", e)


class Scheduler:
    """The `rankloop schedule` loop; its counters live in Redis so any replica can take over."""

    LOCK_TTL_S = 300.0  # renewed every third of it while a training runs

    def __init__(self, s: Settings):
        require(s, "kafka", "redis", "mlflow")
        self.s = s
        self.redis = Redis.from_url(s.redis_url)
        self.labels = open_labels(s.label_store_url)
        self.first_stage = FirstStage.current(s.state_dir)
        self.publisher = open_publisher(s.kafka.address)
        self.registry = connect_registry(s)
        self.client = self.registry.client
        self.metrics = ScheduleMetrics(s.metrics_host, s.retrain.metrics_port)
        self.activity = open_activity(s.redis_url, s.keys)
        self.online_written = 0.0

    def _get(self, field: str, default: float) -> float:
        value = self.redis.hget(self.s.keys.train_state, field)
        return float(value) if value is not None else default

    def _set(self, **fields: float | str) -> None:
        self.redis.hset(self.s.keys.train_state, mapping=fields)  # type: ignore[arg-type]

    def restore_counters(self, now: float) -> None:
        """After Redis lost them (a restart without persistence), the counters are rebuilt from
        the newest training run in MLflow, so a lost hash never causes a wasted retrain."""
        if self.redis.hget(self.s.keys.train_state, "last_time") is not None:
            return
        try:
            state = last_run_state(self.client, self.s.keys.experiment)
        except Exception as e:  # MLflow away: start counting from now
            log.warning("could not rebuild the training counters from MLflow: %s", e)
            state = {}
        if state:
            log.info("training counters rebuilt from the newest MLflow run: %s labels", state["last_labels"])
        self._set(**(state or {"last_labels": 0.0, "last_time": now}))

    def status(self) -> ScheduleStatus:
        return schedule_status(self.s, self.redis, self.labels, self.client)

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

    def tick(self) -> TrainOutcome | None:
        now = time.time()
        self.record_online_metrics(now)
        in_window = control.in_windows(self.s.retrain.windows, now)
        self.metrics.in_window.set(float(in_window))
        try:
            pause = control.paused(self.client, self.s.keys.experiment)
        except Exception as e:  # cannot tell whether an operator paused it: do not train
            log.warning("not retraining: the pause state cannot be read from MLflow: %s", e)
            return None
        self.metrics.paused.set(float(pause is not None))
        if now < self._get("backoff_until", 0) or pause or not in_window:
            return None
        if self.s.interleave.share > 0 and self.interleaving_runs():
            return None  # no new challenger while one is being judged online
        self.restore_counters(now)
        self.metrics.last_run.set(self._get("last_run_at", 0))  # a restarted scheduler reports the last run too
        self.metrics.last_duration.set(self._get("last_duration_s", 0))
        labels_now = self.labels.count()
        self.metrics.pending.set(max(0, labels_now - int(self._get("last_labels", 0))))
        decision = should_train(labels_now, int(self._get("last_labels", 0)), self._get("last_time", now), now, self.s)
        if not decision.due:
            log.debug("not retraining: %s", decision.why)
            return None
        lock = self.redis.lock(self.s.keys.train_lock, timeout=self.LOCK_TTL_S, blocking=False, thread_local=False)
        if not lock.acquire(blocking=False):
            log.info("another training holds the lock")
            return None
        started = time.time()
        try:
            log.info("retraining: %s", decision.why)
            with LockKeeper(lock, self.LOCK_TTL_S):
                outcome = retrain(self.s, self.first_stage, self.publisher, self.labels)
            self._record(started, outcome.status, outcome.message, outcome.version)
            self._set(last_labels=outcome.labels, last_time=time.time(), failures=0)
            log.info("training %s: %s", outcome.status, outcome.message)
            self.compact_if_due()
            return outcome
        except Exception as e:
            self._record(started, "failed", str(e), None)
            failures = int(self.redis.hincrby(self.s.keys.train_state, "failures", 1))
            wait = min(self.s.retrain.backoff_s * 2 ** (failures - 1), 6 * 3600)
            self._set(backoff_until=time.time() + wait)
            log.exception("training failed (%d in a row); backing off %.0fs, nothing promoted", failures, wait)
            return None
        finally:
            try:
                lock.release()
            except LockError as e:  # Redis restarted mid-training and forgot the lock: nothing to release
                log.warning("training lock was lost while training (Redis restarted?): %s", e)

    def interleaving_runs(self) -> bool:
        """Judges the challenger being interleaved (promotes or withdraws it once the rule decides);
        True while its experiment goes on."""
        try:
            experiment = check_experiment(self.registry, self.labels, self.s.interleave, self.client)
        except Exception as e:  # MLflow or the label store away: judge at the next check, train nothing meanwhile
            log.warning("could not judge the interleaving experiment: %s", e)
            return True
        if experiment is None:
            return False
        if experiment.event is not None:
            self.publisher.publish(self.s.keys.model_events, experiment.event.model_name, experiment.event)
            self.publisher.flush(timeout=10)
        if experiment.running:
            log.debug("%s", experiment.judgement.describe(experiment.challenger, experiment.champion))
        return experiment.running

    def compact_if_due(self) -> None:
        """Many small files (the stream commits every second or so) make every read slower: compact
        them, still under the training lock so two replicas never compact at once."""
        files = self.labels.files()
        if files < self.s.retrain.compact_after_files:
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
        self._set(
            last_run_at=ended,
            last_duration_s=ended - started,
            last_outcome=outcome,
            last_message=message[:500],
            last_version=version or "",
        )

    def run(self) -> None:
        from apscheduler.schedulers.blocking import BlockingScheduler

        sched = BlockingScheduler()
        sched.add_job(
            self.tick, "interval", seconds=self.s.retrain.check_s, max_instances=1, coalesce=True, next_run_time=datetime.now()
        )
        sched.start()


def schedule_status(s: Settings, redis: Redis, labels: LabelStore, client: MlflowClient) -> ScheduleStatus:
    """Everything `rankloop schedule status` shows, read (never guessed) from Redis, MLflow and the
    labels. With Redis away the counters come from the newest MLflow run and `problems` says so."""
    problems = []
    try:
        state = {k.decode(): v.decode() for k, v in redis.hgetall(s.keys.train_state).items()}  # type: ignore[union-attr]
        training_now: bool | None = bool(redis.exists(s.keys.train_lock))
    except RedisError as e:
        problems.append(f"Redis unreachable ({e}): counters from the newest MLflow run, training lock unknown")
        state, training_now = last_run_state(client, s.keys.experiment), None
    now = time.time()
    number = lambda name: float(state[name]) if state.get(name) else None  # noqa: E731
    labels_now, at_last = labels.count(), int(number("last_labels") or 0)
    pause = control.paused(client, s.keys.experiment)
    in_window = control.in_windows(s.retrain.windows, now)
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
        registry = MlflowRegistry(client, s.keys.model_name, s.versions_dir)
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
        last_outcome=state.get("last_outcome"),
        last_message=state.get("last_message"),
        last_version=state.get("last_version") or None,
        last_duration_s=number("last_duration_s"),
        failures_in_a_row=int(number("failures") or 0),
        backoff_until=backoff,
        problems=problems,
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
