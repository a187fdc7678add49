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
from services.storage.kafka import committed_offsets, end_offsets
from training.labels.store import LabelStore


def settings_file(s: Settings, name: str = "settings") -> Path:
    """These exact settings as a JSON file a child process reads through RANKLOOP_CONFIG."""
    return s.write_json(run_dir(s) / f"{name}.json")


def worker_env(s: Settings, **overrides: str) -> dict[str, str]:
    """The environment of a worker: these exact settings (as RANKLOOP_CONFIG), plus `overrides`."""
    path = settings_file(s)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKLOOP_")}
    env.update({"RANKLOOP_CONFIG": str(path), "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1")})
    # MLflow's own variable outranks the settings file, and `mlflow.set_tracking_uri` sets it in this
    # process: a benchmark that ran one state dir then another spawned workers reading the first's registry
    env["MLFLOW_TRACKING_URI"] = s.tracking_uri
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


def settle_labels(s: Settings, labels: LabelStore, timeout: float = 300.0) -> int:
    """Waits until the stream has joined every impression and interaction sent so far: its committed
    offsets reach the topics' ends, and it commits a message only after its labels are in the table.
    A round is cut at an exact point, not after a quiet spell, so how many labels a round trains on
    does not depend on timing."""
    keys = s.keys
    deadline = time.time() + timeout
    while time.time() < deadline:
        if impressions_buffered(s):  # serving hands impressions over in the background: not yet on a topic
            time.sleep(0.5)
            continue
        inputs = end_offsets(s.kafka.address, [keys.impressions, keys.interactions])
        done = committed_offsets(s.kafka.address, keys.stream_app)
        if all(done.get(tp, 0) >= end for tp, end in inputs.items()):
            return len(labels.read()[0])  # distinct labels, as training reads them
        time.sleep(1)
    raise TimeoutError(f"the stream did not catch up within {timeout:.0f}s (see <state>/run/stream.log)")


def impressions_buffered(s: Settings) -> int:
    """Impressions the serving worker still holds (0 if it cannot be asked)."""
    try:
        return int(httpx.get(f"{s.base_url}/health/ready", timeout=5).json().get("impressions_buffered", 0))
    except (httpx.HTTPError, ValueError):
        return 0
