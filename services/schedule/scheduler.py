"""Continuous retraining: when N new labels have arrived or the interval has passed, whichever comes
first. One training at a time across the fleet (a Redis lock); a failed run backs off and never promotes."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import pandas as pd
from redis.exceptions import LockError

from services.config import Settings
from services.registry import connect_registry
from services.storage import Publisher, open_publisher
from services.storage.health import require
from services.storage.kafka import read_topic
from training.labels.rules import identity_of
from training.labels.store import LabelStore, ParquetLabelStore
from training.pipeline import TrainOutcome, train_once
from training.propensity import estimate_examination
from training.ranking.first_stage import FirstStage

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
    quarantined = {p.identity for p in ParquetLabelStore(s.label_dir).purges() if p.whole_identity}
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
    curve = estimated_examination(s) if s.train.debias == "ips" else None
    outcome = train_once(
        connect_registry(s),
        labels or ParquetLabelStore(s.label_dir),
        first_stage or FirstStage.current(s.state_dir),
        s.state_dir,
        s.serving.rerank_depth,
        s.train,
        s.gate,
        s.stream.rules,
        "promote" if s.retrain.auto_promote else "nominate",
        curve,
    )
    if outcome.event is not None:
        pub = publisher or open_publisher(s.kafka.address)
        future = pub.publish(s.keys.model_events, s.keys.model_name, outcome.event)
        pub.flush(timeout=10)
        if future is not None:
            future.result(timeout=10)
    return outcome


class Scheduler:
    """The `rankloop schedule` loop; its counters live in Redis so any replica can take over."""

    def __init__(self, s: Settings):
        from redis import Redis

        require(s, "kafka", "redis", "mlflow")
        self.s = s
        self.redis = Redis.from_url(s.redis_url)
        self.labels = ParquetLabelStore(s.label_dir)
        self.first_stage = FirstStage.current(s.state_dir)
        self.publisher = open_publisher(s.kafka.address)

    def _get(self, field: str, default: float) -> float:
        value = self.redis.hget(self.s.keys.train_state, field)
        return float(value) if value is not None else default

    def _set(self, **fields: float) -> None:
        self.redis.hset(self.s.keys.train_state, mapping=fields)  # type: ignore[arg-type]

    def restore_counters(self, now: float) -> None:
        """After Redis lost them (a restart without persistence), the counters are rebuilt from
        the newest training run in MLflow, so a lost hash never causes a wasted retrain."""
        if self.redis.hget(self.s.keys.train_state, "last_time") is not None:
            return
        last_labels, last_time = 0.0, now
        try:
            client = connect_registry(self.s).client
            experiment = client.get_experiment_by_name(self.s.keys.experiment)
            runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        except Exception as e:  # MLflow away: start counting from now
            log.warning("could not rebuild the training counters from MLflow: %s", e)
            runs = []
        if runs:
            last_labels = float(runs[0].data.metrics.get("labels", 0.0))
            last_time = (runs[0].info.end_time or runs[0].info.start_time) / 1000
            log.info("training counters rebuilt from MLflow run %s: %d labels", runs[0].info.run_id, last_labels)
        self._set(last_labels=last_labels, last_time=last_time)

    def tick(self) -> TrainOutcome | None:
        now = time.time()
        if now < self._get("backoff_until", 0):
            return None
        self.restore_counters(now)
        decision = should_train(self.labels.count(), int(self._get("last_labels", 0)), self._get("last_time", now), now, self.s)
        if not decision.due:
            log.debug("not retraining: %s", decision.why)
            return None
        lock = self.redis.lock(self.s.keys.train_lock, timeout=3600, blocking=False)
        if not lock.acquire(blocking=False):
            log.info("another training holds the lock")
            return None
        try:
            log.info("retraining: %s", decision.why)
            outcome = retrain(self.s, self.first_stage, self.publisher, self.labels)
            self._set(last_labels=outcome.labels, last_time=time.time(), failures=0)
            log.info("training %s: %s", outcome.status, outcome.message)
            return outcome
        except Exception:
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

    def run(self) -> None:
        from apscheduler.schedulers.blocking import BlockingScheduler

        sched = BlockingScheduler()
        sched.add_job(
            self.tick, "interval", seconds=self.s.retrain.check_s, max_instances=1, coalesce=True, next_run_time=datetime.now()
        )
        sched.start()
