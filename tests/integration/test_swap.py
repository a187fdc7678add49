"""A promotion under load on a real `rankloop serve` process (real broker, Redis, MLflow on sqlite):
no request fails, none is slower than three times the steady p99, and the new version answers."""

from __future__ import annotations

import time

import httpx
import pytest

from services.bench.serve import Load, percentile, register_versions, served_version, wait_until
from services.config import KafkaSettings, MlflowSettings, RedisSettings, ServingSettings, Settings
from services.local import infra
from services.local.workers import spawn, worker_env
from services.storage import open_registry
from tests.conftest import free_port
from training import beir
from training.indexing import build_index
from training.ranking.first_stage import FirstStage

pytestmark = pytest.mark.integration
WINDOW_S = 8.0


def test_a_swap_under_load_has_no_request_slower_than_three_steady_p99s(tmp_path, small_dataset, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = Settings(
        state_dir=tmp_path,
        dataset=str(small_dataset),
        torch_threads=1,
        kafka=KafkaSettings(local_port=free_port()),
        redis=RedisSettings(local_port=free_port()),
        mlflow=MlflowSettings(),
        serving=ServingSettings(port=free_port(), champion_poll_s=1),
    )
    infra.up(s)
    try:
        ds = beir.load(small_dataset)
        build_index(ds, tmp_path)
        registry = open_registry(s)
        queries = list(ds.queries.values())
        old, new = register_versions(s, registry, FirstStage.current(tmp_path), ds, memory_size=1000)
        registry.promote(old, "test: the version serving before the swap")
        spawn(s, "serve", worker_env(s), ("--workers", "1"))
        assert wait_until(lambda: httpx.get(f"{s.base_url}/health/ready", timeout=2).status_code == 200, 180, 1) is not None
        assert wait_until(lambda: served_version(s.base_url) == old, 60) is not None

        with Load(s.base_url, queries, clients=4) as load:
            time.sleep(WINDOW_S)
            moved = time.time()
            registry.promote(new, "test: swap under load")
            time.sleep(WINDOW_S)
        steady = [ms for _, ms, _, _ in load.between(moved - WINDOW_S, moved)]
        after = load.between(moved, moved + WINDOW_S)

        assert [row for row in load.log if row[2] != 200] == []
        assert any(version.startswith(f"{new}|") for *_, version in after), "the new version never answered"
        p99 = percentile(steady, 0.99)
        slowest = max(ms for _, ms, _, _ in after)
        assert slowest <= 3 * p99, f"slowest request after the swap {slowest:.0f} ms, steady p99 {p99:.0f} ms"
    finally:
        infra.down(s)
