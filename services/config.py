"""The one configuration object. Env vars `RANKLOOP_*` (plus `MLFLOW_TRACKING_URI`), or a TOML/.env
file named by `RANKLOOP_CONFIG`; `rankloop config` prints the effective values."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from training.labels import LabelRules
from training.train import TrainConfig

DEFAULT_DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RANKLOOP_", env_nested_delimiter="__", extra="ignore")

    state_dir: Path = Path(".rankloop")
    dataset: str = str(DEFAULT_DATASET)

    # Infrastructure: when set, used as is and nothing local is started for it.
    kafka_bootstrap: str | None = None
    redis_url: str | None = None
    mlflow_tracking_uri: str | None = Field(None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "RANKLOOP_MLFLOW_TRACKING_URI"))
    local_kafka_port: int = 19092
    local_redis_port: int = 16379
    partitions: int = 2

    topic_impressions: str = "rankloop.impressions"
    topic_interactions: str = "rankloop.interactions"
    topic_labels: str = "rankloop.labels"
    topic_dead_letters: str = "rankloop.dead-letters"
    topic_model_events: str = "rankloop.model-events"
    topic_ticks: str = "rankloop.stream-ticks"

    # Serving
    host: str = "127.0.0.1"
    port: int = 8000
    candidates_k: int = 100
    max_batch: int = 1000
    cache_ttl_s: int = 3600
    champion_poll_s: float = 10.0
    model_name: str = "rankloop-reranker"
    # Share of requests whose top `explore_depth` are shown shuffled: the randomisation that makes
    # the examination curve identifiable from our own logs (docs/position-bias.md).
    explore_rate: float = Field(0.1, ge=0.0, le=1.0)
    explore_depth: int = Field(10, ge=2)

    # Stream
    join_window_s: float = 1800.0
    label_flush_s: float = 1.0
    label_rules: LabelRules = LabelRules()

    # Training and scheduling
    train: TrainConfig = TrainConfig()
    retrain_min_new_labels: int = 2000
    retrain_interval_s: float = 3600.0
    retrain_check_s: float = 15.0
    retrain_backoff_s: float = 120.0

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("RANKLOOP_CONFIG")
        if path and path.endswith(".toml"):
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        elif path:
            sources.append(dotenv_settings.__class__(settings_cls, env_file=path, env_prefix="RANKLOOP_"))
        return tuple(sources)

    @property
    def local_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def local_redis(self) -> bool:
        return not self.redis_url

    @property
    def local_mlflow(self) -> bool:
        return not self.mlflow_tracking_uri

    @cached_property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.local_kafka_port}"

    @cached_property
    def redis(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.local_redis_port}/0"

    @cached_property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"

    @property
    def label_dir(self) -> Path:
        return self.state_dir / "labels"

    @property
    def artifact_dir(self) -> Path:
        return self.state_dir / "mlartifacts"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def topics(self) -> list[str]:
        return [self.topic_impressions, self.topic_interactions, self.topic_labels,
                self.topic_dead_letters, self.topic_model_events, self.topic_ticks]


def get_settings() -> Settings:
    return Settings()
