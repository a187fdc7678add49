"""Integration fixtures: a real Tansu broker, redis-server and sqlite MLflow on free local ports, the
stream processor as its own process and the serving worker on a real HTTP port."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import SHARED_DATA, free_port


def wait_for(predicate, timeout=90.0, every=0.2, what="condition"):
    """Polls until `predicate()` is truthy (returns it) or fails after `timeout` seconds: tests wait on
    conditions, never on a guessed sleep."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def serve_in_thread(s, app, base_url: str | None = None):
    """The app on a real port in a background thread, once its /health/ready answers 200."""
    import uvicorn

    base_url = base_url or s.base_url
    port = int(base_url.rsplit(":", 1)[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{base_url}/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{base_url} did not become ready")


@pytest.fixture(scope="session")
def stack(tmp_path_factory, small_dataset):
    """Settings + running infra, index, stream processor, serving worker and control process (whose
    retraining never triggers by itself: tests train when they mean to)."""
    from services.config import Settings
    from services.local import infra
    from training import beir
    from training.indexing import build_index

    state = tmp_path_factory.mktemp("state")
    env = {
        "RANKLOOP_STATE_DIR": str(state),
        "RANKLOOP_KAFKA__LOCAL_PORT": str(free_port()),
        "RANKLOOP_REDIS__LOCAL_PORT": str(free_port()),
        "RANKLOOP_SERVING__PORT": str(free_port()),
        "RANKLOOP_STREAM__METRICS_PORT": str(free_port()),
        "RANKLOOP_STREAM__JOIN_WINDOW_S": "20",
        "RANKLOOP_SERVING__CHAMPION_POLL_S": "2",
        "RANKLOOP_CONTROL__PORT": str(free_port()),
        "RANKLOOP_RETRAIN__MIN_NEW_LABELS": "1000000000",
        "RANKLOOP_RETRAIN__INTERVAL_S": "1000000000",
        "RANKLOOP_DATASET": str(small_dataset),
        "RANKLOOP_CLICKLOG": str(SHARED_DATA / "clicklogs" / "yandex-wscd-2012-sample"),
        "RANKLOOP_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    external = ("MLFLOW_TRACKING_URI", "RANKLOOP_KAFKA__BOOTSTRAP", "RANKLOOP_REDIS__URL", "RANKLOOP_CONFIG")
    saved = {k: os.environ.get(k) for k in (*env, *external)}
    for k in external:  # the tests run on their own local infrastructure, whatever the shell says
        os.environ.pop(k, None)
    os.environ.update(env)
    s = Settings()
    stream = server = control = None
    try:  # whatever fails while starting, nothing started is left running (a stream orphaned on a port)
        infra.up(s)
        build_index(beir.load(small_dataset), state)
        log = open(state / "stream.log", "ab")
        stream = subprocess.Popen(
            [sys.executable, "-m", "services", "stream"],
            env={**os.environ},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        from services.control.app import ControlPlane
        from services.control.app import create_app as create_control_app
        from services.serve.app import build_worker, create_app

        worker = build_worker(s)
        server = serve_in_thread(s, create_app(s, worker))
        plane = ControlPlane.connect(s)
        control = serve_in_thread(s, create_control_app(s, plane), s.control.url)
        yield {"settings": s, "worker": worker, "control": plane, "state": state, "dataset": small_dataset}
    finally:
        for running in (server, control):
            if running is not None:
                running.should_exit = True
        if stream is not None:
            stream.terminate()
            stream.wait(timeout=30)
        infra.down(s)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
