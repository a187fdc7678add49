from training import registry


def test_a_downloaded_model_is_never_rewritten_in_place(tmp_path):
    """Serving memory-maps the weights: a second download (a training fetching the same champion)
    must reuse the folder, not rewrite the file under the running process."""
    src = tmp_path / "run" / "model"
    src.mkdir(parents=True)
    (src / "rankloop.json").write_text('{"alpha": 0.5}')
    (src / "model.safetensors").write_bytes(b"weights")
    first = registry.download(src.as_uri(), tmp_path / "versions" / "1")
    inode = (first / "model.safetensors").stat().st_ino
    (src / "model.safetensors").write_bytes(b"other bytes")  # a rewrite would show
    second = registry.download(src.as_uri(), tmp_path / "versions" / "1")
    assert first == second == tmp_path / "versions" / "1" / "model"
    assert (second / "model.safetensors").stat().st_ino == inode
    assert (second / "model.safetensors").read_bytes() == b"weights"
    assert [p.name for p in (tmp_path / "versions" / "1").iterdir()] == ["model"]  # no temporary left behind


def test_pruning_keeps_only_the_named_versions(tmp_path):
    from training.registry import prune_folders

    for v in ("1", "2", "3", "4"):
        (tmp_path / v / "model").mkdir(parents=True)
    assert prune_folders(tmp_path, {"3", "4"}) == ["1", "2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
    assert prune_folders(tmp_path / "missing", {"1"}) == []


def test_mlflow_challenger_alias_awaits_approval_and_is_cleared_by_it(tmp_path):
    """On a real MLflow registry (sqlite): the `challenger` alias, `approve` and its audit tags, moved
    by the control plane's promotions (the one writer of MLflow aliases)."""
    import mlflow
    import pytest

    from schemas import InvalidState
    from services.control.promotion import MlflowAliases, Promotions
    from services.storage.memory import MemoryPublisher

    reg = registry.MlflowRegistry.connect(f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "art", "m", tmp_path / "cache")
    versions = []
    for _ in range(2):
        with mlflow.start_run() as run:
            mlflow.log_text("{}", "model/rankloop.json")
        versions.append(reg.register(run.info.run_id))
    publisher = MemoryPublisher()
    promotions = Promotions(reg, MlflowAliases(reg), publisher, "model-events")
    promotions.promote(versions[0], "first", actor="test")
    promotions.nominate(versions[1], "gate passed", actor="scheduler")
    assert reg.challenger() == versions[1]
    with pytest.raises(InvalidState):
        promotions.approve(versions[0], "wrong one", actor="cli:me")
    moved = promotions.approve(versions[1], "reviewed the card", actor="cli:me")
    assert moved.announced and moved.event.version == versions[1]
    assert reg.champion().version == versions[1] and reg.challenger() is None and reg.previous() == versions[0]
    tags = reg.client.get_model_version("m", versions[1]).tags
    assert tags["promoted_reason"] == "approved: reviewed the card" and tags["nominated_by"] == "scheduler"
    assert [e.split('"action":"')[1].split('"')[0] for e in publisher.on("model-events")] == ["promoted", "nominated", "promoted"]
    promotions.rollback("test", actor="cli:me")
    assert reg.champion().version == versions[0] and reg.previous() is None
