"""Two stream workers, one (or both: the whole stream) killed with SIGKILL mid-run and restarted: every
accepted event ends in a label or a dead letter, and no (label_id, revision) is stored twice
(`rankloop bench stream`'s audit). In the first case a third of the requests' events are posted to a
serving worker's `POST /events`, the rest sent to Kafka as the SDK does."""

from __future__ import annotations

import pytest

from services.bench.stream import run_stream_bench
from services.config import KafkaSettings, RedisSettings, ServingSettings, Settings, StreamSettings
from tests.conftest import free_port


@pytest.mark.parametrize("kill_all", [False, True], ids=["one-worker", "whole-stream"])
def test_killing_stream_workers_loses_nothing_and_stores_nothing_twice(tmp_path, monkeypatch, kill_all):
    for name in ("MLFLOW_TRACKING_URI", "RANKLOOP_KAFKA__BOOTSTRAP", "RANKLOOP_REDIS__URL", "RANKLOOP_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    s = Settings(
        state_dir=tmp_path,
        kafka=KafkaSettings(local_port=free_port(), partitions=4),
        redis=RedisSettings(local_port=free_port()),
        stream=StreamSettings(join_window_s=10.0, metrics_port=0),
        serving=ServingSettings(port=free_port()),
    )
    http_share = 0.0 if kill_all else 0.3
    result = run_stream_bench(
        s, events=9000, workers=2, kill_one=not kill_all, kill_all=kill_all, out=tmp_path / "stream.json", http_share=http_share
    )
    assert result.killed_all if kill_all else result.killed_one
    # everything sent was accepted but what POST /events refused, and told the client so
    assert result.accepted + sum(result.http_rejected.values()) == result.events
    assert (result.http_accepted > 0) == (http_share > 0)
    assert set(result.http_rejected) == (set() if kill_all else {"duplicate_event", "invalid_event"})
    assert result.lost == 0 and result.duplicate_labels == 0
    assert result.label_contributions > result.events  # each click also labels the documents above it
    # planted: 0.5 % malformed and 0.5 % on unshown documents are dead letters, resent copies are counted
    assert result.dead_letters > 0 and result.duplicates_rejected > 0
