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


def serve_in_thread(s, app):
    """The app on a real port in a background thread, once /health/ready answers 200."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=s.serving.port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{s.base_url}/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("serving worker did not become ready")


@pytest.fixture(scope="session")
def stack(tmp_path_factory, small_dataset):
    """Settings + running infra, index, stream processor and serving worker."""
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
    stream = server = None
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

        from services.serve.app import build_worker, create_app

        worker = build_worker(s)
        server = serve_in_thread(s, create_app(s, worker))
        yield {"settings": s, "worker": worker, "state": state, "dataset": small_dataset}
    finally:
        if server is not None:
            server.should_exit = True
        if stream is not None:
            stream.terminate()
            stream.wait(timeout=30)
        infra.down(s)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
