"""Prometheus metrics of a serving worker (one registry per worker, so tests never collide)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rankloop_rank_requests", "rank requests", ["cache"], registry=r)
        self.latency = Histogram(
            "rankloop_rank_latency_seconds",
            "rank latency",
            ["cache"],
            registry=r,
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.events_accepted = Counter("rankloop_events_accepted", "interaction events accepted", registry=r)
        self.events_rejected = Counter("rankloop_events_rejected", "interaction events rejected", ["code"], registry=r)
        self.publish_failures = Counter(
            "rankloop_publish_failures", "events that could not be recorded on Kafka", ["topic"], registry=r
        )
        self.impressions = Counter("rankloop_impressions_published", "impressions handed to the publisher", registry=r)
        self.impressions_buffered = Gauge("rankloop_impressions_buffered", "impressions waiting for the broker", registry=r)
        self.impressions_dropped = Gauge("rankloop_impressions_dropped", "impressions lost: the buffer was full", registry=r)
        self.kafka_up = Gauge("rankloop_kafka_up", "1 when the last publish reached the broker", registry=r)
        self.swaps = Counter("rankloop_model_swaps", "model hot swaps", registry=r)
        self.swap_failures = Counter("rankloop_model_swap_failures", "model versions that failed to load", registry=r)
        self.cache_errors = Counter("rankloop_cache_errors", "Redis errors (served without cache)", registry=r)
        self.rate_limited = Counter("rankloop_rate_limited", "requests refused with 429", ["path"], registry=r)
        self.explored = Counter("rankloop_explored_requests", "requests shown in a randomised order", registry=r)
        self.interleaved = Counter(
            "rankloop_interleaved_requests", "requests shown an interleaving of challenger and champion", registry=r
        )
        self.served = Gauge("rankloop_served_model", "1 for the model version this worker serves", ["version"], registry=r)

    def serving(self, version: str) -> None:
        """The served version as a label (`first-stage` before any model), so dashboards group by it."""
        self.served.clear()
        self.served.labels(version).set(1)

    def watch(self, publisher: Any) -> None:
        """Gauges read from the publisher when /metrics is scraped."""
        self.impressions_buffered.set_function(lambda: publisher.buffered)
        self.impressions_dropped.set_function(lambda: publisher.dropped)
        self.kafka_up.set_function(lambda: float(publisher.healthy))
