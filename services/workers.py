"""Starting the serve / stream / schedule workers as their own processes (demo and benchmark), the
way a deployment runs them: same CLI, configuration passed through the environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from services.config import Settings


def worker_env(s: Settings, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "RANKLOOP_STATE_DIR": str(s.state_dir.resolve()),
        "RANKLOOP_DATASET": s.dataset,
        "RANKLOOP_LOCAL_KAFKA_PORT": str(s.local_kafka_port),
        "RANKLOOP_LOCAL_REDIS_PORT": str(s.local_redis_port),
        "RANKLOOP_PORT": str(s.port),
        "RANKLOOP_CHAMPION_POLL_S": "5",
        "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
    })
    env.update(overrides)
    return env


def spawn(s: Settings, name: str, env: dict[str, str]) -> subprocess.Popen:
    """Starts `rankloop NAME`; its log and pid go to <state>/run/ so `rankloop down` can stop it."""
    run = s.state_dir / "run"
    run.mkdir(parents=True, exist_ok=True)
    log = open(run / f"{name}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "services", name], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    (run / f"{name}.pid").write_text(str(proc.pid))
    return proc


def wait_healthy(s: Settings, procs: dict[str, subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see {s.state_dir / 'run' / (name + '.log')}")
        try:
            if httpx.get(f"{s.base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"serving worker not healthy after {timeout:.0f}s; see {s.state_dir / 'run' / 'serve.log'}")


def stop(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        p.terminate()
    for p in procs.values():
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def served_version(s: Settings) -> str:
    return httpx.get(f"{s.base_url}/model", timeout=10).json()["model_version"]
