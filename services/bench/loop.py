"""`rankloop bench loop`: does feedback make the ranking better, and by how much?

Runs the real loop — serve → events → stream → labels → train → gate → promote → hot swap — with
simulated users on the train split only, and evaluates every champion on the eval split, which never
feeds training, the gate or any tuning. Alongside, on the same candidates: BM25, dense and the hybrid
first stage; the full-information skyline (the same recipe fed the train qrels instead of clicks);
naive vs position-debiased learners on the final labels; and the propensity estimator's error.
The result is a `LoopBenchResult`, written as JSON with a Markdown summary and plots beside it.
"""

from __future__ import annotations

import itertools
import random
import shutil
import time
from pathlib import Path

import mlflow
from pydantic import AliasChoices, BaseModel, Field
from rich.console import Console

from schemas import FIRST_STAGE, LabelledExample
from services.cli.progress import ProgressBar
from services.config import Settings
from services.control.scheduler import impression_click_log, retrain, training_job
from services.local import infra
from services.local.simulate import UserModel, app_client, examination_curve, simulate
from services.local.workers import served_version, settle_labels, spawn, stop, wait_healthy, worker_env
from services.storage import open_labels, open_registry
from services.storage.memory import MemoryLabelStore
from training import beir, plots, self_check
from training.evaluate import evaluate_designs, evaluate_first_stage_parts, evaluate_ranker
from training.indexing import build_index
from training.labels.store import LabelStore
from training.pipeline import TrainOutcome, train_once
from training.propensity import estimate_examination, read_click_log
from training.ranking.first_stage import FirstStage
from training.ranking.rank import candidates_for
from training.ranking.reranker import Reranker
from training.registry import MlflowRegistry
from training.tuning import FUSION_ONLY, NO_MEMORY

console = Console()
WITHOUT_MEMORY = (NO_MEMORY, "learned combiner (no memory)")  # designs of `evaluate_designs`
Metrics = dict[str, float]


class BenchRound(BaseModel):
    round: int
    events: int
    labels: int
    model_version: str  # the champion after the round
    challenger_version: str | None
    promoted: bool
    gate: str
    gate_gain: float | None
    gate_p_value: float | None
    served_version: str
    eval: Metrics
    train: Metrics
    seconds: dict[str, float]


class PropensityReport(BaseModel):
    estimated: list[float]
    true: list[float]
    mae: float
    impressions: int
    explore_rate: float
    clicklog_estimated: list[float]


class BenchChecks(BaseModel):
    """The issue's targets, computed from the run itself."""

    final_champion_ndcg_at_10: float = Field(
        serialization_alias="final_champion_ndcg@10",
        validation_alias=AliasChoices("final_champion_ndcg_at_10", "final_champion_ndcg@10"),  # a written result reads back
    )
    share_of_skyline_lift: float | None
    eval_never_fell_at_a_promotion: bool
    train_queries_never_fell: bool
    propensity_mae: float
    # head-query mode (--train-queries): the seen queries' lift and the unseen ones' change, last champion vs hybrid
    head_queries_lift: float | None = None
    unseen_queries_change: float | None = None
    promoted_within_2_rounds: bool | None = None
    # the last champion's first stage alone, under the fusion it learned, vs the better of BM25 and dense alone
    learned_first_stage_ndcg_at_10: float | None = None
    learned_first_stage_reaches_best_part: bool | None = None
    learned_parts_without_memory_lift: float | None = None  # best design without the feedback memory, minus the hybrid


class LoopBenchResult(BaseModel):
    dataset: str
    eval_split: str
    train_split: str
    seed: int
    sessions_per_round: int
    train_queries: int | None = None  # head-query mode: simulated users asked only this many train queries
    baselines: dict[str, Metrics]
    baselines_train: dict[str, Metrics]
    skyline: Metrics
    skyline_train: Metrics
    rounds: list[BenchRound]
    designs: dict[str, dict] = {}
    propensity: PropensityReport
    final: dict[str, Metrics]
    final_train: dict[str, Metrics]
    final_winner_on_train_split: str | None  # None when the run skipped the learner comparison
    checks: BenchChecks
    timings: dict[str, float]


def _qrels_labels(ds: beir.Dataset, split: str, index_version: str) -> list[LabelledExample]:
    """The train qrels as labels, for the full-information skyline (graded: grade 2 is strong)."""
    out, t = [], 1.0
    for qid, docs in ds.qrels(split).items():
        query = ds.queries[qid]
        for doc, grade in docs.items():
            t += 1
            out.append(
                LabelledExample(
                    label_id=f"qrels-{qid}:{doc}",
                    revision=1,
                    request_id=f"qrels-{qid}",
                    query=query,
                    doc_id=doc,
                    position=1,
                    grade=min(2, grade),
                    weight=float(min(2, grade)),
                    propensity=1.0,
                    signals=["qrels"],
                    event_ids=[],
                    model_version="qrels",
                    index_version=index_version,
                    timestamp=t,
                )
            )
    return out


def run_loop_bench(
    s: Settings,
    train_split: str,
    eval_split: str,
    rounds: int,
    seed: int,
    sessions_per_round: int,
    out: Path,
    train_queries: int | None = None,
    compare_learners: bool = True,
) -> LoopBenchResult:
    """Runs the benchmark on its own local infrastructure, which is stopped afterwards, failed or not.
    `compare_learners=False` skips the two final trainings (naive vs debiased), a fifth of the time."""
    try:
        return _run(s, train_split, eval_split, rounds, seed, sessions_per_round, out, train_queries, compare_learners)
    finally:
        infra.down(s)


def _run(
    s: Settings,
    train_split: str,
    eval_split: str,
    rounds: int,
    seed: int,
    sessions_per_round: int,
    out: Path,
    train_queries: int | None,
    compare_learners: bool,
) -> LoopBenchResult:
    timings: dict[str, float] = {}
    t_all = time.time()
    infra.up(s)
    ds = beir.load(s.dataset, s.state_dir / "datasets")
    t = time.time()
    with ProgressBar(console) as progress:
        build_index(ds, s.state_dir, progress=progress)
    fs = FirstStage.current(s.state_dir)
    timings["index_s"] = time.time() - t
    if train_queries:
        ds, train_split = head_queries(ds, train_split, train_queries, seed, s.state_dir / "head-queries")
        console.print(f"head-query mode: users ask {train_queries} queries of the train split ({train_split})")
    registry = open_registry(s)
    depth = s.serving.rerank_depth
    labels = open_labels(s.label_store_url)
    user = UserModel(examination_curve(s.clicklog))
    cands = {split: candidates_for(fs, [ds.queries[q] for q in ds.qrels(split)]) for split in (eval_split, train_split)}

    def evaluate(reranker: Reranker | None) -> tuple[Metrics, Metrics]:
        return (
            evaluate_ranker(ds, eval_split, cands[eval_split], reranker, fs.text, depth),
            evaluate_ranker(ds, train_split, cands[train_split], reranker, fs.text, depth),
        )

    def side_registry(name: str) -> MlflowRegistry:
        return MlflowRegistry(registry.client, f"{s.deployment}-{name}", s.versions_dir / f"{s.deployment}-{name}")

    def load(reg: MlflowRegistry, version: str) -> Reranker:
        return Reranker(reg.fetch(reg.get(version)), version).warm(fs)

    baselines = evaluate_first_stage_parts(ds, eval_split, cands[eval_split])
    baselines_train = evaluate_first_stage_parts(ds, train_split, cands[train_split])
    self_check.check_figures(fs, eval_split, baselines["hybrid"])
    self_check.check_figures(fs, train_split, baselines_train["hybrid"])
    console.print(f"baselines on {eval_split}: " + ", ".join(f"{k} {v['ndcg@10']:.4f}" for k, v in baselines.items()))

    t = time.time()
    sky_registry = side_registry("skyline")
    naive = s.model_copy(update={"train": s.train.model_copy(update={"debias": "naive"})})  # qrels have no position bias
    sky = retrain_side(sky_registry, MemoryLabelStore(_qrels_labels(ds, train_split, fs.version)), fs, naive, depth)
    skyline, skyline_train = evaluate(load(sky_registry, str(sky.version)))
    timings["skyline_s"] = time.time() - t
    console.print(f"skyline (train qrels): {skyline['ndcg@10']:.4f}")

    s.serving = s.serving.model_copy(update={"champion_poll_s": 5.0, "explore_seed": seed})
    env = worker_env(s, RANKLOOP_TORCH_THREADS="1")
    procs = {name: spawn(s, name, env) for name in ("serve", "stream")}
    round_results: list[BenchRound] = []
    reranker = None
    try:
        wait_healthy(s, procs)
        sdk = app_client(s)
        events = 0
        for r in range(1, rounds + 1):
            t = time.time()
            # one session at a time: requests reach serving in session order, so the time-ordered
            # train/tune/gate slices hold the same requests in a re-run with the same seed
            stats = simulate(sdk, ds, train_split, sessions_per_round, user, seed=seed * 1000 + r, concurrency=1)
            events += stats.accepted
            n_labels = settle_labels(s, labels)
            t_train = time.time()
            done = retrain(s, labels=labels, first_stage=fs, registry=registry)
            outcome = done.outcome
            if done.fate == "promoted":
                deadline = time.time() + 120
                while served_version(s) != outcome.version and time.time() < deadline:
                    time.sleep(1)
            t_served = time.time()  # the round ends here; rating its champion is the bench's own work
            champion = registry.champion()
            reranker = Reranker(registry.fetch(champion), champion.version).warm(fs) if champion else None
            ev, tr = evaluate(reranker)
            gate = outcome.gate
            round_results.append(
                BenchRound(
                    round=r,
                    events=events,
                    labels=n_labels,
                    model_version=champion.version if champion else FIRST_STAGE,
                    challenger_version=outcome.version,
                    promoted=done.fate == "promoted",
                    gate=outcome.message,
                    gate_gain=gate.mean_gain if gate else None,
                    gate_p_value=gate.p_value if gate else None,
                    served_version=served_version(s),
                    eval=ev,
                    train=tr,
                    seconds={
                        "simulate_and_label": t_train - t,
                        "train_and_gate": t_served - t_train,
                        "evaluate": time.time() - t_served,
                    },
                )
            )
            console.print(
                f"round {r}: {n_labels} labels, {done.fate} ({outcome.message}); champion "
                f"{round_results[-1].model_version}: {eval_split} NDCG@10 {ev['ndcg@10']:.4f}, "
                f"{train_split} {tr['ndcg@10']:.4f}"
            )
    finally:
        stop(procs)
    timings["loop_s"] = sum(sum(r.seconds.values()) for r in round_results)
    designs = evaluate_designs(ds, eval_split, cands[eval_split], reranker, fs.text, depth) if reranker else {}

    truth = user.examination
    logged = impression_click_log(s, labels)
    est = estimate_examination(logged["query"], logged["doc_id"], logged["position"], logged["clicked"])
    log = read_click_log(s.clicklog / "impressions.tsv.gz")
    real = estimate_examination(log.query_id, log.doc_id, log.position, log.clicked)
    propensity = PropensityReport(
        estimated=est.examination,
        true=truth,
        mae=round(est.mae(truth), 4),
        impressions=est.impressions,
        explore_rate=s.serving.explore_rate,
        clicklog_estimated=real.examination,
    )
    console.print(f"propensity from our logs: MAE {propensity.mae:.4f} vs the simulator's curve")

    # Naive vs debiased on the same final labels; the debiased learner weights by the curve just
    # estimated from our logs. The default learner is the one that wins on the train split.
    t = time.time()
    final, final_train = {}, {}
    for mode, name in (("naive", "naive"), ("ips", "debiased")) if compare_learners else ():
        reg = side_registry(f"final-{mode}")
        cfg = s.train.model_copy(update={"debias": mode})
        o = retrain_side(
            reg, labels, fs, s.model_copy(update={"train": cfg}), depth, examination=est.examination if mode == "ips" else None
        )
        final[name], final_train[name] = evaluate(load(reg, str(o.version)))
    if compare_learners:
        timings["final_s"] = time.time() - t
    timings["total_s"] = time.time() - t_all
    result = LoopBenchResult(
        dataset=ds.name,
        eval_split=eval_split,
        train_split=train_split,
        seed=seed,
        sessions_per_round=sessions_per_round,
        train_queries=train_queries,
        baselines=baselines,
        baselines_train=baselines_train,
        skyline=skyline,
        skyline_train=skyline_train,
        rounds=round_results,
        designs=designs,
        propensity=propensity,
        final=final,
        final_train=final_train,
        final_winner_on_train_split=max(final_train, key=lambda k: final_train[k]["ndcg@10"]) if final_train else None,
        checks=checks(baselines, skyline, baselines_train, round_results, propensity, bool(train_queries), designs),
        timings={k: round(v, 1) for k, v in timings.items()},
    )
    write(result, out)
    log_to_mlflow(registry, result, out, s.artifact_dir / "bench")
    return result


def retrain_side(
    registry: MlflowRegistry, labels: LabelStore, fs: FirstStage, s: Settings, depth: int, examination: list[float] | None = None
) -> TrainOutcome:
    """A training that is never promoted: the skyline and the final learners."""
    job = training_job(s, examination).model_copy(update={"depth": depth})
    return train_once(registry, labels, fs, job)


def checks(
    baselines: dict[str, Metrics],
    skyline: Metrics,
    baselines_train: dict[str, Metrics],
    rounds: list[BenchRound],
    propensity: PropensityReport,
    head_mode: bool = False,
    designs: dict[str, dict] | None = None,
) -> BenchChecks:
    hybrid = baselines["hybrid"]["ndcg@10"]
    champions = [r for r in rounds if r.model_version != FIRST_STAGE]
    last = champions[-1].eval["ndcg@10"] if champions else hybrid
    sky_lift = skyline["ndcg@10"] - hybrid
    evals = [hybrid] + [r.eval["ndcg@10"] for r in champions]
    trains = [baselines_train["hybrid"]["ndcg@10"]] + [r.train["ndcg@10"] for r in champions]
    fusion_only = (designs or {}).get(FUSION_ONLY)
    learned = fusion_only["ndcg@10"] if fusion_only else None
    best_part = max(baselines["bm25"]["ndcg@10"], baselines["dense"]["ndcg@10"])
    alone = [v["ndcg@10"] for k, v in (designs or {}).items() if k in WITHOUT_MEMORY]
    return BenchChecks(
        final_champion_ndcg_at_10=last,
        share_of_skyline_lift=round((last - hybrid) / sky_lift, 4) if sky_lift > 0 else None,
        eval_never_fell_at_a_promotion=all(b >= a - 1e-9 for a, b in itertools.pairwise(evals)),
        train_queries_never_fell=all(b >= a - 1e-9 for a, b in itertools.pairwise(trains)),
        propensity_mae=propensity.mae,
        head_queries_lift=round(trains[-1] - trains[0], 4) if head_mode else None,
        unseen_queries_change=round(last - hybrid, 4) if head_mode else None,
        promoted_within_2_rounds=any(r.promoted for r in rounds[:2]) if head_mode else None,
        learned_first_stage_ndcg_at_10=learned,
        learned_first_stage_reaches_best_part=None if learned is None else learned >= best_part - 1e-9,
        learned_parts_without_memory_lift=round(max(alone) - hybrid, 4) if alone else None,
    )


def head_queries(ds: beir.Dataset, split: str, n: int, seed: int, folder: Path) -> tuple[beir.Dataset, str]:
    """`n` queries of `split` (a seeded choice) as a split of their own, `<split>-head<n>`: traffic with
    few distinct queries, each asked many times. The other splits are copied beside it unchanged."""
    qrels = ds.qrels(split)
    qids = sorted(qrels)
    random.Random(seed).shuffle(qids)
    name = f"{split}-head{n}"
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    for other in (ds.path / "qrels").glob("*.tsv"):
        shutil.copyfile(other, folder / "qrels" / other.name)
    rows = [f"{q}\t{d}\t{g}" for q in sorted(qids[:n]) for d, g in qrels[q].items()]
    (folder / "qrels" / f"{name}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(rows) + "\n")
    return beir.Dataset(name=ds.name, path=folder, corpus=ds.corpus, queries=ds.queries), name


def log_to_mlflow(registry: MlflowRegistry, result: LoopBenchResult, out: Path, artifact_dir: Path) -> None:
    """One MLflow run per benchmark: the metric by round as steps, the summary, plots and JSON."""
    client = registry.client
    stem = out.with_suffix("")
    exp = client.get_experiment_by_name("rankloop-bench")
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment("rankloop-bench", artifact_location=artifact_dir.resolve().as_uri())
    )

    def key(name: str) -> str:
        return name.replace("@", "_at_")  # MLflow metric names allow no "@"

    with mlflow.start_run(experiment_id=exp_id, run_name=f"bench-loop-{result.dataset}"):
        mlflow.log_params({k: getattr(result, k) for k in ("dataset", "eval_split", "train_split", "seed", "sessions_per_round")})
        for r in result.rounds:
            mlflow.log_metrics(
                {key(f"eval_{k}"): v for k, v in r.eval.items()} | {key(f"train_{k}"): v for k, v in r.train.items()},
                step=r.round,
            )
        mlflow.log_metrics(
            {key(f"check_{k}"): float(v) for k, v in result.checks.model_dump(by_alias=True).items() if v is not None}
        )
        for path in (out, Path(f"{stem}.md"), Path(f"{stem}-rounds.png"), Path(f"{stem}-propensity.png")):
            mlflow.log_artifact(str(path))


def write(result: LoopBenchResult, out: Path) -> None:
    """The JSON, a Markdown summary and two plots beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.model_dump_json(indent=2, by_alias=True))
    stem = out.with_suffix("")
    hybrid = result.baselines["hybrid"]["ndcg@10"]
    plots.loop_rounds(
        Path(f"{stem}-rounds.png"),
        f"{result.dataset}: metric by round",
        f"champion, {result.eval_split}",
        f"champion, {result.train_split} (feedback queries)",
        [hybrid] + [r.eval["ndcg@10"] for r in result.rounds],
        [result.baselines_train["hybrid"]["ndcg@10"]] + [r.train["ndcg@10"] for r in result.rounds],
        hybrid,
        result.skyline["ndcg@10"],
    )
    p = result.propensity
    plots.examination_curves(
        {"true (simulator)": p.true, "EM on our labels": p.estimated, "EM on Yandex click log": p.clicklog_estimated},
        Path(f"{stem}-propensity.png"),
        f"examination by position (MAE vs true {p.mae:.3f})",
    )

    def row(name: str, m: Metrics) -> str:
        return f"| {name} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['accuracy@1']:.4f} | {m['recall@100']:.4f} |"

    lines = [
        f"# Loop benchmark: {result.dataset} ({result.eval_split} queries)",
        "",
        "| ranker | NDCG@10 | MRR@10 | Acc@1 | Recall@100 |",
        "|---|---|---|---|---|",
    ]
    lines += [row(k, v) for k, v in result.baselines.items()]
    lines += [row("skyline (train qrels)", result.skyline)]
    lines += [row(f"round {r.round} champion v{r.model_version}", r.eval) for r in result.rounds]
    lines += [row(f"final, {k} labels", v) for k, v in result.final.items()]
    lines += [row(f"final champion as: {k}", v) for k, v in result.designs.items()]
    if result.designs:
        lines += ["", "| final champion as | NDCG@10 | on unfamiliar queries | unfamiliar queries |", "|---|---|---|---|"]
        lines += [
            f"| {k} | {v['ndcg@10']:.4f} | {v.get('ndcg@10 unfamiliar')} | {v.get('unfamiliar_queries')} |"
            for k, v in result.designs.items()
        ]
    if result.final_winner_on_train_split:
        lines += [
            "",
            "On the train split (the feedback queries) the final learners score "
            + ", ".join(f"{k} {v['ndcg@10']:.4f}" for k, v in result.final_train.items())
            + f": the default learner is **{result.final_winner_on_train_split}**.",
        ]
    lines += [
        "",
        "| check | value |",
        "|---|---|",
    ] + [f"| {k} | {v} |" for k, v in result.checks.model_dump(by_alias=True).items()]
    lines += [
        "",
        f"Propensity MAE vs the simulator's curve: {p.mae:.4f}",
        "",
        f"![rounds]({Path(f'{stem}-rounds.png').name}) ![propensity]({Path(f'{stem}-propensity.png').name})",
        "",
        f"Timings (s): {result.timings}",
    ]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
