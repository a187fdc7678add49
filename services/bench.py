"""`rankloop bench loop`: does feedback make the ranking better, and by how much?

Runs the real loop — serve → events → stream → labels → train → gate → promote → hot swap — with
simulated users on the train split only, and evaluates every champion on the eval split, which never
feeds training, the gate or any tuning. Alongside, on the same candidates: BM25, dense and the hybrid
first stage; the full-information skyline (the same recipe fed the train qrels instead of clicks);
naive vs position-debiased learners on the final labels; and the propensity estimator's error.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
from rich.console import Console

from schemas import LabelledExample
from services import infra
from services.config import Settings
from services.scheduler import retrain
from services.sdk import RankloopClient
from services.bus import impression_click_log
from services.simulate import CLICKLOG_STATS, UserModel, examination_curve, simulate
from services.workers import served_version, spawn, stop, wait_healthy, worker_env
from training import beir, registry
from training.dataset import read_labels, write_shard
from training.evaluate import evaluate_designs, evaluate_first_stage_parts, evaluate_ranker
from training.pipeline import train_once
from training.propensity import estimate_examination, plot_curves, read_click_log
from training.reranker import Reranker
from training.retrieval import FirstStage, build_index
from training.train import candidates_for

console = Console()


def _settle_labels(s: Settings, timeout: float = 120.0) -> int:
    """Waits until the label store stops growing (the stream has caught up)."""
    last, stable_since, deadline = -1, time.time(), time.time() + timeout
    while time.time() < deadline:
        n = len(read_labels(s.label_dir)[0])
        if n != last:
            last, stable_since = n, time.time()
        elif time.time() - stable_since > 4:
            return n
        time.sleep(1)
    return last


def _qrels_labels(ds: beir.Dataset, split: str, fs: FirstStage) -> list[LabelledExample]:
    """The train qrels as labels, for the full-information skyline (graded: grade 2 is strong)."""
    out, t = [], 1.0
    for qid, docs in ds.qrels(split).items():
        query = ds.queries[qid]
        for doc, grade in docs.items():
            t += 1
            out.append(LabelledExample(
                label_id=f"qrels-{qid}:{doc}", revision=1, request_id=f"qrels-{qid}", query=query, doc_id=doc,
                position=1, grade=min(2, grade), weight=float(min(2, grade)), propensity=1.0, signals=["qrels"],
                event_ids=[], model_version="qrels", index_version=fs.version, timestamp=t))
    return out


def run_loop_bench(s: Settings, dataset: str, train_split: str, eval_split: str, rounds: int, seed: int,
                   sessions_per_round: int, out: Path) -> dict:
    """Runs the benchmark on its own local infrastructure, which is stopped afterwards, failed or not."""
    try:
        return _run(s, dataset, train_split, eval_split, rounds, seed, sessions_per_round, out)
    finally:
        infra.down(s)


def _run(s: Settings, dataset: str, train_split: str, eval_split: str, rounds: int, seed: int,
         sessions_per_round: int, out: Path) -> dict:
    timings: dict[str, float] = {}
    t_all = time.time()
    infra.up(s)
    ds = beir.load(dataset, s.state_dir / "datasets")
    t = time.time()
    build_index(ds, s.state_dir)
    fs = FirstStage.current(s.state_dir)
    timings["index_s"] = time.time() - t
    client = registry.connect(s.tracking_uri, s.artifact_dir)
    depth = s.train.rerank_depth
    cands = {split: candidates_for(fs, [ds.queries[q] for q in ds.qrels(split)]) for split in (eval_split, train_split)}

    def evaluate(reranker: Reranker | None) -> tuple[dict, dict]:
        return (evaluate_ranker(ds, eval_split, cands[eval_split], reranker, fs.text, depth),
                evaluate_ranker(ds, train_split, cands[train_split], reranker, fs.text, depth))

    def load(name: str, version: str) -> Reranker:
        source = client.get_model_version(name, version).source
        return Reranker(registry.download(source, s.state_dir / "versions" / f"{name}-{version}"), version)

    result: dict = {"dataset": ds.name, "eval_split": eval_split, "train_split": train_split, "seed": seed,
                    "sessions_per_round": sessions_per_round}
    result["baselines"] = evaluate_first_stage_parts(ds, eval_split, cands[eval_split])
    result["baselines_train"] = evaluate_first_stage_parts(ds, train_split, cands[train_split])
    console.print(f"baselines on {eval_split}: " + ", ".join(f"{k} {v['ndcg@10']:.4f}" for k, v in result["baselines"].items()))

    t = time.time()
    sky_dir = s.state_dir / "skyline-labels"
    write_shard(_qrels_labels(ds, train_split, fs), sky_dir, 0, 0, 0)
    sky = train_once(client, "rankloop-skyline", sky_dir, fs, fs.text, s.state_dir, s.train, s.label_rules, auto_promote=False)
    result["skyline"], result["skyline_train"] = evaluate(load("rankloop-skyline", sky.version))
    timings["skyline_s"] = time.time() - t
    console.print(f"skyline (train qrels): {result['skyline']['ndcg@10']:.4f}")

    env = worker_env(s, RANKLOOP_TORCH_THREADS="1")
    procs = {name: spawn(s, name, env) for name in ("serve", "stream")}
    result["rounds"], reranker = [], None
    try:
        wait_healthy(s, procs)
        sdk = RankloopClient(s.base_url)
        events = 0
        for r in range(1, rounds + 1):
            t = time.time()
            stats = simulate(sdk, ds, train_split, sessions_per_round, seed=seed * 1000 + r)
            events += stats.accepted
            labels = _settle_labels(s)
            t_train = time.time()
            outcome = retrain(s, fs)
            if outcome.status == "promoted":
                deadline = time.time() + 120
                while served_version(s) != outcome.version and time.time() < deadline:
                    time.sleep(1)
            champion = registry.champion(client, s.model_name)
            reranker = load(s.model_name, champion.version) if champion else None
            ev, tr = evaluate(reranker)
            gate = outcome.gate
            result["rounds"].append({
                "round": r, "events": events, "labels": labels, "model_version": champion.version if champion else "first-stage",
                "challenger_version": outcome.version, "promoted": outcome.status == "promoted", "gate": outcome.message,
                "gate_gain": gate.mean_gain if gate else None, "gate_p_value": gate.p_value if gate else None,
                "served_version": served_version(s), "eval": ev, "train": tr,
                "seconds": {"simulate_and_label": t_train - t, "train_and_gate": time.time() - t_train},
            })
            console.print(f"round {r}: {labels} labels, {outcome.status} ({outcome.message}); champion "
                          f"{result['rounds'][-1]['model_version']}: {eval_split} NDCG@10 {ev['ndcg@10']:.4f}, "
                          f"{train_split} {tr['ndcg@10']:.4f}")
    finally:
        stop(procs)
    timings["loop_s"] = sum(sum(r["seconds"].values()) for r in result["rounds"])
    if reranker is not None:
        result["designs"] = evaluate_designs(ds, eval_split, cands[eval_split], reranker, fs.text, depth)

    truth = UserModel(examination_curve()).examination
    logged = impression_click_log(s)
    est = estimate_examination(logged["query"], logged["doc_id"], logged["position"], logged["clicked"])
    log = read_click_log(CLICKLOG_STATS.parent / "impressions.tsv.gz")
    real = estimate_examination(log.query_id, log.doc_id, log.position, log.clicked)
    result["propensity"] = {"estimated": est.examination, "true": truth, "mae": round(est.mae(truth), 4),
                            "impressions": est.impressions, "explore_rate": s.explore_rate,
                            "clicklog_estimated": real.examination}
    console.print(f"propensity from our logs: MAE {est.mae(truth):.4f} vs the simulator's curve")

    # Naive vs debiased on the same final labels; the debiased learner weights by the curve just
    # estimated from our logs. The default learner is the one that wins on the train split.
    t = time.time()
    final, final_train = {}, {}
    for mode, key in (("naive", "naive"), ("ips", "debiased")):
        name = f"rankloop-final-{mode}"
        o = train_once(client, name, s.label_dir, fs, fs.text, s.state_dir, s.train.model_copy(update={"debias": mode}),
                       s.label_rules, auto_promote=False, examination=est.examination if mode == "ips" else None)
        final[key], final_train[key] = evaluate(load(name, o.version))
    result["final"] = final
    result["final_train"] = final_train
    result["final_winner_on_train_split"] = max(final_train, key=lambda k: final_train[k]["ndcg@10"])
    timings["final_s"] = time.time() - t
    result["checks"] = _checks(result)
    timings["total_s"] = time.time() - t_all
    result["timings"] = {k: round(v, 1) for k, v in timings.items()}
    _write(result, out)
    _log_to_mlflow(client, result, out, s.artifact_dir / "bench")
    return result


def _checks(result: dict) -> dict:
    """The issue's targets, computed from the run itself."""
    hybrid = result["baselines"]["hybrid"]["ndcg@10"]
    champions = [r for r in result["rounds"] if r["model_version"] != "first-stage"]
    last = champions[-1]["eval"]["ndcg@10"] if champions else hybrid
    sky_lift = result["skyline"]["ndcg@10"] - hybrid
    evals = [hybrid] + [r["eval"]["ndcg@10"] for r in champions]
    trains = [result["baselines_train"]["hybrid"]["ndcg@10"]] + [r["train"]["ndcg@10"] for r in champions]
    return {
        "final_champion_ndcg@10": last,
        "share_of_skyline_lift": round((last - hybrid) / sky_lift, 4) if sky_lift > 0 else None,
        "eval_never_fell_at_a_promotion": all(b >= a - 1e-9 for a, b in zip(evals, evals[1:])),
        "train_queries_never_fell": all(b >= a - 1e-9 for a, b in zip(trains, trains[1:])),
        "propensity_mae": result["propensity"]["mae"],
    }


def _log_to_mlflow(client, result: dict, out: Path, artifact_dir: Path) -> None:
    """One MLflow run per benchmark: the metric by round as steps, the summary, plots and JSON."""
    stem = out.with_suffix("")
    exp = client.get_experiment_by_name("rankloop-bench")
    exp_id = exp.experiment_id if exp else client.create_experiment("rankloop-bench", artifact_location=artifact_dir.resolve().as_uri())
    with mlflow.start_run(experiment_id=exp_id, run_name=f"bench-loop-{result['dataset']}"):
        mlflow.log_params({k: result[k] for k in ("dataset", "eval_split", "train_split", "seed", "sessions_per_round")})
        def key(name: str) -> str:
            return name.replace("@", "_at_")  # MLflow metric names allow no "@"

        for r in result["rounds"]:
            mlflow.log_metrics({key(f"eval_{k}"): v for k, v in r["eval"].items()}
                               | {key(f"train_{k}"): v for k, v in r["train"].items()}, step=r["round"])
        mlflow.log_metrics({key(f"check_{k}"): float(v) for k, v in result["checks"].items() if v is not None})
        for path in (out, Path(f"{stem}.md"), Path(f"{stem}-rounds.png"), Path(f"{stem}-propensity.png")):
            mlflow.log_artifact(str(path))


def _write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    stem = out.with_suffix("")
    rounds = result["rounds"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [0] + [r["round"] for r in rounds]
    hybrid = result["baselines"]["hybrid"]["ndcg@10"]
    ax.plot(xs, [hybrid] + [r["eval"]["ndcg@10"] for r in rounds], marker="o", label=f"champion, {result['eval_split']}")
    ax.plot(xs, [result["baselines_train"]["hybrid"]["ndcg@10"]] + [r["train"]["ndcg@10"] for r in rounds], marker="s",
            label=f"champion, {result['train_split']} (feedback queries)")
    ax.axhline(hybrid, color="grey", ls="--", label="hybrid first stage")
    ax.axhline(result["skyline"]["ndcg@10"], color="green", ls=":", label="full-information skyline")
    ax.set_xlabel("round"), ax.set_ylabel("NDCG@10"), ax.set_title(f"{result['dataset']}: metric by round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{stem}-rounds.png", dpi=120)
    plt.close(fig)
    p = result["propensity"]
    plot_curves({"true (simulator)": p["true"], "EM on our labels": p["estimated"], "EM on Yandex click log": p["clicklog_estimated"]},
                Path(f"{stem}-propensity.png"), f"examination by position (MAE vs true {p['mae']:.3f})")

    def row(name, m):
        return f"| {name} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['accuracy@1']:.4f} | {m['recall@100']:.4f} |"

    lines = [f"# Loop benchmark: {result['dataset']} ({result['eval_split']} queries)", "",
             "| ranker | NDCG@10 | MRR@10 | Acc@1 | Recall@100 |", "|---|---|---|---|---|"]
    lines += [row(k, v) for k, v in result["baselines"].items()]
    lines += [row("skyline (train qrels)", result["skyline"])]
    lines += [row(f"round {r['round']} champion v{r['model_version']}", r["eval"]) for r in rounds]
    lines += [row(f"final, {k} labels", v) for k, v in result["final"].items()]
    lines += [row(f"final champion as: {k}", v) for k, v in result.get("designs", {}).items()]
    lines += ["", "On the train split (the feedback queries) the final learners score "
              + ", ".join(f"{k} {v['ndcg@10']:.4f}" for k, v in result["final_train"].items())
              + f": the default learner is **{result['final_winner_on_train_split']}**.", "",
              "| check | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in result["checks"].items()]
    lines += ["", f"Propensity MAE vs the simulator's curve: {p['mae']:.4f}", "",
              f"![rounds]({Path(f'{stem}-rounds.png').name}) ![propensity]({Path(f'{stem}-propensity.png').name})", "",
              f"Timings (s): {result['timings']}"]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
