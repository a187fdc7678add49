"""Every name rankloop uses on shared infrastructure, derived from one deployment prefix: topics,
consumer groups, Redis keys and lock names, the MLflow experiment and model name. Two deployments
with different prefixes share a Kafka, a Redis and an MLflow without touching each other's data.
Imports nothing, so clients can use it."""

from __future__ import annotations

from dataclasses import dataclass

DEPLOYMENT_PATTERN = r"^[a-z][a-z0-9-]{0,39}$"


@dataclass(frozen=True)
class Keys:
    deployment: str = "rankloop"

    # Kafka topics (created with explicit partition counts) and the stream's names
    @property
    def impressions(self) -> str:
        return f"{self.deployment}.impressions"

    @property
    def interactions(self) -> str:
        return f"{self.deployment}.interactions"

    @property
    def dead_letters(self) -> str:
        return f"{self.deployment}.dead-letters"

    @property
    def model_events(self) -> str:
        return f"{self.deployment}.model-events"

    @property
    def stream_ticks(self) -> str:
        return f"{self.deployment}.stream-ticks"

    @property
    def documents(self) -> str:
        """Change-data-capture of an application's corpus: a document (upsert) or {"id", "deleted": true}."""
        return f"{self.deployment}.documents"

    def topics(self) -> list[str]:
        return [self.impressions, self.interactions, self.dead_letters, self.model_events, self.stream_ticks, self.documents]

    @property
    def stream_app(self) -> str:
        """The faust app id: its consumer group and the prefix of its changelog topics."""
        return f"{self.deployment}-stream"

    @property
    def requests_table(self) -> str:
        return f"{self.deployment}-requests"

    # Redis
    def candidates(self, index_version: str, k: int, query_key: str) -> str:
        """`query_key`: `training.ranking.query.query_key` of the query (its normal form, hashed)."""
        return f"{self.deployment}:cand:{index_version}:{k}:{query_key}"

    def results(self, index_version: str, model_version: str, k: int, query_key: str) -> str:
        """Keyed by model version too, so a swap can never serve scores of the model it replaced."""
        return f"{self.deployment}:res:{index_version}:{model_version}:{k}:{query_key}"

    def embedding(self, model_version: str, doc_id: str) -> str:
        return f"{self.deployment}:emb:{model_version}:{doc_id}"

    def seen_events(self, bucket: int) -> str:
        """A set of 8-byte hashes of the event ids seen in one time bucket. The hash tag keeps every
        bucket in one cluster slot, so one script checks them all."""
        return f"{self.deployment}:seen:{{{self.deployment}:seen}}:{bucket}"

    def rate_bucket(self, identity: str) -> str:
        return f"{self.deployment}:rate:{identity}"

    def known_identity(self, scope: str, identity_hash: str) -> str:
        """Marks an unsigned user/session id `scope` (a key, or a network) already brought; the hash tag
        keeps it in one cluster slot with the scope's new-identity bucket."""
        return f"{self.deployment}:ident:{{{scope}}}:{identity_hash}"

    def new_identity_bucket(self, scope: str) -> str:
        return f"{self.deployment}:newid:{{{scope}}}"

    def activity(self, minute: int) -> str:
        """Hash of counts in one minute (unix seconds // 60): events, labels, dead:<code>."""
        return f"{self.deployment}:activity:{minute}"

    def online(self, model_version: str) -> str:
        """Hash of what users did with one model version's rankings (`services.online.OnlineCounts`)."""
        return f"{self.deployment}:online:{model_version}"

    @property
    def fleet(self) -> str:
        """Hash of the serving workers' latest reports (`services.storage.WorkerReport`), by worker."""
        return f"{self.deployment}:fleet"

    @property
    def train_lock(self) -> str:
        return f"{self.deployment}:lock:train"

    @property
    def train_state(self) -> str:
        """Hash of the scheduler's counters: last_labels, last_time, backoff_until, failures."""
        return f"{self.deployment}:train:state"

    # MLflow
    @property
    def experiment(self) -> str:
        return self.deployment

    @property
    def model_name(self) -> str:
        return f"{self.deployment}-reranker"
