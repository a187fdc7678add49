"""The model registry as training and serving see it: registered versions, their tags, which version
holds the `champion` / `previous` / `challenger` alias, and a version as a local model folder.

It is the single source of truth for which model serves; serving workers watch the `champion`
alias (and model events for speed). Reading aliases is here; moving them is the control plane's alone
(`services.control.promotion`). `MlflowRegistry` is the real one; `MemoryRegistry` serves unit tests.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from schemas import DependencyUnavailable, NotFound
from training.ranking.model_files import META_FILE

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
EXPERIMENT = "rankloop"
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # MLflow 3 opens such an experiment in its model-training view, not the GenAI one


@dataclass(frozen=True)
class ModelVersion:
    version: str
    source: str
    run_id: str | None = None
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict, compare=False)  # the audit trail: promoted_by, gate, ...


class ModelRegistry(Protocol):
    name: str

    def champion(self) -> ModelVersion | None: ...
    def previous(self) -> str | None:
        """The version a rollback would bring back."""

    def fetch(self, version: ModelVersion) -> Path:
        """A local folder holding the version's model files."""

    def challenger(self) -> str | None:
        """The version that passed the gate and waits: for interleaving, or for a person's approval."""

    def get(self, version: str) -> ModelVersion:
        """One version, with its tags."""

    def versions(self) -> list[ModelVersion]: ...
    def prune(self, keep: set[str]) -> list[str]:
        """Frees local copies of versions that are neither kept nor served."""

    def tag(self, version: str, key: str, value: str) -> None: ...


def connect(tracking_uri: str, artifact_dir: Path | None = None, experiment: str = EXPERIMENT) -> MlflowClient:
    """Points MLflow at the tracking URI and makes sure the experiment exists."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            location = artifact_dir.resolve().as_uri() if artifact_dir else None
            client.create_experiment(experiment, artifact_location=location, tags={EXPERIMENT_KIND: MODEL_TRAINING})
        elif EXPERIMENT_KIND not in found.tags:  # made before this tag was set
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    except MlflowException as e:
        raise DependencyUnavailable(
            f"MLflow at {tracking_uri} is not usable ({e}); start the local one with `rankloop up` "
            "or set MLFLOW_TRACKING_URI to a running server"
        ) from e
    mlflow.set_experiment(experiment)
    return client


def download(source: str, dst: Path) -> Path:
    """The model folder of `source`, as `dst/model`. Downloaded once, into a temporary folder renamed
    into place: a loaded model memory-maps its safetensors, so a file rewritten under a running
    process (serving, while a training downloads the same champion) would kill it with SIGBUS."""
    target = dst / "model"
    if (target / META_FILE).exists():
        return target
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst) as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp))
        try:
            folder.rename(target)
        except OSError:
            if not (target / META_FILE).exists():  # not a concurrent download that won the race
                raise
    return target


def prune_folders(cache_dir: Path, keep: set[str]) -> list[str]:
    """Removes every version folder under `cache_dir` whose name is not in `keep`; returns their names."""
    removed = []
    for folder in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []:
        if folder.is_dir() and folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


class MlflowRegistry:
    """One registered model in MLflow; versions are downloaded once under `cache_dir/<version>`."""

    def __init__(self, client: MlflowClient, name: str, cache_dir: Path):
        self.client, self.name, self.cache_dir = client, name, Path(cache_dir)

    @classmethod
    def connect(
        cls, tracking_uri: str, artifact_dir: Path, name: str, cache_dir: Path, experiment: str = EXPERIMENT
    ) -> MlflowRegistry:
        return cls(connect(tracking_uri, artifact_dir, experiment), name, cache_dir / name)

    @classmethod
    def reader(cls, tracking_uri: str, name: str, cache_dir: Path) -> MlflowRegistry:
        """For a serving worker: contacts nothing now, so a worker starts while MLflow is away."""
        os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
        mlflow.set_tracking_uri(tracking_uri)
        return cls(MlflowClient(tracking_uri), name, cache_dir / name)

    def previous(self) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(self.name, PREVIOUS).version)
        except MlflowException:
            return None

    def challenger(self) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(self.name, CHALLENGER).version)
        except MlflowException:
            return None

    def champion(self) -> ModelVersion | None:
        try:
            mv = self.client.get_model_version_by_alias(self.name, CHAMPION)
        except MlflowException:
            return None
        return ModelVersion(str(mv.version), str(mv.source), mv.run_id, tuple(mv.aliases or ()))

    def get(self, version: str) -> ModelVersion:
        try:
            mv = self.client.get_model_version(self.name, str(version))
        except MlflowException:
            raise NotFound(f"model {self.name!r} has no version {version}") from None
        return ModelVersion(str(mv.version), str(mv.source), mv.run_id, tuple(mv.aliases or ()), dict(mv.tags or {}))

    def fetch(self, version: ModelVersion) -> Path:
        return download(version.source, self.cache_dir / version.version)

    def prune(self, keep: set[str]) -> list[str]:
        """Deletes downloaded versions other than `keep` (champion, previous, what is served). A
        process still reading a deleted version's memory-mapped files keeps them until it lets go."""
        return prune_folders(self.cache_dir, keep)

    def register(self, run_id: str, artifact_path: str = "model", model_id: str | None = None) -> str:
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name, description="rankloop reranker (bi-encoder + first-stage mix)")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_path}"
        return str(self.client.create_model_version(self.name, source=source, run_id=run_id, model_id=model_id).version)

    def tag(self, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(self.name, str(version), key, value)

    def versions(self) -> list[ModelVersion]:
        try:
            found = self.client.search_model_versions(f"name='{self.name}'")
            aliases: dict[str, list[str]] = {}
            for alias, v in self.client.get_registered_model(self.name).aliases.items():
                aliases.setdefault(str(v), []).append(alias)
        except MlflowException:
            return []
        out = [
            ModelVersion(str(m.version), str(m.source), m.run_id, tuple(aliases.get(str(m.version), [])), dict(m.tags or {}))
            for m in found
        ]
        return sorted(out, key=lambda v: int(v.version))


@dataclass
class MemoryRegistry:
    """Versions are local folders; aliases live in a dict. For unit tests of serving and training."""

    name: str = "rankloop-reranker"
    folders: dict[str, Path] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, folder: Path) -> str:
        version = str(len(self.folders) + 1)
        self.folders[version] = Path(folder)
        return version

    def _version(self, version: str) -> ModelVersion:
        if version not in self.folders:
            raise NotFound(f"model {self.name!r} has no version {version}")
        held = tuple(a for a, v in self.aliases.items() if v == version)
        return ModelVersion(version, str(self.folders[version]), None, held, dict(self.tags.get(version, {})))

    def champion(self) -> ModelVersion | None:
        return self._version(self.aliases[CHAMPION]) if CHAMPION in self.aliases else None

    def previous(self) -> str | None:
        return self.aliases.get(PREVIOUS)

    def challenger(self) -> str | None:
        return self.aliases.get(CHALLENGER)

    def get(self, version: str) -> ModelVersion:
        return self._version(version)

    def fetch(self, version: ModelVersion) -> Path:
        return Path(version.source)

    def versions(self) -> list[ModelVersion]:
        return [self._version(v) for v in sorted(self.folders, key=int)]

    def prune(self, keep: set[str]) -> list[str]:
        return []  # its folders belong to the caller

    def set_alias(self, alias: str, version: str) -> None:
        """What `services.control.promotion` moves (the MLflow registry's aliases, in memory)."""
        self._version(version)
        self.aliases[alias] = version

    def delete_alias(self, alias: str) -> None:
        self.aliases.pop(alias, None)

    def tag(self, version: str, key: str, value: str) -> None:
        self.tags.setdefault(version, {})[key] = value
