"""A promotion whose cost does not grow with the corpus: on 30,000 documents (embedding them all again,
as a tuned document tower would, takes this machine about 8 minutes at ~60 documents a second), a
version with a frozen document tower is served by a real `rankloop serve` within seconds of the
alias moving. Latency and memory against corpus size are measured by `rankloop bench scale`."""

from __future__ import annotations

import time

import httpx
import pytest

from services.bench.scale import Synthetic, register_frozen_version
from services.config import CorpusSettings, KafkaSettings, MlflowSettings, RedisSettings, ServingSettings, Settings
from services.control.promotion import Promotions
from services.local import infra
from services.local.workers import spawn, worker_env
from services.storage import open_registry
from tests.conftest import free_port
from tests.integration.conftest import wait_for
from training.corpus.dense import current_snapshot
from training.indexing import load_documents

pytestmark = pytest.mark.integration
DOCUMENTS = 30_000


def test_a_frozen_tower_version_is_served_within_seconds_on_a_corpus_that_would_take_minutes_to_embed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = Settings(
        state_dir=tmp_path,
        torch_threads=1,
        kafka=KafkaSettings(local_port=free_port()),
        redis=RedisSettings(local_port=free_port()),
        mlflow=MlflowSettings(),
        serving=ServingSettings(port=free_port(), champion_poll_s=0.5),
        corpus=CorpusSettings(ann_from=20_000),
    )
    corpus = Synthetic(DOCUMENTS)
    report = load_documents(tmp_path, corpus.documents(), ann=s.corpus.ann())
    snapshot = current_snapshot(tmp_path / "index")
    assert report.stored == DOCUMENTS and snapshot is not None and snapshot.kind == "ivf"
    infra.up(s)
    try:
        spawn(s, "serve", worker_env(s), ("--workers", "1"))
        wait_for(lambda: _ok(f"{s.base_url}/health/ready"), 180, 1, what="serve ready")
        query = corpus.query_texts(1, seed=0)[0]
        assert httpx.post(f"{s.base_url}/rank", json={"query": query, "k": 10}, timeout=30).json()["items"]
        version = register_frozen_version(s)
        moved = time.time()
        Promotions.connect(s, open_registry(s)).promote(version, "test: frozen tower at scale", actor="test")
        wait_for(lambda: _served(s.base_url) == version, 60, 0.1, what="the new version served")
        assert time.time() - moved < 30  # embedding the corpus again would take minutes
        answer = httpx.post(f"{s.base_url}/rank", json={"query": query, "k": 10}, timeout=30).json()
        assert answer["model_version"] == version and len(answer["items"]) == 10
    finally:
        infra.down(s)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _served(base_url: str) -> str | None:
    try:
        return str(httpx.get(f"{base_url}/model", timeout=5).json()["model_version"])
    except httpx.HTTPError:
        return None
