"""Is the broker, Redis, MLflow up? What `rankloop status` shows and what every process checks at
start, so a missing dependency is named with how to start it instead of failing deep inside."""

from __future__ import annotations

import socket
from dataclasses import dataclass

import httpx

from schemas import DependencyUnavailable
from services.config import Settings

HOW_TO_START = {
    "kafka": "start it with `rankloop up` or set RANKLOOP_KAFKA__BOOTSTRAP",
    "redis": "start it with `rankloop up` or set RANKLOOP_REDIS__URL",
    "mlflow": "start it with `rankloop up` or set MLFLOW_TRACKING_URI",
}


@dataclass
class Component:
    name: str
    address: str
    up: bool
    managed: bool  # started by `rankloop up` (not configured by URL)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def kafka_reachable(bootstrap: str) -> bool:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    return port_open(host or "127.0.0.1", int(port))


def redis_reachable(url: str) -> bool:
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except (RedisError, OSError):
        return False


def mlflow_reachable(s: Settings) -> bool:
    """Local sqlite: usable when its folder exists (the file is made on first use). A server: /health."""
    if s.mlflow.local:
        return s.state_dir.is_dir()
    if not s.tracking_uri.startswith("http"):
        return True  # a file or database URI that MLflow opens itself
    try:
        return httpx.get(s.tracking_uri.rstrip("/") + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def status(s: Settings) -> list[Component]:
    return [
        Component("kafka", s.kafka.address, kafka_reachable(s.kafka.address), s.kafka.local),
        Component("redis", s.redis.address, redis_reachable(s.redis_url), s.redis.local),
        Component("mlflow", s.tracking_uri, mlflow_reachable(s), s.mlflow.local),
    ]


def require(s: Settings, *names: str) -> None:
    """Raises DependencyUnavailable naming the first dependency that is down, with how to start it."""
    for c in status(s):
        if c.name in names and not c.up:
            raise DependencyUnavailable(f"{c.name} at {c.address} is not reachable: {HOW_TO_START[c.name]}")
