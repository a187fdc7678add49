"""`rankloop bench serve`: how fast serving is, and what a promotion, a rollback and an outage cost.

On its own local stack (Tansu, redis-server, an MLflow server on sqlite) with the dataset's index and
two registered versions (the base checkpoint and a fine-tuned copy, under different mixes): latencies of a miss, a hit and
a first-stage miss side by side (one client), throughput with one and two workers (8 clients), a
promotion and a rollback under 8 clients, and a broker restart, a Redis restart and MLflow stopping
under load. Every figure comes from the requests the benchmark itself sent and checked.
"""

from __future__ import annotations

import copy
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import mlflow
from pydantic import BaseModel
from rich.console import Console
from sentence_transformers import SentenceTransformer

from services.config import MlflowSettings, Settings
from services.control.promotion import Promotions
from services.local import infra
from services.local.load import CLIENTS, Load
from services.local.workers import run_dir, spawn, worker_env
from services.storage import open_registry
from services.storage.kafka import read_topic
from training import beir
from training.config import TrainConfig
from training.indexing import build_index
from training.ranking.encoder import load_encoder
from training.ranking.first_stage import FirstStage
from training.ranking.reranker import Mix, Reranker, save_model_folder
from training.registry import MlflowRegistry
from training.train import Example, fit

console = Console()


class Latency(BaseModel):
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests: int


class Throughput(BaseModel):
    clients_8_rps: float
    p99_ms: float
    failed: int


class SwapCost(BaseModel):
    kind: str
    failed: int
    p99_before_ms: float
    p99_after_ms: float  # the 10 s after the alias moved
    max_ms: float
    seconds_to_serve: float | None  # alias moved -> every answer from the new version


class FaultCost(BaseModel):
    kind: str
    failed_rank: int
    impressions_lost: int  # shown after the fault began, not on the topic once recovered
    events_rejected: int  # POST /events answered 503 (the client was told; nothing half-recorded)
    recovered_s: float | None  # the dependency back -> serving fully working again


class ServeBenchResult(BaseModel):
    dataset: str
    documents: int
    threads: int
    miss: Latency
    hit: Latency
    first_stage_miss: Latency
    miss_over_first_stage: float
    throughput: dict[str, Throughput]
    workers_2_over_1: float
    swaps: list[SwapCost]
    faults: list[FaultCost]
    timings: dict[str, float]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1) if ordered else 0.0


def latency(ms: list[float]) -> Latency:
    return Latency(p50_ms=percentile(ms, 0.5), p95_ms=percentile(ms, 0.95), p99_ms=percentile(ms, 0.99), requests=len(ms))


def one_client(base_url: str, queries: list[str], repeat: bool) -> Latency:
    """One client, sequential: distinct queries (misses) or one query again and again (hits)."""
    ms = []
    with httpx.Client(base_url=base_url, timeout=60) as http:
        http.post("/rank", json={"query": queries[0], "k": 10})
        for q in queries[1:]:
            started = time.perf_counter()
            r = http.post("/rank", json={"query": queries[0] if repeat else q, "k": 10})
            r.raise_for_status()
            ms.append((time.perf_counter() - started) * 1000)
    return latency(ms)


def served_version(base_url: str) -> str:
    return str(httpx.get(f"{base_url}/model", timeout=10).json()["model_version"])


def wait_until(predicate: Callable[[], bool], timeout: float, every: float = 0.2) -> float | None:
    """Seconds until `predicate` held, or None."""
    started = time.time()
    while time.time() - started < timeout:
        try:
            if predicate():
                return round(time.time() - started, 2)
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(every)
    return None


def register_versions(s: Settings, registry: MlflowRegistry, fs: FirstStage, ds: beir.Dataset, memory_size: int) -> list[str]:
    """Two versions like a training makes them: the base checkpoint and a copy fine-tuned for an
    epoch on judged (query, document) pairs of the dataset, each with its own document matrix and a
    feedback memory of `memory_size` queries."""
    queries = list(ds.queries.values())
    remembered = [f"{queries[i % len(queries)]} ({i // len(queries)})" for i in range(memory_size)]
    doc_ids = fs.store.ids()
    memory = {q: {doc_ids[i % len(doc_ids)]: 1.0} for i, q in enumerate(remembered)}
    base = load_encoder()
    versions = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, (model, mix) in enumerate(((base, Mix(0.5)), (fine_tuned_copy(base, fs, ds), Mix(0.75)))):
            folder = save_model_folder(model, Path(tmp) / f"v{n}" / "model", mix, memory)
            Reranker(folder, "bench").warm(fs)
            with mlflow.start_run(run_name=f"bench-serve-version-{n}") as run:
                mlflow.log_artifacts(str(folder), "model")
            versions.append(registry.register(run.info.run_id))
    return versions


def fine_tuned_copy(model: SentenceTransformer, fs: FirstStage, ds: beir.Dataset, pairs: int = 64) -> SentenceTransformer:
    """A copy of `model` after one epoch on `pairs` judged pairs (first-stage negatives): other weights."""
    split = "train" if (ds.path / "qrels" / "train.tsv").exists() else "test"
    judged = [(ds.queries[q], d) for q, docs in ds.qrels(split).items() if q in ds.queries for d, g in docs.items() if g > 0]
    examples = []
    for query, doc in judged[:pairs]:
        negatives = [c.doc_id for c in fs.search(query, 10) if c.doc_id != doc][:2]
        examples.append(Example(query, doc, negatives, 1.0))
    tuned = copy.deepcopy(model)
    fit(tuned, examples, fs.text, TrainConfig(epochs=1))
    tuned.eval()
    return tuned


def start_mlflow(s: Settings, port: int) -> None:
    log = open(run_dir(s) / "mlflow.log", "ab")
    db = (s.state_dir / "mlflow.db").resolve()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--default-artifact-root",
            s.artifact_dir.resolve().as_uri(),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (run_dir(s) / "mlflow.pid").write_text(str(proc.pid))
    if wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200, 120) is None:
        raise TimeoutError(f"the MLflow server did not start; see {run_dir(s) / 'mlflow.log'}")


def start_serve(s: Settings, workers: int) -> None:
    # MLflow's client retries for minutes by default; a worker's champion check should give up sooner
    env = worker_env(s, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    spawn(s, "serve", env, ("--workers", str(workers)))
    if wait_until(lambda: httpx.get(f"{s.base_url}/health/ready", timeout=2).status_code == 200, 300, 1) is None:
        raise TimeoutError(f"serve did not become ready; see {run_dir(s) / 'serve.log'}")


def measure_swap(s: Settings, promotions: Promotions, kind: str, version: str, queries: list[str]) -> SwapCost:
    with Load(s.base_url, queries) as load:
        time.sleep(10)
        moved = time.time()
        if kind == "promote":
            promotions.promote(version, "bench serve", actor="bench")
        else:
            promotions.rollback("bench serve", actor="bench")
        # every answer from the new version: both workers swapped
        seconds = wait_until(
            lambda: all(r[3].startswith(f"{version}|") for r in load.log[-2 * CLIENTS :]) and load.log[-1][0] > moved, 60
        )
        time.sleep(max(0.0, moved + 10 - time.time()))
    before, after = load.between(moved - 10, moved), load.between(moved, moved + 10)
    return SwapCost(
        kind=kind,
        failed=sum(1 for r in load.log if r[2] != 200),
        p99_before_ms=percentile([r[1] for r in before], 0.99),
        p99_after_ms=percentile([r[1] for r in after], 0.99),
        max_ms=round(max((r[1] for r in after), default=0.0), 1),
        seconds_to_serve=seconds,
    )


def post_event(s: Settings, request_id: str, n: int) -> int:
    event = {"event_id": f"bench-{n}-{time.time_ns()}", "request_id": request_id, "doc_id": "x", "type": "click"}
    return httpx.post(f"{s.base_url}/events", json=[event], timeout=30).status_code


def measure_fault(
    s: Settings, kind: str, queries: list[str], down_s: float, stop_it: Callable[[], object], start_it: Callable[[], object]
) -> FaultCost:
    """A dependency stopped under load for `down_s`, then started again."""
    rejected = 0
    with Load(s.base_url, queries, clients=4) as load:
        time.sleep(3)
        stop_it()  # returns once the process exited
        began = len(load.log)
        deadline, n = time.time() + down_s, 0
        while time.time() < deadline:
            rejected += post_event(s, "bench", n) == 503
            n += 1
            time.sleep(1)
        start_it()
        recovered = wait_until(lambda: post_event(s, "bench", -1) == 200, 120, 1)
        if kind == "broker_restart":  # every worker's impression buffer drained (two reads: two workers)
            wait_until(
                lambda: all(
                    httpx.get(f"{s.base_url}/health/ready", timeout=10).json()["impressions_buffered"] == 0 for _ in range(4)
                ),
                60,
            )
        time.sleep(2)
    lost = 0
    if kind == "broker_restart":
        logged = {e["request_id"] for e in read_topic(s.kafka.address, s.keys.impressions)}
        shown = {r[3].split("|")[1] for r in load.log[began + 2 * CLIENTS :] if r[2] == 200}
        lost = len(shown - logged)
    return FaultCost(
        kind=kind,
        failed_rank=sum(1 for r in load.log if r[2] != 200),
        impressions_lost=lost,
        events_rejected=rejected,
        recovered_s=recovered,
    )


def run_serve_bench(s: Settings, out: Path, seconds: float = 15.0) -> ServeBenchResult:
    """Runs on its own local stack, stopped afterwards whatever happens."""
    mlflow_port = infra.free_port()
    s.mlflow = MlflowSettings(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
    s.serving = s.serving.model_copy(update={"champion_poll_s": 1.0})
    try:
        return _run(s, out, seconds, mlflow_port)
    finally:
        infra.down(s)


def _run(s: Settings, out: Path, seconds: float, mlflow_port: int) -> ServeBenchResult:
    timings: dict[str, float] = {}
    t_all = time.time()
    infra.up(s)
    start_mlflow(s, mlflow_port)
    ds = beir.load(s.dataset, s.state_dir / "datasets")
    build_index(ds, s.state_dir)
    fs = FirstStage.current(s.state_dir)
    queries = list(ds.queries.values())
    random.Random(0).shuffle(queries)
    registry = open_registry(s)
    t = time.time()
    v1, v2 = register_versions(s, registry, fs, ds, memory_size=len(queries))
    timings["register_s"] = time.time() - t

    start_serve(s, 1)

    def distinct(tag: str, n: int = 101) -> list[str]:  # the same queries each time, never in the cache
        return [f"{queries[i % len(queries)]} ({tag})" for i in range(n)]

    first_stage_miss = one_client(s.base_url, distinct("first stage"), repeat=False)
    promotions = Promotions.connect(s, registry)
    promotions.promote(v1, "bench serve", actor="bench")
    wait_until(lambda: served_version(s.base_url) == v1, 120)
    miss = one_client(s.base_url, distinct("reranked"), repeat=False)
    hit = one_client(s.base_url, distinct("hit", 201), repeat=True)
    console.print(
        f"one client: miss p50 {miss.p50_ms} ms, first-stage miss p50 {first_stage_miss.p50_ms} ms, hit p50 {hit.p50_ms} ms"
    )

    throughput = {}
    for workers in (1, 2):
        if workers == 2:
            infra.stop(s, "serve", timeout=30)
            start_serve(s, 2)
        with Load(s.base_url, queries) as load:
            time.sleep(seconds)
        ok = [r for r in load.log if r[2] == 200]
        throughput[f"workers_{workers}"] = Throughput(
            clients_8_rps=round(len(ok) / seconds, 1), p99_ms=percentile([r[1] for r in ok], 0.99), failed=len(load.log) - len(ok)
        )
        console.print(f"{workers} worker(s), {CLIENTS} clients: {throughput[f'workers_{workers}']}")

    swaps = [measure_swap(s, promotions, "promote", v2, queries), measure_swap(s, promotions, "rollback", v1, queries)]
    console.print(f"swaps: {swaps}")
    faults = [
        measure_fault(s, "broker_restart", queries, 20, lambda: infra.stop(s, "kafka"), lambda: infra.start_kafka(s)),
        measure_fault(s, "redis_restart", queries, 10, lambda: infra.stop(s, "redis"), lambda: infra.start_redis(s)),
        measure_mlflow_down(s, promotions, queries, v2, mlflow_port),
    ]
    console.print(f"faults: {faults}")

    timings["total_s"] = time.time() - t_all
    w1, w2 = throughput["workers_1"].clients_8_rps, throughput["workers_2"].clients_8_rps
    result = ServeBenchResult(
        dataset=ds.name,
        documents=len(ds.corpus),
        threads=s.torch_threads or 1,
        miss=miss,
        hit=hit,
        first_stage_miss=first_stage_miss,
        miss_over_first_stage=round(miss.p50_ms / max(first_stage_miss.p50_ms, 1e-9), 2),
        throughput=throughput,
        workers_2_over_1=round(w2 / w1, 2) if w1 else 0.0,
        swaps=swaps,
        faults=faults,
        timings={k: round(v, 1) for k, v in timings.items()},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.model_dump_json(indent=2))
    return result


def measure_mlflow_down(s: Settings, promotions: Promotions, queries: list[str], version: str, port: int) -> FaultCost:
    """MLflow stopped under load for 15 s; recovered = restarted -> a version promoted then is served."""
    with Load(s.base_url, queries, clients=4) as load:
        time.sleep(3)
        infra.stop(s, "mlflow", timeout=30)
        time.sleep(15)
        start_mlflow(s, port)
        promotions.promote(version, "bench serve: after MLflow came back", actor="bench")
        recovered = wait_until(lambda: served_version(s.base_url) == version, 120)
        time.sleep(2)
    return FaultCost(
        kind="mlflow_down",
        failed_rank=sum(1 for r in load.log if r[2] != 200),
        impressions_lost=0,
        events_rejected=0,
        recovered_s=recovered,
    )
