"""The deployment's model registry, connected from the settings. Loads MLflow, never a model, so the
admin commands (models, promote, rollback) answer in seconds."""

from __future__ import annotations

from services.config import Settings
from training.registry import MlflowRegistry


def connect_registry(s: Settings) -> MlflowRegistry:
    return MlflowRegistry.connect(s.tracking_uri, s.artifact_dir, s.keys.model_name, s.versions_dir, s.keys.experiment)
