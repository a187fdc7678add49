"""`rankloop demo`: start everything as separate processes, drive traffic until a trained challenger is
promoted and served, then report. The processes are the ones a deployment runs (serve, stream,
schedule), started with the same CLI."""

from __future__ import annotations

import os
import time
import uuid

from rich.console import Console
from rich.table import Table

from schemas import FIRST_STAGE, DependencyUnavailable
from services.cli.progress import ProgressBar
from services.config import Settings
from services.control.schedule import training_progress
from services.local import infra
from services.local.simulate import UserModel, app_client, examination_curve, simulate
from services.local.workers import served_version, spawn, stop, wait_healthy, worker_env
from services.sdk import RankloopClient
from services.storage import open_labels, open_registry, open_schedule_state
from services.storage.health import status
from services.storage.kafka import message_count
from training import beir, self_check
from training.evaluate import evaluate_ranker
from training.indexing import build_index
from training.ranking.first_stage import FirstStage
from training.ranking.rank import candidates_for
from training.ranking.reranker import Reranker

console = Console()
SCHEDULER_CHECK_S = 10
TRAINING_WAIT_S = 45 * 60  # longest wait for a training run that has started


def evaluate_versions(s: Settings, fs: FirstStage, ds: beir.Dataset, splits: tuple[str, ...] = ("test", "train")) -> list[dict]:
    """Metrics per split for the first stage and every registered version. The test queries never
    fed training or the gate; the train queries are the ones simulated users gave feedback on."""
    registry = open_registry(s)
    rows: list[tuple[str, Reranker | None, list[str]]] = [(FIRST_STAGE, None, [])]
    for v in registry.versions():
        rows.append((v.version, Reranker(registry.fetch(v), v.version).warm(fs), list(v.aliases)))
    out: list[dict] = [{"version": version, "aliases": aliases} for version, _, aliases in rows]
    for split in splits:
        cands = candidates_for(fs, [ds.queries[q] for q in ds.qrels(split)])
        for row, (_, rr, _) in zip(out, rows):
            row[split] = evaluate_ranker(ds, split, cands, rr, fs.text, s.serving.rerank_depth)
        self_check.check_figures(fs, split, out[0][split])  # the first-stage row, against the index's record
    return out


def _show_rejection(client: RankloopClient, ranked) -> None:
    """One batch with a good event, a malformed one (rejected at intake) and a click on a doc that was
    not shown (accepted at intake, dead-lettered by the stream processor)."""
    answer = client.emit(
        [
            client.event(ranked.request_id, ranked.items[0].doc_id, "click"),
            {
                "event_id": "bad-" + uuid.uuid4().hex[:6],
                "request_id": ranked.request_id,
                "doc_id": ranked.items[0].doc_id,
                "type": "teleport",
            },
            client.event(ranked.request_id, "never-shown-doc", "click"),
        ]
    )
    console.print(
        f"mixed batch: accepted {len(answer.accepted)}, rejected " + "; ".join(f"#{r.index}: {r.detail}" for r in answer.rejected)
    )


def run_demo(s: Settings, quick: bool, keep_running: bool) -> None:
    started = time.time()
    s.serving = s.serving.model_copy(update={"champion_poll_s": 5.0})
    s.retrain = s.retrain.model_copy(update={"check_s": float(SCHEDULER_CHECK_S)})
    if quick:  # smaller training: the whole demo took ~15 min on 2 cores with native bf16, ~27 min on AVX2 only
        s.retrain = s.retrain.model_copy(update={"min_new_labels": 7000})
        s.train = s.train.model_copy(update={"epochs": 1})
    console.rule("[bold]rankloop demo")
    with console.status("starting local infrastructure"):
        infra.up(s)
    _print_infra(s)
    ds = beir.load(s.dataset, s.state_dir / "datasets")
    console.print(f"dataset [bold]{ds.name}[/]: {len(ds.corpus)} documents, {len(ds.queries)} queries")
    with ProgressBar(console) as progress:
        build_index(ds, s.state_dir, progress=progress)
    fs = FirstStage.current(s.state_dir)
    user = UserModel(examination_curve(s.clicklog))
    labels = open_labels(s.label_store_url)

    env = worker_env(s)
    # serving gets one torch thread so a training run on the other core never starves it
    threads = {"serve": "1", "stream": "1", "schedule": str(os.cpu_count() or 2)}
    procs = {name: spawn(s, name, {**env, "RANKLOOP_TORCH_THREADS": threads[name]}) for name in threads}
    try:
        with console.status("waiting for the serving worker"):
            wait_healthy(s, procs)
        client = app_client(s)
        _show_rejection(client, client.rank(ds.queries[next(iter(ds.qrels("train")))]))
        start_version = client.rank("warm").model_version
        console.print(f"serving [bold]{start_version}[/]; simulating users on the train queries until a model is promoted")
        budget = (13 * 60 if quick else 60 * 60) - (time.time() - started)
        deadline = time.time() + budget
        round_, total_events, sessions = 0, 0, 300
        version = start_version
        while time.time() < deadline:
            round_ += 1
            stats = simulate(client, ds, "train", sessions, user, seed=round_)
            total_events += stats.accepted
            stored = labels.count()
            version = served_version(s)
            console.print(
                f"round {round_}: {stats.sessions} sessions, {stats.accepted} events accepted "
                f"({total_events} total), {stored} label revisions stored, serving {version}"
            )
            if version != start_version:
                break
            if stored >= s.retrain.min_new_labels:
                # a run that has started is let finish: on a 2-core AVX2-only CPU a quick run (fine-tune,
                # then embed the corpus with each challenger) took 18 min
                version = _wait_for_training(s, procs, max(deadline, time.time() + TRAINING_WAIT_S), start_version)
                if version != start_version:
                    break
        if version == start_version:
            raise DependencyUnavailable("no challenger was promoted within the time budget; see .rankloop/run/schedule.log")
        served = client.rank(ds.queries[next(iter(ds.qrels("test")))]).model_version
        console.print(f"[green]hot-swapped:[/] /rank now answers with model version [bold]{served}[/] (no restart)")
        _report(s, fs, ds, total_events, started)
    finally:
        if not keep_running:
            stop(procs)
            infra.down(s)


def _wait_for_training(s: Settings, procs: dict, deadline: float, start_version: str) -> str:
    """Waits while the scheduler trains (it holds the training lock), up to the deadline."""
    state = open_schedule_state(s.redis_url, s.keys)
    waiting = "the scheduler is training a challenger (see .rankloop/run/schedule.log)"
    with console.status(waiting) as shown:
        time.sleep(SCHEDULER_CHECK_S + 2)  # let the scheduler notice the labels and take the lock
        while time.time() < deadline:
            progress = training_progress(state.read())
            shown.update(f"training a challenger: {progress.describe()}" if progress else waiting)
            if procs["schedule"].poll() is not None:
                raise DependencyUnavailable("the scheduler exited; see .rankloop/run/schedule.log")
            version = served_version(s)
            if version != start_version:
                return version
            if not state.locked():
                # training finished: promoted versions show up within the serving poll interval
                time.sleep(8)
                return served_version(s)
            time.sleep(1)
    return start_version


def _print_infra(s: Settings) -> None:
    t = Table("component", "address", "state")
    for c in status(s):
        t.add_row(c.name, c.address, "[green]up[/]" if c.up else "[red]down[/]")
    console.print(t)


def _report(s: Settings, fs: FirstStage, ds: beir.Dataset, events: int, started: float) -> None:
    df, lineage = open_labels(s.label_store_url).read()
    console.rule("[bold]report")
    console.print(f"interaction events accepted: {events}")
    console.print(f"labels in the store: {len(df)} (by signal: {lineage.get('by_signal', {})})")
    console.print(f"dead letters: {message_count(s.kafka.address, s.keys.dead_letters)}")
    with console.status("evaluating every model version on the test queries"):
        rows = evaluate_versions(s, fs, ds)
    t = Table(
        "model version",
        "aliases",
        "test NDCG@10",
        "test MRR@10",
        "test Recall@100",
        "train-query NDCG@10",
        title=f"{ds.name}: test queries (never seen in training) and train queries (with feedback)",
    )
    for r in rows:
        m = r["test"]
        t.add_row(
            r["version"],
            ", ".join(r["aliases"]),
            f"{m['ndcg@10']:.4f}",
            f"{m['mrr@10']:.4f}",
            f"{m['recall@100']:.4f}",
            f"{r['train']['ndcg@10']:.4f}",
        )
    console.print(t)
    console.print(
        f"MLflow: {s.tracking_uri} (experiment '{s.keys.experiment}', model '{s.keys.model_name}'); browse it with `rankloop ui`"
    )
    console.print(
        f"with --keep-running: the status page at {s.control.url}/status, `rankloop schedule status`, "
        f"metrics at {s.base_url}/metrics (serving), :{s.stream.metrics_port}/metrics (stream), "
        f"{s.control.url}/metrics (control)"
    )
    console.print(f"done in {time.time() - started:.0f}s")
