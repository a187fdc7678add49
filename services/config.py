"""The one configuration object, in groups. Sources, strongest first: arguments, environment
(`RANKLOOP_*`, groups nested with `__`, e.g. `RANKLOOP_KAFKA__BOOTSTRAP`), `MLFLOW_TRACKING_URI`, then a
TOML or JSON file named by `RANKLOOP_CONFIG`. `rankloop config` prints the effective values;
docs/configuration.md lists every name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from schemas.documents import FieldType
from services.keys import DEPLOYMENT_PATTERN, Keys
from training.config import AnnSettings, GateConfig, InterleaveConfig, TrainConfig
from training.labels.rules import LabelRules


class Group(BaseModel):
    """A settings group: an unknown name (a typo) is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


CHECKOUT = Path(__file__).resolve().parents[1]
"""The project's folder: the default data paths (`../shared/data/...`) are relative to it."""


def found_from_anywhere(path: Path) -> Path:
    """A relative data path as given when it exists from here, else from the project's folder (so
    `rankloop propensity` or `index` work from any directory), else as given (the error names it)."""
    if path.is_absolute() or path.exists() or not (CHECKOUT / path).exists():
        return path
    return (CHECKOUT / path).resolve()


WINDOW_PATTERN = r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$"  # HH:MM-HH:MM, may wrap past midnight
PROCESS_VARIABLES = {"RANKLOOP_CONFIG", "RANKLOOP_ONLINE"}  # read by the CLI, not settings


class KafkaSettings(Group):
    bootstrap: str | None = Field(None, description="host:port of a running cluster; unset: the embedded local broker")
    local_port: int = Field(19092, ge=1, le=65535, description="port of the embedded broker")
    partitions: int = Field(2, ge=1, description="partitions of every topic (stream workers scale up to it)")

    @property
    def local(self) -> bool:
        return not self.bootstrap

    @property
    def address(self) -> str:
        return self.bootstrap or f"127.0.0.1:{self.local_port}"


class RedisSettings(Group):
    url: str | None = Field(None, description="redis://host:port/db; unset: the embedded local redis-server")
    local_port: int = Field(16379, ge=1, le=65535)

    @property
    def local(self) -> bool:
        return not self.url

    @property
    def address(self) -> str:
        """The URL for display: a password in it is masked (clients use `Settings.redis_url`)."""
        if not self.url:
            return f"redis://127.0.0.1:{self.local_port}/0"
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


class MlflowSettings(Group):
    tracking_uri: str | None = Field(None, description="an MLflow server or database URI; unset: sqlite under the state dir")

    @property
    def local(self) -> bool:
        return not self.tracking_uri


class ServingSettings(Group):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    candidates_k: int = Field(100, ge=1, description="first-stage candidates per query")
    rerank_depth: int = Field(50, ge=1, description="candidates the reranker reorders; the rest keep first-stage order")
    max_batch: int = Field(1000, ge=1, description="events per POST /events")
    cors_origins: list[str] = Field(
        [], description='web origins whose pages may call the API from a browser, e.g. ["https://app.example.com"]'
    )
    max_body_bytes: int = Field(
        4_000_000, ge=1024, description="largest request body; a bigger one is refused (413) before it is read whole"
    )
    cache_ttl_s: int = Field(3600, ge=1)
    champion_poll_s: float = Field(10.0, gt=0, description="how often the registry's champion alias is checked")
    swap_grace_s: float = Field(
        60.0, gt=0, description="not ready once the served version has differed from the registry's champion this long"
    )
    max_load_failures: int = Field(
        3,
        ge=1,
        description="failed loads of the champion, summed over the serving workers' reports, after which the control "
        "process tags it broken and rolls it back",
    )
    explore_rate: float = Field(
        0.1, ge=0.0, le=1.0, description="share of requests shown with a shuffled top (docs/position-bias.md)"
    )
    explore_depth: int = Field(10, ge=2, description="how many top items an explored request shuffles")
    explore_seed: int | None = Field(
        None, description="benchmarks: exploration follows from this seed and the request (same traffic, same shuffles)"
    )
    impression_buffer: int = Field(
        100_000, ge=1, description="impressions held while the broker is away; more are dropped (counted)"
    )


class CorpusSettings(Group):
    fields: dict[str, FieldType] = Field(
        {},
        description='filterable document fields and their types ({"lang": "keyword", "year": "number"}); declared in '
        "the index at start, as `rankloop index --field` does",
    )
    refresh_s: float = Field(0.5, gt=0, description="how often a serving worker catches up with document changes")
    max_batch: int = Field(1000, ge=1, description="documents per PUT /documents")
    ann_from: int = Field(
        50_000, ge=0, description="documents from which the vector snapshot is approximate (faiss IVF) instead of exact"
    )
    ann_recall: float = Field(
        0.97, gt=0.0, le=1.0, description="recall@100 against exact search the IVF snapshot must reach (nprobe is chosen for it)"
    )
    snapshot_after: int = Field(
        20_000,
        ge=1,
        description="changed documents after which the indexer rewrites the vector snapshot "
        "(each worker holds them in memory until then)",
    )

    def ann(self) -> AnnSettings:
        return AnnSettings(self.ann_from, self.ann_recall, self.snapshot_after)


class StreamSettings(Group):
    join_window_s: float = Field(1800.0, gt=0, description="how long an interaction may follow its impression")
    session_timeout_s: float = Field(
        6.0, gt=0, description="a worker silent this long is replaced in the consumer group (short for a local broker)"
    )
    join_batch: int = Field(
        2000, ge=1, description="most messages joined in one step (each changed request is stored once per step)"
    )
    join_flush_s: float = Field(0.2, gt=0, description="longest wait for a join step to fill")
    burst_limit: int = Field(
        10, ge=0, description="positive events one identity may send for one (query, doc) per burst window; 0: no limit"
    )
    burst_window_s: float = Field(600.0, gt=0, description="the click-burst window")
    anomaly_window_s: float = Field(3600.0, gt=0, description="the window a (query, doc)'s positive rate is watched over")
    anomaly_ratio: float = Field(
        5.0, gt=1, description="positives over what the positions it was shown at predict that make a (query, doc) anomalous"
    )
    anomaly_min_positives: int = Field(10, ge=1, description="positives in the window before a (query, doc) can be held")
    anomaly_min_identities: int = Field(
        5, ge=0, description="distinct unsigned identities among them before it is held for review; 0: no holds"
    )
    metrics_port: int = Field(9108, ge=0, le=65535, description="Prometheus metrics of a stream worker (on metrics_host); 0: off")
    rules: LabelRules = LabelRules()


class RetrainSettings(Group):
    min_new_labels: int = Field(2000, ge=1, description="retrain once this many new label revisions were stored ...")
    interval_s: float = Field(3600.0, gt=0, description="... or this long passed with at least one")
    check_s: float = Field(15.0, gt=0, description="how often the scheduler checks")
    backoff_s: float = Field(120.0, ge=0, description="first wait after a failed run (doubles per failure)")
    windows: list[Annotated[str, Field(pattern=WINDOW_PATTERN)]] = Field(
        [], description='UTC times trainings may start, e.g. ["22:00-06:00"]; empty: any time'
    )
    auto_promote: bool = Field(
        True,
        description="promote a challenger that passes the gate (off: it waits as `challenger` for `rankloop approve N`)",
    )
    compact_after_files: int = Field(50, ge=1, description="compact the label store after a training once it has this many files")
    online_metrics_s: float = Field(
        300.0, gt=0, description="how often the online metrics per version (CTR@10, MRR of clicks, ...) go onto MLflow"
    )


class ControlSettings(Group):
    """The control process (`rankloop schedule`): its admin API, status page and /metrics."""

    host: str = Field("127.0.0.1", description="where the admin API listens; 0.0.0.0 inside a container")
    port: int = Field(8001, ge=1, le=65535, description="admin API, /status, /schedule and /metrics of the control process")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class AuthSettings(Group):
    keys_file: Path | None = Field(None, description="API key file (hashes only); unset: api_keys.json in the state dir")
    required: bool = Field(False, description="refuse requests without a key even while the key file has none")
    metrics_public: bool = Field(True, description="/metrics without a key (a scraper inside the network); off: admin scope")
    rank_per_s: float = Field(1000.0, ge=0, description="POST /rank per second per API key; 0: no limit")
    events_per_s: float = Field(100.0, ge=0, description="POST /events (batches) per second per API key; 0: no limit")
    burst_s: float = Field(2.0, gt=0, description="a bucket holds this many seconds of its rate: short bursts pass")
    user_secret_file: Path | None = Field(
        None, description="the user-signing secret applications sign user ids with; unset: user_secret in the state dir"
    )
    new_identities_per_min: float = Field(
        60.0,
        ge=0,
        description="unsigned user/session ids /rank sees for the first time, per minute per API key (per network "
        "without keys); over it: 429. Signed users are not limited; 0: no limit",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses of reverse proxies whose X-Forwarded-For names the client (else the socket's peer is)",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RANKLOOP_", env_nested_delimiter="__", extra="forbid", validate_assignment=True)

    deployment: str = Field(
        "rankloop",
        pattern=DEPLOYMENT_PATTERN,
        description="prefix of every topic, Redis key and model name: deployments can share infrastructure",
    )
    state_dir: Path = Field(Path(".rankloop"), description="index, label store, local infrastructure, downloaded models")
    dataset: str = Field("../shared/data/scifact", description="BEIR folder indexed and simulated by default")
    labels_url: str | None = Field(
        None,
        description="the label store, a Delta Lake table: a folder or s3://bucket/prefix (credentials and endpoint from "
        "the AWS_* variables); unset: <state_dir>/labels/<deployment>",
    )
    clicklog: Path = Field(
        Path("../shared/data/clicklogs/yandex-wscd-2012-sample"),
        description="click-log folder (stats.json, impressions.tsv.gz) for position bias",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch threads per process; unset: one per core")
    log_format: Literal["text", "json"] = Field("text", description="process logs: text lines, or one JSON object per line")
    metrics_host: str = Field(
        "127.0.0.1", description="where a stream worker serves /metrics; 0.0.0.0 for a scraper in a container"
    )
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    mlflow: MlflowSettings = MlflowSettings()
    serving: ServingSettings = ServingSettings()
    corpus: CorpusSettings = CorpusSettings()
    control: ControlSettings = ControlSettings()
    auth: AuthSettings = AuthSettings()
    stream: StreamSettings = StreamSettings()
    retrain: RetrainSettings = RetrainSettings()
    train: TrainConfig = TrainConfig()
    gate: GateConfig = GateConfig()
    interleave: InterleaveConfig = InterleaveConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, _MlflowEnvSource(settings_cls)]
        path = os.environ.get("RANKLOOP_CONFIG")
        if path and path.endswith(".toml"):
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        elif path and path.endswith(".json"):
            sources.append(JsonConfigSettingsSource(settings_cls, json_file=path))
        return tuple(sources)

    @model_validator(mode="after")
    def _data_paths_from_anywhere(self) -> Settings:
        object.__setattr__(self, "dataset", str(found_from_anywhere(Path(self.dataset))))
        object.__setattr__(self, "clicklog", found_from_anywhere(self.clicklog))
        return self

    @model_validator(mode="after")
    def _no_unknown_environment_names(self) -> Settings:
        """A RANKLOOP_* variable that names no setting (a typo, or a name from before the groups, such as
        RANKLOOP_KAFKA_BOOTSTRAP) is refused instead of silently leaving the default in place."""
        known = {f"RANKLOOP_{name.upper()}" for name in type(self).model_fields} | PROCESS_VARIABLES
        unknown = sorted(k for k in os.environ if k.startswith("RANKLOOP_") and k.split("__")[0] not in known)
        if unknown:
            raise ValueError(
                f"unknown setting {', '.join(unknown)}: see `rankloop config` and docs/configuration.md "
                "(groups are nested with __, e.g. RANKLOOP_KAFKA__BOOTSTRAP)"
            )
        return self

    @property
    def keys(self) -> Keys:
        return Keys(self.deployment)

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"

    @property
    def label_store_url(self) -> str:
        return self.labels_url or str(self.state_dir / "labels" / self.deployment)

    @property
    def artifact_dir(self) -> Path:
        return self.state_dir / "mlartifacts"

    @property
    def keys_file(self) -> Path:
        return self.auth.keys_file or self.state_dir / "api_keys.json"

    @property
    def user_secret_file(self) -> Path:
        return self.auth.user_secret_file or self.state_dir / "user_secret"

    @property
    def versions_dir(self) -> Path:
        """Where model versions are downloaded, one folder per registered model and version."""
        return self.state_dir / "versions"

    @property
    def redis_password_file(self) -> Path:
        """The local redis-server's password, made by `rankloop up` (owner-only file)."""
        return self.state_dir / "redis" / "password"

    @property
    def redis_url(self) -> str:
        """What clients connect to: `redis.url`, or the local redis-server with its password.
        (`redis.address` is the same without the password, for display.)"""
        if self.redis.local and self.redis_password_file.exists():
            password = quote(self.redis_password_file.read_text().strip(), safe="")
            return f"redis://:{password}@127.0.0.1:{self.redis.local_port}/0"
        return self.redis.url or self.redis.address

    @property
    def base_url(self) -> str:
        return f"http://{self.serving.host}:{self.serving.port}"

    def write_json(self, path: Path) -> Path:
        """These exact settings as a JSON file another process reads through RANKLOOP_CONFIG (`serve
        --workers N` hands them to each worker process so)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_copy(update={"state_dir": self.state_dir.resolve()}).model_dump_json(indent=2))
        return path.resolve()

    def effective(self) -> dict[str, Any]:
        """What the local defaults resolve to."""
        return {
            "kafka": self.kafka.address,
            "redis": self.redis.address,
            "mlflow": self.tracking_uri,
            "label_store": self.label_store_url,
            "model_name": self.keys.model_name,
            "topics": self.keys.topics(),
        }


class _MlflowEnvSource(PydanticBaseSettingsSource):
    """MLflow's own variable, so a shell set up for MLflow needs nothing more."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        return {"mlflow": {"tracking_uri": uri}} if uri else {}
