"""MLflow: runs, registered versions and the `champion` / `previous` aliases.

The registry is the single source of truth for which model serves; serving workers watch the
`champion` alias (and model events for speed).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from schemas import ModelEvent

CHAMPION, PREVIOUS = "champion", "previous"
EXPERIMENT = "rankloop"


@dataclass
class Champion:
    version: str
    source: str


def connect(tracking_uri: str, artifact_dir: Path | None = None) -> MlflowClient:
    """Points MLflow at the tracking URI and makes sure the experiment exists."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            location = artifact_dir.resolve().as_uri() if artifact_dir else None
            client.create_experiment(EXPERIMENT, artifact_location=location)
    except MlflowException as e:
        raise ConnectionError(
            f"MLflow at {tracking_uri} is not usable ({e}); start the local one with `rankloop up` "
            "or set MLFLOW_TRACKING_URI to a running server"
        ) from e
    mlflow.set_experiment(EXPERIMENT)
    return client


def champion(client: MlflowClient, name: str) -> Champion | None:
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return Champion(str(mv.version), mv.source)


def download(source: str, dst: Path) -> Path:
    """The model folder of `source`, as `dst/model`. Downloaded once, into a temporary folder renamed
    into place: a loaded model memory-maps its safetensors, so a file rewritten under a running
    process (serving, while a training downloads the same champion) would kill it with SIGBUS."""
    target = dst / "model"
    if (target / "rankloop.json").exists():
        return target
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst) as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp))
        try:
            folder.rename(target)
        except OSError:
            if not (target / "rankloop.json").exists():  # not a concurrent download that won the race
                raise
    return target


def register(client: MlflowClient, name: str, run_id: str, artifact_path: str = "model") -> str:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="rankloop reranker (bi-encoder + first-stage mix)")
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    mv = client.create_model_version(name, source=source, run_id=run_id)
    return str(mv.version)


def promote(client: MlflowClient, name: str, version: str, reason: str) -> ModelEvent:
    current = champion(client, name)
    if current and current.version == str(version):
        raise ValueError(f"version {version} is already the champion")
    client.get_model_version(name, str(version))  # raises if unknown
    if current:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "promotion_reason", reason)
    return ModelEvent(action="promoted", model_name=name, version=str(version),
                      previous_version=current.version if current else None, reason=reason)


def rollback(client: MlflowClient, name: str, reason: str = "manual rollback") -> ModelEvent:
    current = champion(client, name)
    try:
        prev = client.get_model_version_by_alias(name, PREVIOUS)
    except MlflowException:
        raise ValueError(f"model {name!r} has no `previous` version to roll back to") from None
    client.set_registered_model_alias(name, CHAMPION, str(prev.version))
    client.delete_registered_model_alias(name, PREVIOUS)
    if current:
        client.set_model_version_tag(name, current.version, "rolled_back", reason)
    return ModelEvent(action="rolled_back", model_name=name, version=str(prev.version),
                      previous_version=current.version if current else None, reason=reason)


def versions(client: MlflowClient, name: str) -> list[dict]:
    try:
        found = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    aliases = {}
    try:
        for alias, v in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(v), []).append(alias)
    except MlflowException:
        pass
    return sorted(
        ({"version": str(m.version), "run_id": m.run_id, "source": m.source, "aliases": aliases.get(str(m.version), [])} for m in found),
        key=lambda r: int(r["version"]),
    )
