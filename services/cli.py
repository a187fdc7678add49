"""`rankloop`: one console script for every process and chore."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from services.config import Settings, get_settings
from services.infra import InfraError

app = typer.Typer(help="rankloop: a feedback-loop ranking platform.", no_args_is_help=True, pretty_exceptions_show_locals=False)
console = Console()
if not os.environ.get("RANKLOOP_ONLINE"):  # models load from local folders; never wait on a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _settings() -> Settings:
    s = get_settings()
    s.state_dir.mkdir(parents=True, exist_ok=True)
    return s


def _fail(e: Exception) -> None:
    console.print(f"[red]error:[/] {e}")
    raise typer.Exit(1)


@app.command()
def config() -> None:
    """Print the effective configuration (env vars RANKLOOP_*, MLFLOW_TRACKING_URI, RANKLOOP_CONFIG file)."""
    s = _settings()
    data = json.loads(s.model_dump_json())
    data["effective"] = {"kafka": s.bootstrap, "redis": s.redis, "mlflow": s.tracking_uri}
    console.print_json(json.dumps(data))


@app.command()
def up() -> None:
    """Start the local broker (Tansu), Redis and MLflow store on 127.0.0.1 (what is not configured by URL)."""
    from services import infra

    try:
        comps = infra.up(_settings())
    except InfraError as e:
        _fail(e)
    _print_status(comps)


@app.command()
def status() -> None:
    """Check the broker, Redis and MLflow."""
    from services import infra

    comps = infra.status(_settings())
    _print_status(comps)
    if not all(c.up for c in comps):
        raise typer.Exit(1)


def _print_status(comps) -> None:
    t = Table("component", "address", "state", "managed here")
    for c in comps:
        t.add_row(c.name, c.address, "[green]up[/]" if c.up else "[red]down[/]", "yes" if c.managed else "no (configured)")
    console.print(t)


@app.command()
def down() -> None:
    """Stop what `rankloop up` (and `rankloop demo`) started."""
    from services import infra

    stopped = infra.down(_settings())
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def ui(port: int = 5000) -> None:
    """Start the MLflow UI on the tracking store."""
    s = _settings()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", s.tracking_uri, "--host", "127.0.0.1", "--port", str(port)]
    if s.local_mlflow:
        cmd += ["--default-artifact-root", s.artifact_dir.resolve().as_uri()]
    console.print(f"MLflow UI on http://127.0.0.1:{port}")
    raise typer.Exit(subprocess.call(cmd))


@app.command()
def index(dataset: str = typer.Option(None, help="BEIR folder (or a BEIR name where a network exists)")) -> None:
    """Build the BM25 + faiss index of a corpus and make it current."""
    from training import beir, retrieval

    s = _settings()
    try:
        ds = beir.load(dataset or s.dataset, s.state_dir / "datasets")
    except FileNotFoundError as e:
        _fail(e)
    folder = retrieval.build_index(ds, s.state_dir)
    console.print(f"index [bold]{folder.name}[/] of {len(ds.corpus)} documents at {folder}")


@app.command()
def serve(host: str = None, port: int = None) -> None:
    """Run the serving worker (FastAPI): /rank, /events, /model, /health, /metrics."""
    import uvicorn

    from services.serve import Worker, create_app

    s = _settings()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        worker = Worker(s)
    except (InfraError, FileNotFoundError, ConnectionError) as e:
        _fail(e)
    uvicorn.run(create_app(s, worker), host=host or s.host, port=port or s.port, log_level="warning")


@app.command()
def stream() -> None:
    """Run the stream processor (faust worker): join, label, dead-letter, write the label store."""
    from services import infra
    from services.stream import create_app

    s = _settings()
    try:
        infra.require(s, "kafka")
        infra.create_topics(s)
    except InfraError as e:
        _fail(e)
    faust_app = create_app(s)
    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    faust_app.main()


@app.command()
def schedule() -> None:
    """Retrain continuously: on N new labels or on the interval, one run at a time."""
    from services.scheduler import Scheduler

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: already running" is expected
    try:
        Scheduler(_settings()).run()
    except (InfraError, FileNotFoundError, ConnectionError) as e:
        _fail(e)


@app.command()
def train(once: bool = typer.Option(False, "--once", help="train one challenger now")) -> None:
    """Train a challenger from the label store now, gate it and promote it if it is better."""
    from services.scheduler import retrain

    if not once:
        _fail(ValueError("`rankloop train --once` trains one challenger; `rankloop schedule` retrains continuously"))
    try:
        outcome = retrain(_settings())
    except (InfraError, FileNotFoundError, ConnectionError) as e:
        _fail(e)
    console.print(f"[bold]{outcome.status}[/]: {outcome.message}" + (f" (version {outcome.version})" if outcome.version else ""))


@app.command()
def promote(version: str, reason: str = "manual promotion") -> None:
    """Make VERSION the champion (the old one becomes `previous`) and tell the serving workers."""
    from training import registry

    _registry_change(lambda client, s: registry.promote(client, s.model_name, version, reason))


@app.command()
def rollback(reason: str = "manual rollback") -> None:
    """Put the `previous` version back as champion."""
    from training import registry

    _registry_change(lambda client, s: registry.rollback(client, s.model_name, reason))


def _registry_change(change) -> None:
    from services.bus import EventPublisher, make_producer
    from training import registry

    s = _settings()
    try:
        client = registry.connect(s.tracking_uri, s.artifact_dir)
        event = change(client, s)
    except (ValueError, ConnectionError) as e:
        _fail(e)
    try:
        pub = EventPublisher(make_producer(s.bootstrap))
        pub.publish(s.topic_model_events, s.model_name, event)
        pub.producer.flush(timeout=10)
    except InfraError as e:
        console.print(f"[yellow]registry updated, but the model event was not published ({e}); "
                      "serving workers will still pick it up by polling[/]")
    console.print(f"{event.action}: version {event.version} (was {event.previous_version})")


@app.command()
def models() -> None:
    """List registered versions and their aliases."""
    from training import registry

    s = _settings()
    client = registry.connect(s.tracking_uri, s.artifact_dir)
    t = Table("version", "aliases", "run")
    for v in registry.versions(client, s.model_name):
        t.add_row(v["version"], ", ".join(v["aliases"]), v["run_id"])
    console.print(t)


@app.command()
def simulate(
    dataset: str = typer.Option(None), split: str = "train", sessions: int = 200, seed: int = 0,
    url: str = typer.Option(None, help="serving worker URL (default from config)"),
    concurrency: int = typer.Option(4, help="simulated users at a time"),
) -> None:
    """Play simulated users against /rank and emit their interactions through the SDK."""
    from services.sdk import RankloopClient
    from services.simulate import simulate as run
    from training import beir

    s = _settings()
    ds = beir.load(dataset or s.dataset, s.state_dir / "datasets")
    client = RankloopClient(url or s.base_url)
    stats = run(client, ds, split, sessions, seed, concurrency=concurrency)
    console.print(stats)


@app.command("export-schemas")
def export_schemas(out: Path = typer.Option(None)) -> None:
    """Write the JSON Schema files of every event type."""
    from schemas import export_json_schemas

    for p in export_json_schemas(out) if out else export_json_schemas():
        console.print(str(p))


@app.command()
def demo(
    dataset: str = typer.Option(None, help="BEIR folder; default ../shared/data/scifact"),
    quick: bool = typer.Option(False, "--quick", help="smaller traffic and training, finishes within 15 minutes"),
    keep_running: bool = typer.Option(False, help="leave the workers and infrastructure running at the end"),
) -> None:
    """The whole loop on local infrastructure, until a trained challenger is promoted and hot-swapped in."""
    from services.demo import run_demo

    try:
        run_demo(_settings(), dataset, quick, keep_running)
    except (InfraError, FileNotFoundError, ConnectionError, TimeoutError) as e:
        _fail(e)


@app.command()
def propensity(
    clicklog: Path = typer.Option(None, help="impressions.tsv.gz of a click log; default: the Yandex WSCD 2012 sample"),
    from_kafka: bool = typer.Option(False, "--from-kafka", help="estimate from our own impressions and clicks on Kafka"),
    out: Path = typer.Option(Path("propensity.png"), help="where to write the plot"),
) -> None:
    """Estimate the examination curve (position bias) by EM on logged impressions and clicks."""
    from services.bus import impression_click_log
    from services.simulate import CLICKLOG_STATS
    from training.labels import DEFAULT_EXAMINATION
    from training.propensity import estimate_examination, plot_curves, read_click_log

    s = _settings()
    try:
        if from_kafka:
            df, source = impression_click_log(s), f"Kafka at {s.bootstrap}"
            est = estimate_examination(df["query"], df["doc_id"], df["position"], df["clicked"])
        else:
            path = clicklog or CLICKLOG_STATS.parent / "impressions.tsv.gz"
            df, source = read_click_log(path), str(path)
            est = estimate_examination(df.query_id, df.doc_id, df.position, df.clicked)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    t = Table("position", "estimated examination", "CTR prior (labelling default)")
    for i, v in enumerate(est.examination):
        t.add_row(str(i + 1), f"{v:.3f}", f"{DEFAULT_EXAMINATION[i]:.3f}" if i < len(DEFAULT_EXAMINATION) else "")
    console.print(t)
    console.print(f"{est.impressions} impressions from {source}, {est.iterations} EM iterations")
    plot_curves({"EM estimate": est.examination, "CTR by position (normalised)": DEFAULT_EXAMINATION}, out,
                "examination by position")
    console.print(f"plot: {out}")


bench_app = typer.Typer(help="Benchmarks that print and save figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("loop")
def bench_loop(
    dataset: str = typer.Option(None, help="BEIR folder; default ../shared/data/scifact"),
    train_split: str = "train", eval_split: str = "test", rounds: int = 3, seed: int = 0,
    sessions: int = typer.Option(3000, help="simulated sessions per round"),
    out: Path = typer.Option(Path("loop.json"), help="JSON result; a Markdown summary and plots go beside it"),
) -> None:
    """Run the real loop with simulated users on the train split; evaluate every champion on the eval split."""
    from services.bench import run_loop_bench

    if train_split == eval_split:
        _fail(ValueError(f"--train-split and --eval-split are both {train_split!r}: the eval split must never feed training"))
    base = _settings()
    # its own state, broker, Redis and port, so it never touches a running local stack
    s = Settings(**{**base.model_dump(), "state_dir": base.state_dir / f"bench-{int(time.time())}",
                    "local_kafka_port": base.local_kafka_port + 100, "local_redis_port": base.local_redis_port + 100,
                    "port": base.port + 100, "dataset": dataset or base.dataset, "kafka_bootstrap": None,
                    "redis_url": None, "mlflow_tracking_uri": None})
    s.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = run_loop_bench(s, s.dataset, train_split, eval_split, rounds, seed, sessions, out)
    except (InfraError, FileNotFoundError, ConnectionError, TimeoutError) as e:
        _fail(e)
    console.print_json(json.dumps({k: result[k] for k in ("baselines", "skyline", "final", "checks", "timings")}))
    console.print(f"written: {out}, {out.with_suffix('.md')}")
