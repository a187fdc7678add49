"""A dependency that is down gives an error naming it and saying how to start it."""

import pytest

from schemas import DependencyUnavailable
from services.config import KafkaSettings, MlflowSettings, RedisSettings, Settings
from services.storage.health import require
from tests.conftest import free_port
from training import registry


def test_unreachable_broker_and_redis_are_named_with_how_to_start_them(tmp_path):
    s = Settings(state_dir=tmp_path, kafka=KafkaSettings(local_port=free_port()), redis=RedisSettings(local_port=free_port()))
    with pytest.raises(DependencyUnavailable, match=r"kafka at 127\.0\.0\.1:\d+ is not reachable: start it with `rankloop up`"):
        require(s, "kafka", "redis")
    with pytest.raises(DependencyUnavailable, match=r"redis at redis://127\.0\.0\.1:\d+/0 is not reachable.*RANKLOOP_REDIS__URL"):
        require(s, "redis")


def test_unreachable_mlflow_server_is_named(monkeypatch):
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: let monkeypatch restore it afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///unused.db")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(DependencyUnavailable, match=r"MLflow at http://127\.0\.0\.1:\d+ is not usable.*MLFLOW_TRACKING_URI"):
        registry.connect(f"http://127.0.0.1:{free_port()}")


def test_unreachable_mlflow_server_fails_the_status_check(tmp_path):
    s = Settings(state_dir=tmp_path, mlflow=MlflowSettings(tracking_uri=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(DependencyUnavailable, match=r"mlflow at http://127\.0\.0\.1:\d+ is not reachable.*MLFLOW_TRACKING_URI"):
        require(s, "mlflow")
    require(Settings(state_dir=tmp_path), "mlflow")  # the local sqlite store is usable once its folder exists
