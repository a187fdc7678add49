"""Continuous retraining: when N new labels have arrived or the interval has passed, whichever comes
first. One training at a time across the fleet (a Redis lock); a failed run backs off and never promotes."""

from __future__ import annotations

import logging
import time
from datetime import datetime
from dataclasses import dataclass

from apscheduler.schedulers.blocking import BlockingScheduler
from redis import Redis

from services.bus import EventPublisher, impression_click_log, make_producer
from services.config import Settings
from services.infra import require
from training import registry
from training.dataset import read_labels
from training.pipeline import TrainOutcome, train_once
from training.propensity import estimate_examination
from training.retrieval import FirstStage

log = logging.getLogger("rankloop.schedule")
LOCK = "rankloop:lock:train"
LAST_LABELS = "rankloop:train:last_labels"
LAST_TIME = "rankloop:train:last_time"
BACKOFF_UNTIL = "rankloop:train:backoff_until"
FAILURES = "rankloop:train:failures"


@dataclass
class Decision:
    due: bool
    why: str


def should_train(labels_now: int, labels_at_last: int, last_time: float, now: float, s: Settings) -> Decision:
    """Pure trigger rule: enough new labels, or the interval has passed with at least one new label."""
    new = labels_now - labels_at_last
    if new >= s.retrain_min_new_labels:
        return Decision(True, f"{new} new labels >= {s.retrain_min_new_labels}")
    if new > 0 and now - last_time >= s.retrain_interval_s:
        return Decision(True, f"interval of {s.retrain_interval_s:.0f}s passed with {new} new labels")
    return Decision(False, f"{new} new labels, next check")


def estimated_examination(s: Settings) -> list[float] | None:
    """The examination curve EM recovers from our impression and click logs; None (the configured
    curve is used) while the logs are too uniform to identify it."""
    log_ = impression_click_log(s)
    try:
        est = estimate_examination(log_["query"], log_["doc_id"], log_["position"], log_["clicked"])
    except ValueError as e:
        log.warning("keeping the configured examination curve: %s", e)
        return None
    log.warning("examination curve estimated from %d logged impressions: %s", est.impressions, est.examination)
    return est.examination


def retrain(s: Settings, first_stage: FirstStage | None = None, publisher: EventPublisher | None = None) -> TrainOutcome:
    """One training run now (what `rankloop train --once` does); publishes the model event on promotion."""
    require(s, "kafka", "mlflow")
    fs = first_stage or FirstStage.current(s.state_dir)
    client = registry.connect(s.tracking_uri, s.artifact_dir)
    curve = estimated_examination(s) if s.train.debias == "ips" else None
    outcome = train_once(client, s.model_name, s.label_dir, fs, fs.text, s.state_dir, s.train, s.label_rules,
                         examination=curve)
    if outcome.event is not None:
        pub = publisher or EventPublisher(make_producer(s.bootstrap))
        future = pub.publish(s.topic_model_events, s.model_name, outcome.event)
        pub.producer.flush(timeout=10)
        if future is not None:
            future.get(timeout=10)
    return outcome


class Scheduler:
    def __init__(self, s: Settings):
        require(s, "kafka", "redis", "mlflow")
        self.s = s
        self.redis = Redis.from_url(s.redis)
        self.first_stage = FirstStage.current(s.state_dir)
        self.publisher = EventPublisher(make_producer(s.bootstrap))

    def tick(self) -> TrainOutcome | None:
        now = time.time()
        if now < float(self.redis.get(BACKOFF_UNTIL) or 0):
            return None
        labels_now = len(read_labels(self.s.label_dir)[0])
        decision = should_train(labels_now, int(self.redis.get(LAST_LABELS) or 0),
                                float(self.redis.get(LAST_TIME) or now), now, self.s)
        if self.redis.get(LAST_TIME) is None:
            self.redis.set(LAST_TIME, now)
        if not decision.due:
            log.info("not retraining: %s", decision.why)
            return None
        lock = self.redis.lock(LOCK, timeout=3600, blocking=False)
        if not lock.acquire(blocking=False):
            log.info("another training holds the lock")
            return None
        try:
            log.warning("retraining: %s", decision.why)
            outcome = retrain(self.s, self.first_stage, self.publisher)
            self.redis.set(LAST_LABELS, outcome.labels)
            self.redis.set(LAST_TIME, time.time())
            self.redis.delete(FAILURES)
            log.warning("training %s: %s", outcome.status, outcome.message)
            return outcome
        except Exception:
            failures = int(self.redis.incr(FAILURES))
            wait = min(self.s.retrain_backoff_s * 2 ** (failures - 1), 6 * 3600)
            self.redis.set(BACKOFF_UNTIL, time.time() + wait)
            log.exception("training failed (%d in a row); backing off %.0fs, nothing promoted", failures, wait)
            return None
        finally:
            lock.release()

    def run(self) -> None:
        sched = BlockingScheduler()
        sched.add_job(self.tick, "interval", seconds=self.s.retrain_check_s, max_instances=1, coalesce=True,
                      next_run_time=datetime.now())
        sched.start()
