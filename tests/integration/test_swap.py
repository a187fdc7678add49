"""A promotion under load on a real `rankloop serve` process (real broker, Redis, MLflow on sqlite): no
request fails and the new version answers, with no restart. How slow the requests around a swap are
is measured by `rankloop bench serve` (its `swaps`), not asserted here."""

from __future__ import annotations

import threading

import httpx
import mlflow
import pytest

from services.config import KafkaSettings, MlflowSettings, RedisSettings, ServingSettings, Settings
from services.control.promotion import Promotions
from services.local import infra
from services.local.workers import spawn, worker_env
from services.storage import open_registry
from tests.conftest import free_port
from tests.integration.conftest import wait_for
from training import beir
from training.indexing import build_index
from training.ranking.encoder import load_encoder
from training.ranking.reranker import Mix, save_model_folder

pytestmark = pytest.mark.integration


class Load:
    """Clients ranking in a loop; every answer's status and model version, in order."""

    def __init__(self, base_url: str, queries: list[str], clients: int = 4):
        self.base_url, self.queries = base_url, queries
        self.answers: list[tuple[int, str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(clients)]

    def run(self, offset: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            i = offset
            while not self.stop.is_set():
                r = http.post("/rank", json={"query": self.queries[i % len(self.queries)], "k": 10})
                self.answers.append((r.status_code, r.json().get("model_version", r.text) if r.status_code == 200 else r.text))
                i += 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


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

        with Load(s.base_url, list(ds.queries.values())) as load:
            wait_for(lambda: len(load.answers) >= 40, what="steady traffic")
            assert promotions.promote(new, "test: swap under load", actor="test").announced
            wait_for(lambda: any(version == new for _, version in load.answers), what="the new version answering")
            after = len(load.answers)
            wait_for(lambda: len(load.answers) >= after + 40, what="traffic after the swap")

        assert [a for a in load.answers if a[0] != 200] == []
        versions_seen = [version for _, version in load.answers]
        first_new = versions_seen.index(new)
        assert versions_seen[-1] == new and set(versions_seen[first_new:]) <= {old, new}  # in flight: the old one
    finally:
        infra.down(s)


def _answers(probe) -> bool:
    try:
        return bool(probe())
    except httpx.HTTPError:
        return False
