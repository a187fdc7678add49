"""Settings: groups from nested env names, a TOML or JSON file, MLflow's own variable, checked values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.config import Settings
from services.keys import Keys


def test_nested_env_names_fill_the_groups(monkeypatch):
    monkeypatch.setenv("RANKLOOP_KAFKA__BOOTSTRAP", "broker:9092")
    monkeypatch.setenv("RANKLOOP_SERVING__RERANK_DEPTH", "30")
    monkeypatch.setenv("RANKLOOP_TRAIN__DEBIAS", "ips")
    s = Settings()
    assert s.kafka.address == "broker:9092" and not s.kafka.local
    assert s.serving.rerank_depth == 30 and s.train.debias == "ips"
    assert s.redis.local and s.redis.address.startswith("redis://127.0.0.1:")


def test_a_toml_file_is_read_and_env_wins_over_it(tmp_path, monkeypatch):
    path = tmp_path / "rankloop.toml"
    path.write_text('deployment = "shop"\n[gate]\nmin_queries = 12\n[serving]\nport = 9001\n')
    monkeypatch.setenv("RANKLOOP_CONFIG", str(path))
    monkeypatch.setenv("RANKLOOP_SERVING__PORT", "9002")
    s = Settings()
    assert (s.deployment, s.gate.min_queries, s.serving.port) == ("shop", 12, 9002)
    assert s.keys.model_name == "shop-reranker" and s.label_store_url.endswith("labels/shop")


def test_a_json_file_round_trips_the_settings(tmp_path, monkeypatch):
    original = Settings(deployment="other", state_dir=tmp_path)
    path = tmp_path / "settings.json"
    path.write_text(original.model_dump_json())
    monkeypatch.setenv("RANKLOOP_CONFIG", str(path))
    assert Settings() == original


def test_mlflow_tracking_uri_is_honoured_but_rankloop_names_win(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert Settings().tracking_uri == "http://mlflow:5000"
    monkeypatch.setenv("RANKLOOP_MLFLOW__TRACKING_URI", "http://other:5000")
    assert Settings().tracking_uri == "http://other:5000"


@pytest.mark.parametrize(
    "name,value",
    [
        ("RANKLOOP_TRAIN__DEBIAS", "sometimes"),
        ("RANKLOOP_SERVING__EXPLORE_RATE", "1.5"),
        ("RANKLOOP_KAFKA__PARTITIONS", "0"),
        ("RANKLOOP_DEPLOYMENT", "Bad Name"),
        ("RANKLOOP_SERVING__NO_SUCH_SETTING", "1"),
        ("RANKLOOP_KAFKA_BOOTSTRAP", "broker:9092"),  # a name from before the groups: refused, not ignored
    ],
)
def test_values_that_cannot_work_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_two_deployments_share_no_name():
    a, b = Keys("shop"), Keys("help")

    def names(k):
        return {
            *k.topics(),
            k.stream_app,
            k.requests_table,
            k.train_lock,
            k.train_state,
            k.model_name,
            k.experiment,
            k.seen_events(1),
            k.embedding("1", "d"),
            k.results("i", "1", 10, "q"),
            k.candidates("i", 10, "q"),
        }

    assert not names(a) & names(b)
    assert all(n.startswith("shop") for n in names(a))


def test_clients_get_the_local_redis_password_and_displays_do_not(tmp_path):
    s = Settings(state_dir=tmp_path)
    assert s.redis_url == s.redis.address  # nothing started yet: no password
    s.redis_password_file.parent.mkdir(parents=True)
    s.redis_password_file.write_text("p@ss/word\n")
    assert s.redis_url == f"redis://:p%40ss%2Fword@127.0.0.1:{s.redis.local_port}/0"
    assert "word" not in str(s.effective())
    remote = Settings(state_dir=tmp_path, redis={"url": "redis://:other@cache:6379/1"})
    assert remote.redis_url == "redis://:other@cache:6379/1"  # a configured URL is used as given
    assert remote.redis.address == "redis://:***@cache:6379/1"  # ... and shown masked


def test_training_windows_are_checked_in_utc_and_may_wrap_past_midnight():
    from datetime import UTC, datetime

    from services.control.schedule import in_windows

    at = lambda hh, mm: datetime(2026, 11, 22, hh, mm, tzinfo=UTC).timestamp()  # noqa: E731
    assert in_windows([], at(12, 0))
    assert in_windows(["22:00-06:00"], at(23, 30)) and in_windows(["22:00-06:00"], at(5, 59))
    assert not in_windows(["22:00-06:00"], at(6, 0)) and not in_windows(["22:00-06:00"], at(12, 0))
    assert in_windows(["09:00-10:00", "13:00-14:00"], at(13, 15)) and not in_windows(["09:00-10:00"], at(10, 0))
    with pytest.raises(ValidationError):
        Settings(retrain={"windows": ["25:00-06:00"]})


def test_json_logs_are_one_object_per_line(capsys):
    import json
    import logging

    from services import logs

    logs.configure("json")
    logging.getLogger("rankloop.test").info("promoted version %s", "3")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert record["message"] == "promoted version 3" and record["levelname"] == "INFO" and "time" in record
    logs.configure("text")


def test_schedule_status_answers_with_redis_down_from_the_newest_mlflow_run(tmp_path):
    import mlflow
    from redis import Redis

    from services.control.schedule import schedule_status
    from services.storage.memory import MemoryLabelStore
    from services.storage.redis import RedisScheduleState
    from training.registry import MlflowRegistry

    s = Settings(state_dir=tmp_path)
    registry = MlflowRegistry.connect(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "art", "m", tmp_path, s.keys.experiment)
    with mlflow.start_run():
        mlflow.log_metric("labels", 1234)
        mlflow.set_tags({"outcome": "rejected", "gate_reason": "only 9 held-out queries (< 30)"})
    down = RedisScheduleState(Redis(port=1, socket_connect_timeout=0.5), s.keys)
    st = schedule_status(s, down, MemoryLabelStore([]), registry)
    assert st.training_now is None and "Redis unreachable" in st.problems[0]
    assert st.last_outcome == "rejected" and st.labels_at_last_run == 1234 and "held-out" in (st.last_message or "")


def test_schedule_status_answers_before_the_first_training(tmp_path):
    """Right after `rankloop up` (an MLflow store, no experiment yet) `schedule status` said "no MLflow
    experiment yet: run `rankloop up`" and exited 1."""
    from services.control.schedule import schedule_status
    from services.storage.memory import MemoryLabelStore, MemoryScheduleState
    from training.registry import MlflowRegistry

    s = Settings(state_dir=tmp_path)
    registry = MlflowRegistry.reader(f"sqlite:///{tmp_path}/mlflow.db", "m", tmp_path)
    st = schedule_status(s, MemoryScheduleState(), MemoryLabelStore([]), registry)
    assert st.paused is None and st.labels == 0 and st.last_outcome is None and not st.problems


def test_the_default_data_paths_are_found_from_any_directory(tmp_path, monkeypatch):
    """`rankloop propensity` read `../shared/data/...` relative to where it was run: from any other
    folder it said the click log was missing."""
    from tests.conftest import SHARED_DATA

    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.clicklog == (SHARED_DATA / "clicklogs" / "yandex-wscd-2012-sample").resolve()
    assert (s.clicklog / "impressions.tsv.gz").exists() and Path(s.dataset) == (SHARED_DATA / "scifact").resolve()
    monkeypatch.setenv("RANKLOOP_CLICKLOG", "my-logs")  # a path of the user's own stays as given
    assert Settings().clicklog == Path("my-logs")


def test_a_worker_reads_the_registry_of_its_own_settings_whatever_mlflow_was_pointed_at_before(tmp_path, monkeypatch):
    """`mlflow.set_tracking_uri` sets MLFLOW_TRACKING_URI in the process; a benchmark that measured one
    state dir and then started workers for another handed them the first one's registry."""
    from services.local.workers import worker_env

    s = Settings(state_dir=tmp_path / "second")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'first' / 'mlflow.db'}")
    env = worker_env(s)
    assert env["MLFLOW_TRACKING_URI"] == s.tracking_uri and "second" in env["MLFLOW_TRACKING_URI"]


def test_a_running_training_shows_its_stage_steps_loss_and_time_left(tmp_path, monkeypatch):
    """Training ran silent for minutes: `schedule status`, the status page and the demo had nothing
    to show but "training now: yes"."""
    import time as clock

    from services.control import scheduler
    from services.control.schedule import schedule_status
    from services.storage.memory import MemoryLabelStore, MemoryScheduleState
    from training.registry import MlflowRegistry

    s = Settings(state_dir=tmp_path)
    registry = MlflowRegistry.reader(f"sqlite:///{tmp_path}/mlflow.db", "m", tmp_path)
    state = MemoryScheduleState()
    now = [1000.0]
    monkeypatch.setattr(clock, "time", lambda: now[0])
    progress = scheduler.RecordedProgress(state)
    with state:  # the training lock is held while it runs
        progress("fine-tuning", 1, 100, "loss 0.903")  # the first report comes after a first step
        assert schedule_status(s, state, MemoryLabelStore([]), registry).progress.eta_s is None  # type: ignore[union-attr]
        now[0] += 30
        progress("fine-tuning", 25, 100, "loss 0.812")
        st = schedule_status(s, state, MemoryLabelStore([]), registry)
        assert st.progress is not None and (st.progress.task, st.progress.done, st.progress.total) == ("fine-tuning", 25, 100)
        assert st.progress.note == "loss 0.812" and st.progress.eta_s == 93.8  # 30 s for 24 steps, 75 to go
        assert st.progress.describe() == "fine-tuning 25/100, loss 0.812, about 94 s left"
        progress.clear()
        assert schedule_status(s, state, MemoryLabelStore([]), registry).progress is None
    progress("gating against the champion", 0, 1)
    assert schedule_status(s, state, MemoryLabelStore([]), registry).progress is None  # no lock: nothing running
