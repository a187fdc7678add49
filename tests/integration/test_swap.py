"""A promotion under load on a real `rankloop serve` process (real broker, Redis, MLflow on sqlite): no
request fails and the new version answers, with no restart. How slow the requests around a swap are
is measured by `rankloop bench serve` (its `swaps`), not asserted here."""

from __future__ import annotations

import httpx
import mlflow
import pytest

from services.config import KafkaSettings, MlflowSettings, RedisSettings, ServingSettings, Settings
from services.control.promotion import Promotions
from services.local import infra
from services.local.load import Load
from services.local.workers import spawn, worker_env
from services.storage import open_registry
from tests.conftest import free_port
from tests.integration.conftest import wait_for
from training import beir
from training.indexing import build_index
from training.ranking.encoder import load_encoder
from training.ranking.reranker import Mix, save_model_folder

pytestmark = pytest.mark.integration


def test_a_swap_under_load_fails_no_request_and_the_new_version_answers(tmp_path, small_dataset, monkeypatch):
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
        versions = []
        for alpha in (0.25, 0.75):  # two versions that mix the same encoder differently
            folder = save_model_folder(load_encoder(), tmp_path / f"model-{alpha}", Mix(alpha))
            with mlflow.start_run():
                mlflow.log_artifacts(str(folder), "model")
                versions.append(registry.register(mlflow.active_run().info.run_id))
        old, new = versions
        promotions = Promotions.connect(s, registry)
        promotions.promote(old, "test: the version serving before the swap", actor="test")
        spawn(s, "serve", worker_env(s), ("--workers", "1"))
        ready = lambda: httpx.get(f"{s.base_url}/health/ready", timeout=2).status_code == 200  # noqa: E731
        wait_for(lambda: _answers(ready), 180, 1, what="serve ready")
        wait_for(lambda: httpx.get(f"{s.base_url}/model", timeout=5).json()["model_version"] == old, 60, what="old version")

        with Load(s.base_url, list(ds.queries.values()), clients=4) as load:
            wait_for(lambda: len(load.log) >= 40, what="steady traffic")
            assert promotions.promote(new, "test: swap under load", actor="test").announced
            wait_for(lambda: any(row[3].startswith(f"{new}|") for row in load.log), what="the new version answering")
            after = len(load.log)
            wait_for(lambda: len(load.log) >= after + 40, what="traffic after the swap")

        assert [row for row in load.log if row[2] != 200] == []
        versions_seen = [row[3].split("|")[0] for row in sorted(load.log)]
        first_new = versions_seen.index(new)
        assert versions_seen[-1] == new and set(versions_seen[first_new:]) <= {old, new}  # in flight: the old one
    finally:
        infra.down(s)


def _answers(probe) -> bool:
    try:
        return bool(probe())
    except httpx.HTTPError:
        return False
