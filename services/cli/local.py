"""The laptop tools: the demo and the benchmarks, each on its own local infrastructure."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import get_args

import typer
from pydantic import BaseModel

from schemas import InvalidInput
from services.cli.base import app, bench_app, console, settings, stop_cleanly_on_sigterm
from services.config import KafkaSettings, MlflowSettings, RedisSettings, Settings


def bench_settings(name: str, dataset: str | None, offset: int) -> Settings:
    """A benchmark's own state, broker, Redis and port (`offset` above the configured ones), so it never
    touches a running local stack or another benchmark."""
    base = settings()
    return base.model_copy(
        update={
            "state_dir": base.state_dir / f"{name}-{int(time.time())}",
            "dataset": dataset or base.dataset,
            "kafka": KafkaSettings(local_port=base.kafka.local_port + offset, partitions=base.kafka.partitions),
            "redis": RedisSettings(local_port=base.redis.local_port + offset),
            "mlflow": MlflowSettings(),
            "serving": base.serving.model_copy(update={"port": base.serving.port + offset}),
            "stream": base.stream.model_copy(
                update={"metrics_port": base.stream.metrics_port + offset if base.stream.metrics_port else 0}
            ),
            "control": base.control.model_copy(update={"port": base.control.port + offset}),
        }
    )


def _write(result: BaseModel, out: Path, already: bool = False) -> None:
    """A benchmark's result: to `out` (unless its runner wrote it already) and to the terminal."""
    if not already:
        out.write_text(result.model_dump_json(indent=2))
    console.print_json(result.model_dump_json())
    console.print(f"written: {out}")


@app.command()
def demo(
    dataset: str = typer.Option(None, help="BEIR folder; default: the `dataset` setting"),
    quick: bool = typer.Option(False, "--quick", help="smaller traffic and training, finishes within 15 minutes"),
    keep_running: bool = typer.Option(False, help="leave the workers and infrastructure running at the end"),
) -> None:
    """The whole loop on local infrastructure, until a trained challenger is promoted and hot-swapped in."""
    from services.local.demo import run_demo

    stop_cleanly_on_sigterm()
    s = settings()
    if dataset:
        s.dataset = dataset
    run_demo(s, quick, keep_running)


@bench_app.command("loop")
def bench_loop(
    dataset: str = typer.Option(None, help="BEIR folder; default: the `dataset` setting"),
    train_split: str = "train",
    eval_split: str = "test",
    rounds: int = 3,
    seed: int = 0,
    sessions: int = typer.Option(3000, help="simulated sessions per round"),
    repeat: int = typer.Option(1, min=1, help="run with seeds SEED..SEED+N-1 and report every figure as mean and range"),
    train_queries: int = typer.Option(None, min=1, help="head-query mode: users ask only this many train queries"),
    compare_learners: bool = typer.Option(True, help="end with naive vs debiased learners trained on the final labels"),
    out: Path = typer.Option(Path("loop.json"), help="JSON result; a Markdown summary and plots go beside it"),
) -> None:
    """Run the real loop with simulated users on the train split; evaluate every champion on the eval split."""
    from services.bench.loop import run_loop_bench

    if train_split == eval_split:
        raise InvalidInput(f"--train-split and --eval-split are both {train_split!r}: the eval split must never feed training")

    def one(seed: int, path: Path):
        s = bench_settings(f"bench-s{seed}", dataset, 100)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        return run_loop_bench(s, train_split, eval_split, rounds, seed, sessions, path, train_queries, compare_learners)

    if repeat > 1:
        from services.bench.repeat import run_repeated

        repeated = run_repeated(one, list(range(seed, seed + repeat)), out)
        console.print_json(repeated.model_dump_json(include={"figures", "checks"}))
        console.print(f"written: {out}, {out.with_suffix('.md')} and one run per seed beside them")
        return
    result = one(seed, out)
    summary = result.model_dump(mode="json", by_alias=True, include={"baselines", "skyline", "final", "checks", "timings"})
    console.print_json(json.dumps(summary))
    console.print(f"written: {out}, {out.with_suffix('.md')}")


@bench_app.command("loop-summary")
def bench_loop_summary(
    runs: list[Path] = typer.Argument(..., help="`bench loop` results, one per seed (e.g. run on separate machines)"),
    out: Path = typer.Option(Path("loop-repeat.json"), help="summary JSON; Markdown and a plot go beside it"),
) -> None:
    """What `bench loop --repeat N` prints, from runs made separately: every figure as mean and range."""
    from services.bench.repeat import summarise_files

    summary = summarise_files(runs, out)
    console.print_json(summary.model_dump_json(include={"figures", "checks"}))
    console.print(f"written: {out}, {out.with_suffix('.md')}")


@bench_app.command("loop-compare")
def bench_loop_compare(
    runs: list[Path] = typer.Argument(..., help="two `bench loop` results of the same seed and setup"),
    out: Path = typer.Option(None, help="also write the comparison here (JSON)"),
) -> None:
    """How far two runs of one seed came apart: every differing figure, and whether the headlines agree within 0.003."""
    from services.bench.repeat import compare_same_seed

    comparison = compare_same_seed(runs)
    if out:
        out.write_text(comparison.model_dump_json(indent=2))
    console.print_json(comparison.model_dump_json())
    if not comparison.within_tolerance:
        raise typer.Exit(1)


@bench_app.command("replay")
def bench_replay(
    run: Path = typer.Argument(..., help="a `bench loop` result (one seed): its rounds' label counts and eval split"),
    run_state: Path = typer.Argument(..., help="that run's state folder (.rankloop/bench-s<seed>-<time>): index and labels"),
    dataset: str = typer.Option(None, help="BEIR folder of the run; default: the `dataset` setting"),
    out: Path = typer.Option(Path("replay.json"), help="where the JSON result goes"),
) -> None:
    """The run's rounds trained again on the labels it stored, under the current settings (e.g.
    RANKLOOP_TRAIN__EPOCHS=4): each round's gate, champion and designs on the eval split."""
    from services.bench.replay import run_replay

    for path in (run, run_state / "labels"):
        if not path.exists():
            raise InvalidInput(f"{path} does not exist")
    try:
        bench = json.loads(run.read_text())
        valid = isinstance(bench["eval_split"], str) and all(int(r["labels"]) > 0 for r in bench["rounds"])
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise InvalidInput(f"{run} is not a `bench loop` result of one seed (rounds with labels, eval_split)")
    s = bench_settings("bench-replay", dataset, 0)
    s.state_dir.mkdir(parents=True, exist_ok=True)
    _write(run_replay(s, run, run_state, out), out, already=True)


@bench_app.command("serve")
def bench_serve(
    dataset: str = typer.Option(None, help="BEIR folder; default: the `dataset` setting"),
    seconds: float = typer.Option(15.0, help="length of each throughput measurement"),
    out: Path = typer.Option(Path("serve.json"), help="where the JSON result goes"),
) -> None:
    """Serving latency (miss, hit, first-stage miss), throughput with 1 and 2 workers, swaps and outages under load."""
    from services.bench.serve import run_serve_bench

    s = bench_settings("bench-serve", dataset, 200)
    s.state_dir.mkdir(parents=True, exist_ok=True)
    result = run_serve_bench(s, out, seconds)
    _write(result, out, already=True)


@bench_app.command("towers")
def bench_towers(
    dataset: str = typer.Option(None, help="BEIR folder; default: the `dataset` setting"),
    train_split: str = "train",
    eval_split: str = "test",
    out: Path = typer.Option(Path("towers.json"), help="where the JSON result goes"),
) -> None:
    """A frozen vs a tuned document tower on the same labels: quality, training time, time to serve."""
    from services.bench.towers import run_towers_bench

    s = bench_settings("bench-towers", dataset, 400)
    s.state_dir.mkdir(parents=True, exist_ok=True)
    _write(run_towers_bench(s, train_split, eval_split, out), out, already=True)


@bench_app.command("scale")
def bench_scale(
    docs: str = typer.Option("10000,100000,1000000", help="corpus sizes, comma-separated"),
    workers: int = typer.Option(2, min=1, help="serving worker processes"),
    queries: int = typer.Option(300, min=10, help="/rank requests timed per size (misses; as many hits)"),
    out: Path = typer.Option(Path("scale.json"), help="where the JSON result goes (rewritten after each size)"),
) -> None:
    """What each corpus size costs: index build, memory per worker, /rank latency, ANN recall, promotion, memory lookup."""
    from services.bench.scale import run_scale_bench

    try:
        sizes = [int(n) for n in docs.split(",")]
    except ValueError:
        raise InvalidInput(f"--docs {docs!r}: comma-separated whole numbers, e.g. 10000,100000") from None
    s = bench_settings("bench-scale", None, 500)
    s.state_dir.mkdir(parents=True, exist_ok=True)
    _write(run_scale_bench(s, sizes, out, workers, queries), out, already=True)


@bench_app.command("corpus")
def bench_corpus(
    documents: int = typer.Option(5000, min=10, help="synthetic documents loaded before the updates"),
    seconds: float = typer.Option(60.0, help="how long documents are upserted, edited and deleted under traffic"),
    rate: float = typer.Option(5.0, help="document changes per second"),
    out: Path = typer.Option(Path("corpus.json"), help="where the JSON result goes"),
) -> None:
    """A living corpus under traffic: upsert/delete visibility, stale answers, filters, /rerank labels, a kill -9."""
    from services.bench.corpus import run_corpus_bench

    s = bench_settings("bench-corpus", None, 300)
    s.state_dir.mkdir(parents=True, exist_ok=True)
    result = run_corpus_bench(s, out, documents, seconds, rate)
    _write(result, out, already=True)


@bench_app.command("stream")
def bench_stream(
    events: int = typer.Option(300_000, help="interaction events to send (each request also has an impression)"),
    workers: int = typer.Option(2, min=1, help="stream worker processes"),
    partitions: int = typer.Option(4, min=1, help="partitions of every topic"),
    kill_one: bool = typer.Option(False, "--kill-one", help="kill -9 one worker at 40 % of the sending and restart it"),
    kill_all: bool = typer.Option(False, "--kill-all", help="kill -9 every worker (the whole stream) at 40 % and restart them"),
    join_window: float = typer.Option(30.0, help="the stream's join window (s): the audit waits two of them at the end"),
    rate: float = typer.Option(0.0, min=0, help="interaction events per second to send at; 0: as fast as possible"),
    http_share: float = typer.Option(0.5, min=0, max=1, help="share of requests whose events go through POST /events"),
    out: Path = typer.Option(Path("stream.json"), help="where the JSON result goes"),
) -> None:
    """Events labelled per second end to end, freshness, and an exactly-once audit (lost, duplicate labels)."""
    from services.bench.stream import run_stream_bench

    s = bench_settings("bench-stream", None, 300)
    s.kafka = s.kafka.model_copy(update={"partitions": partitions})
    s.stream = s.stream.model_copy(update={"join_window_s": join_window})
    s.state_dir.mkdir(parents=True, exist_ok=True)
    result = run_stream_bench(s, events, workers, kill_one, out, rate=rate, kill_all=kill_all, http_share=http_share)
    _write(result, out, already=True)


@bench_app.command("labels")
def bench_labels(
    labels: int = typer.Option(1_000_000, help="rows written to a fresh label table, in stream-sized commits"),
    out: Path = typer.Option(Path("labels.json"), help="where the JSON result goes"),
) -> None:
    """What counting new labels (the scheduler, every check) and reading them (training) cost on a big table."""
    import tempfile

    from services.bench.stream import measure_count

    with tempfile.TemporaryDirectory() as folder:
        result = measure_count(Path(folder) / "labels", labels)
    _write(result, out)


@bench_app.command("dedup")
def bench_dedup(
    ids: int = typer.Option(200_000, help="event ids to record"),
    out: Path = typer.Option(Path("dedup.json"), help="where the JSON result goes"),
) -> None:
    """Redis memory per event id of intake de-duplication, former and current scheme."""
    from services.bench.stream import measure_dedup

    s = bench_settings("bench-dedup", None, 400)
    s.state_dir.mkdir(parents=True, exist_ok=True)
    result = measure_dedup(s, ids)
    _write(result, out)


@bench_app.command("poison")
def bench_poison(
    dataset: str = typer.Option(None, help="BEIR folder; default: the `dataset` setting"),
    identities: list[int] = typer.Option([1, 20, 500, 5000], help="attacker identities per case (repeat for several cases)"),
    keyed_identities: int = typer.Option(500, help="one more case: this many identities behind the attacker's own key; 0: none"),
    clicks: int = typer.Option(5000, help="fake clicks per case, spread over the identities and queries"),
    queries: int = typer.Option(5, help="attacked train queries, one irrelevant target document each"),
    sessions: int = typer.Option(3000, help="simulated sessions of the clean round"),
    case_sessions: int = typer.Option(1000, help="simulated sessions alongside each attack"),
    backdate_s: float = typer.Option(240.0, help="how far the attacker backdates its timestamps"),
    seed: int = 0,
    out: Path = typer.Option(Path("poison.json"), help="where the JSON result goes"),
) -> None:
    """A clean round, then fake clicks from few identities: does the target rise, is it promoted, does quality hold?"""
    from services.bench.poison import PoisonPlan, run_poison_bench

    s = bench_settings("bench-poison", dataset, 300)
    s.state_dir.mkdir(parents=True, exist_ok=True)
    plan = PoisonPlan(
        dataset=s.dataset,
        identities=identities,
        keyed_identities=keyed_identities,
        clicks=clicks,
        queries=queries,
        sessions=sessions,
        case_sessions=case_sessions,
        backdate_s=backdate_s,
        seed=seed,
    )
    result = run_poison_bench(s, plan, out)
    console.print_json(result.model_dump_json(exclude={"cases": {"__all__": {"targets"}}}))
    console.print(f"written: {out}")


@bench_app.command("interleave")
def bench_interleave(
    dataset: str = typer.Option(None, help="BEIR folder; default: the `dataset` setting"),
    models: list[Path] = typer.Option([], help="a model folder, or a folder of versions (e.g. a loop bench's `versions/`)"),
    split: str = typer.Option("test", help="judged queries the simulated users ask"),
    max_sessions: int = typer.Option(102_400, help="sessions after which a pair is called no different"),
    spread: float = typer.Option(None, help="how much simulated users differ (0: identical); default: fitted to the click log"),
    method: str = typer.Option("optimized", help="interleaving method: optimized or team_draft"),
    seed: int = 0,
    out: Path = typer.Option(Path("interleave.json"), help="where the JSON result goes"),
) -> None:
    """Interleaving vs A/B on pairs of rankers of known offline difference: verdicts and sessions needed."""
    from services.bench.interleave import run_interleave_bench
    from training.config import InterleaveConfig, InterleaveMethod

    s = settings()
    s = s.model_copy(update={"state_dir": s.state_dir / "bench-interleave", "dataset": dataset or s.dataset})
    if method not in get_args(InterleaveMethod):
        raise typer.BadParameter(f"{method!r}: choose one of {', '.join(get_args(InterleaveMethod))}", param_hint="--method")
    cfg = InterleaveConfig(min_sessions=100, max_sessions=max_sessions, method=method)
    _write(run_interleave_bench(s, models, split, seed, cfg, spread), out)
