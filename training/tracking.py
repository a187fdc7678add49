"""What a training run writes to MLflow, so an ML engineer can review it from the UI: inputs and
lineage, the fit, the mix grid, the gate with its per-query table and plots, the metric by round."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import matplotlib.pyplot as plt
import mlflow
from mlflow import MlflowClient

from training import plots
from training.config import GateConfig, TrainConfig
from training.gate import GateResult
from training.labels.feedback import QueryFeedback
from training.labels.rules import LabelRules
from training.labels.store import Lineage
from training.ranking.query import query_key
from training.ranking.reranker import Mix
from training.train import FitStats

MODEL_NAME_TAG = "rankloop.model_name"


def log_inputs(
    model_name: str,
    cfg: TrainConfig,
    gate_cfg: GateConfig,
    rules: LabelRules,
    lineage: Lineage,
    labels: int,
    examples: int,
    selection: dict[str, int],
    warm_start: str,
    estimated_curve: bool,
) -> None:
    mlflow.log_params(
        {
            **cfg.model_dump(),
            **{f"gate_{k}": v for k, v in gate_cfg.model_dump().items()},
            "warm_start": warm_start,
            "examples": examples,
            **selection,
        }
    )
    mlflow.log_dict(lineage, "lineage.json")
    mlflow.log_dict(rules.model_dump(), "label_rules.json")
    mlflow.log_metrics(
        {"labels": labels, "train_examples": examples, **{f"labels_{k}": v for k, v in lineage.get("by_signal", {}).items()}}
    )
    mlflow.set_tags(
        {
            MODEL_NAME_TAG: model_name,
            "examination": "estimated from our logs" if estimated_curve else "configured",
            "label_offsets": json.dumps(lineage.get("offsets", {})),
        }
    )


def log_fit(stats: FitStats, seconds: float) -> None:
    mlflow.log_metrics({"train_loss_first": stats.loss_first, "train_loss_last": stats.loss_last, "train_seconds": seconds})


def log_tuning(grid: dict[Mix, float], chosen: Mix, memory_queries: int) -> None:
    mlflow.log_dict({f"alpha={m.alpha} beta={m.beta} tau={m.tau}": v for m, v in grid.items()}, "tune_grid.json")
    mlflow.log_params({**chosen.as_dict(), "memory_queries": memory_queries})
    mlflow.log_metric("tune_ndcg10", grid[chosen])


def log_gate(
    feedback: list[QueryFeedback], champion: dict[str, float], challenger: dict[str, float], gate: GateResult, rules: LabelRules
) -> None:
    """Gate metrics, the per-query before/after table and plots."""
    mlflow.log_metrics(
        {
            "gate_champion_ndcg10": gate.champion_mean,
            "gate_challenger_ndcg10": gate.challenger_mean,
            "gate_gain": gate.mean_gain,
            "gate_p_value": gate.p_value,
            "gate_queries": gate.queries,
            "gate_wins": gate.wins,
            "gate_losses": gate.losses,
            "gate_passed": float(gate.passed),
        }
    )
    mlflow.set_tag("gate_reason", gate.reason)
    rows: list[dict[str, Any]] = [
        {
            "query": fb.query,
            "champion_ndcg@10": round(champion.get(query_key(fb.query), 0.0), 4),
            "challenger_ndcg@10": round(challenger.get(query_key(fb.query), 0.0), 4),
        }
        for fb in feedback
    ]
    for r in rows:
        r["delta"] = round(r["challenger_ndcg@10"] - r["champion_ndcg@10"], 4)
    mlflow.log_table(
        {k: [r[k] for r in rows] for k in ("query", "champion_ndcg@10", "challenger_ndcg@10", "delta")}, "gate_per_query.json"
    )
    mlflow.log_dict(asdict(gate), "gate.json")
    for name, fig in (
        ("gate.png", plots.gate_figure(gate, [r["delta"] for r in rows])),
        ("propensity.png", plots.examination_figure(rules.examination)),
    ):
        mlflow.log_figure(fig, name)
        plt.close(fig)


def log_history(client: MlflowClient, model_name: str, run_id: str, gate: GateResult) -> None:
    """The gate metric of every training round of this model so far, this one last, as a plot."""
    run = client.get_run(run_id)
    earlier = client.search_runs(
        [run.info.experiment_id],
        f"tags.`{MODEL_NAME_TAG}` = '{model_name}'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    rounds = [r for r in earlier if r.info.run_id != run_id and "gate_challenger_ndcg10" in r.data.metrics]
    champion = [r.data.metrics["gate_champion_ndcg10"] for r in rounds] + [gate.champion_mean]
    challenger = [r.data.metrics["gate_challenger_ndcg10"] for r in rounds] + [gate.challenger_mean]
    promoted = [r.data.tags.get("outcome") == "promoted" for r in rounds] + [gate.passed]
    fig = plots.rounds_figure(f"{model_name}: metric by round", champion, challenger, promoted)
    mlflow.log_figure(fig, "metric_by_round.png")
    plt.close(fig)
    mlflow.log_dict(
        {
            "round": list(range(1, len(challenger) + 1)),
            "champion_ndcg@10": champion,
            "challenger_ndcg@10": challenger,
            "promoted": promoted,
        },
        "metric_by_round.json",
    )
