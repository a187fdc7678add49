"""Integration fixtures: a real Tansu broker, redis-server and sqlite MLflow on free local ports, a small
BEIR dataset cut from SciFact, the stream processor as its own process and the serving worker on a
real HTTP port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_small_beir(src: Path, dst: Path, queries: int = 40, extra_docs: int = 300) -> Path:
    """The first `queries` judged train queries, their relevant docs and `extra_docs` others."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "qrels").mkdir(exist_ok=True)
    lines = (src / "qrels" / "train.tsv").read_text().splitlines()
    header, rows = lines[0], [r.split("\t") for r in lines[1:]]
    qids = list(dict.fromkeys(r[0] for r in rows))[:queries]
    keep_rows = [r for r in rows if r[0] in qids]
    wanted = {r[1] for r in keep_rows}
    docs = []
    with (src / "corpus.jsonl").open() as f:
        for line in f:
            d = json.loads(line)
            if d["_id"] in wanted or len(docs) < extra_docs + len(wanted):
                docs.append(line)
    (dst / "corpus.jsonl").write_text("".join(docs))
    with (src / "queries.jsonl").open() as f:
        (dst / "queries.jsonl").write_text("".join(line for line in f if json.loads(line)["_id"] in qids))
    (dst / "qrels" / "train.tsv").write_text("\n".join([header] + ["\t".join(r) for r in keep_rows]) + "\n")
    return dst


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.skip(f"SciFact not found at {SCIFACT}")
    return make_small_beir(SCIFACT, tmp_path_factory.mktemp("beir") / "small")


@pytest.fixture(scope="session")
def stack(tmp_path_factory, small_dataset):
    """Settings + running infra, index, stream processor and serving worker."""
    from services import infra
    from services.config import Settings
    from training import beir
    from training.retrieval import build_index

    state = tmp_path_factory.mktemp("state")
    env = {
        "RANKLOOP_STATE_DIR": str(state),
        "RANKLOOP_LOCAL_KAFKA_PORT": str(free_port()),
        "RANKLOOP_LOCAL_REDIS_PORT": str(free_port()),
        "RANKLOOP_PORT": str(free_port()),
        "RANKLOOP_JOIN_WINDOW_S": "20",
        "RANKLOOP_CHAMPION_POLL_S": "2",
        "RANKLOOP_DATASET": str(small_dataset),
        "RANKLOOP_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    external = ("MLFLOW_TRACKING_URI", "RANKLOOP_KAFKA_BOOTSTRAP", "RANKLOOP_REDIS_URL")
    saved = {k: os.environ.get(k) for k in (*env, *external)}
    for k in external:  # the tests run on their own local infrastructure, whatever the shell says
        os.environ.pop(k, None)
    os.environ.update(env)
    s = Settings()
    infra.up(s)
    build_index(beir.load(small_dataset), state)
    log = open(state / "stream.log", "ab")
    stream = subprocess.Popen([sys.executable, "-m", "services", "stream"], env={**os.environ}, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)

    import uvicorn

    from services.serve import Worker, create_app

    worker = Worker(s)
    server = uvicorn.Server(uvicorn.Config(create_app(s, worker), host="127.0.0.1", port=s.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{s.base_url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        raise RuntimeError("serving worker did not become healthy")
    yield {"settings": s, "worker": worker, "state": state, "dataset": small_dataset}
    server.should_exit = True
    stream.terminate()
    stream.wait(timeout=30)
    infra.down(s)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
