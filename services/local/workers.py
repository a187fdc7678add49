"""Starting the serve / stream / schedule workers as their own processes (demo and benchmark), the
way a deployment runs them: the same CLI, the parent's settings handed over as a JSON file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from schemas import DependencyUnavailable
from services.config import Settings
from services.local.infra import run_dir


def settings_file(s: Settings, name: str = "settings") -> Path:
    """These exact settings as a JSON file a child process reads through RANKLOOP_CONFIG."""
    path = run_dir(s) / f"{name}.json"
    path.write_text(s.model_copy(update={"state_dir": s.state_dir.resolve()}).model_dump_json(indent=2))
    return path.resolve()


def worker_env(s: Settings, **overrides: str) -> dict[str, str]:
    """The environment of a worker: these exact settings (as RANKLOOP_CONFIG), plus `overrides`."""
    path = settings_file(s)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKLOOP_")}
    env.update({"RANKLOOP_CONFIG": str(path), "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1")})
    env.update(overrides)
    return env


def spawn(s: Settings, name: str, env: dict[str, str], args: tuple[str, ...] = (), label: str | None = None) -> subprocess.Popen:
    """Starts `rankloop NAME ARGS`; its log and pid go to <state>/run/<label or name>.* so `rankloop down`
    can stop it."""
    label = label or name
    log = open(run_dir(s) / f"{label}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services", name, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    (run_dir(s) / f"{label}.pid").write_text(str(proc.pid))
    return proc


def wait_healthy(s: Settings, procs: dict[str, subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise DependencyUnavailable(f"{name} exited with {p.returncode}; see {run_dir(s) / (name + '.log')}")
        try:
            if httpx.get(f"{s.base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise DependencyUnavailable(f"serving worker not healthy after {timeout:.0f}s; see {run_dir(s) / 'serve.log'}")


def stop(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        p.terminate()
    for p in procs.values():
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def served_version(s: Settings) -> str:
    return str(httpx.get(f"{s.base_url}/model", timeout=10).json()["model_version"])
