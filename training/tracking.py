"""What a training run writes to MLflow, so an ML engineer can review it from the UI: inputs and
lineage, the fit, the mix grid, the gate with its per-query table and plots, the metric by round."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import LoggedModelOutput, Metric
from mlflow.models import Model, infer_signature
from mlflow.models.utils import _save_example

from training.config import GateConfig, TrainConfig
from training.gate import GateReport, GateResult
from training.labels.feedback import QueryFeedback
from training.labels.rules import LabelRules
from training.labels.store import Lineage
from training.model_card import ModelCard, QueryChange, moves
from training.ranking.query import query_key
from training.ranking.reranker import Mix
from training.train import FitStats
from training.tuning import CombinerChoice, TunedMixes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EXAMPLE_INPUT = pd.DataFrame(
    {
        "query": ["vitamin d and bone density"],
        "document": ["Vitamin D supplementation in older adults: effects on bone mineral density. A randomised trial ..."],
    }
)


MODEL_NAME_TAG = "rankloop.model_name"
DATASET_COLUMNS = ("label_id", "revision", "request_id", "query", "doc_id", "position", "grade", "timestamp", "identity")


def log_inputs(
    df: pd.DataFrame,
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
    columns = [c for c in DATASET_COLUMNS if c in df.columns]
    source = str(lineage.get("location", "memory"))
    if lineage.get("table_version") is not None:  # the exact labels: `rankloop labels show --version N`
        source = f"{source}@v{lineage['table_version']}"
    with warnings.catch_warnings():  # two notes that do not apply to a label table (read by `labels show`, not served)
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")  # none missing
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        mlflow.log_input(from_pandas(df[columns], source=source, name="labels"), context="training")
    mlflow.log_dict(rules.model_dump(), "label_rules.json")
    mlflow.log_metrics(
        {
            "labels": labels,
            "label_contributions": lineage.get("contributions", labels),  # what the scheduler counts
            "train_examples": examples,
            **{f"labels_{k}": v for k, v in lineage.get("by_signal", {}).items()},
        }
    )
    mlflow.set_tags(
        {
            MODEL_NAME_TAG: model_name,
            "examination": "estimated from our logs" if estimated_curve else "configured",
            "label_table": source,
        }
    )


def log_debias(held_out: dict[str, float], chosen: str, carried_from: str | None = None) -> None:
    """Which learner the run kept (`train.debias=auto` fits the naive and the debiased one, or carries
    the champion's choice: `debias_carried_from` names that version)."""
    mlflow.log_param("debias_chosen", chosen)
    if carried_from:
        mlflow.log_param("debias_carried_from", carried_from)
    if len(held_out) > 1:
        mlflow.log_metrics({f"tune_clicks_ndcg10_{mode}": v for mode, v in held_out.items()})


def log_fit(stats: FitStats, seconds: float) -> None:
    """The loss of every optimiser step (a curve in the run's charts), and its first and last."""
    now = int(time.time() * 1000)
    run = mlflow.active_run()
    assert run is not None
    steps = [Metric("train_loss", loss, now, i) for i, loss in enumerate(stats.losses)]
    for start in range(0, len(steps), 1000):  # MLflow takes at most 1000 metrics per batch
        MlflowClient().log_batch(run.info.run_id, metrics=steps[start : start + 1000], synchronous=True)
    mlflow.log_metrics({"train_loss_first": stats.loss_first, "train_loss_last": stats.loss_last, "train_seconds": seconds})


def log_combiner(choice: CombinerChoice) -> None:
    """Whether the learned combiner replaced the mixes, both held-out figures, and what it weighs."""
    mlflow.log_param("scorer", "combiner" if choice.kept else "mix")
    figures = {"combiner_tune_queries": choice.queries, "mix_tune_ndcg10": choice.mix_ndcg}
    if choice.held_out_ndcg is not None:
        figures["combiner_held_out_ndcg10"] = choice.held_out_ndcg
    mlflow.log_metrics(figures)
    if choice.combiner is not None and choice.without_memory is not None:
        importance = {"with memory": choice.combiner.importance(), "without memory": choice.without_memory.importance()}
        mlflow.log_dict(importance, "combiner_importance.json")


def log_tuning(mixes: TunedMixes, memory_queries: int, served_memory_queries: int) -> None:
    """Both grids, both chosen mixes, how many tune queries each was chosen on, and the feedback
    memory's size as measured (train slice) and as served (every label)."""

    def named(grid: dict[Mix, float]) -> dict[str, float]:
        return {f"alpha={m.alpha} beta={m.beta} tau={m.tau} bm25_weight={m.bm25_weight}": v for m, v in grid.items()}

    chosen = mixes.familiar.mix
    mlflow.log_dict({"familiar": named(mixes.familiar.grid), "unfamiliar": named(mixes.unfamiliar_grid)}, "tune_grid.json")
    mlflow.log_params(
        {
            **chosen.as_dict(),
            **{f"unfamiliar_{k}": v for k, v in mixes.unfamiliar.as_dict().items()},
            "memory_queries": memory_queries,
            "served_memory_queries": served_memory_queries,
        }
    )
    mlflow.log_metrics(
        {
            "tune_ndcg10": mixes.familiar.grid[chosen],
            "tune_familiar_queries": mixes.familiar_queries,
            "tune_unfamiliar_queries": mixes.unfamiliar_queries,
            "tune_probe_queries": mixes.probe_queries,
            "tune_twinless_probes": mixes.twinless_probes,
        }
    )


def log_gate(feedback: list[QueryFeedback], report: GateReport, rules: LabelRules) -> list[QueryChange]:
    """Gate metrics, the per-query table sorted by change (with the judged documents that moved) and
    plots; returns the table, best first, for the model card."""
    gate = report.result
    mlflow.log_metrics(
        {
            "gate_champion_ndcg10": gate.champion_mean,
            "gate_challenger_ndcg10": gate.challenger_mean,
            "gate_gain": gate.mean_gain,
            "gate_p_value": gate.p_value,
            "gate_queries": gate.queries,
            "gate_requests": gate.requests,
            "gate_wins": gate.wins,
            "gate_losses": gate.losses,
            "gate_passed": float(gate.passed),
        }
    )
    mlflow.set_tag("gate_reason", gate.reason)
    changes = []
    for fb in feedback:
        key = query_key(fb.query)
        up, down = moves(report.champion_order.get(fb.query, []), report.challenger_order.get(fb.query, []))
        changes.append(
            QueryChange(fb.query, round(report.champion.get(key, 0.0), 4), round(report.challenger.get(key, 0.0), 4), up, down)
        )
    changes.sort(key=lambda c: -c.delta)
    mlflow.log_table(
        {
            "query": [c.query for c in changes],
            "champion_ndcg@10": [c.champion for c in changes],
            "challenger_ndcg@10": [c.challenger for c in changes],
            "delta": [c.delta for c in changes],
            "moved_up": [", ".join(c.moved_up) for c in changes],
            "moved_down": [", ".join(c.moved_down) for c in changes],
        },
        "gate_per_query.json",
    )
    mlflow.log_dict(asdict(gate), "gate.json")
    log_figures(
        lambda plots: [
            ("gate.png", plots.gate_figure(gate, [c.delta for c in changes])),
            ("propensity.png", plots.examination_figure(rules.examination)),
        ]
    )
    return changes


def log_figures(draw: Callable[[ModuleType], list[tuple[str, Figure]]]) -> None:
    """Figures for the reviewer, drawn by `training.plots` with matplotlib (which MLflow installs);
    without it the run keeps the figures' data as JSON and its `plots` tag says why there is no picture."""
    try:
        import matplotlib.pyplot as plt

        from training import plots
    except ImportError as e:
        mlflow.set_tag("plots", f"not drawn: {e}")
        return
    for name, fig in draw(plots):
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
    log_figures(
        lambda plots: [
            ("metric_by_round.png", plots.rounds_figure(f"{model_name}: metric by round", champion, challenger, promoted))
        ]
    )
    mlflow.log_dict(
        {
            "round": list(range(1, len(challenger) + 1)),
            "champion_ndcg@10": champion,
            "challenger_ndcg@10": challenger,
            "promoted": promoted,
        },
        "metric_by_round.json",
    )


def write_mlmodel(folder: Path) -> None:
    """Makes the version folder an MLflow pyfunc model in place (`MLmodel`, signature, input example):
    serving keeps reading the same files, and MLflow shows the version's inputs and outputs."""
    model = Model(signature=infer_signature(EXAMPLE_INPUT, [0.42]), metadata={"served_score": "mixed with the first stage"})
    mlflow.pyfunc.add_to_model(model, loader_module="training.ranking.pyfunc", data=".")
    _save_example(model, EXAMPLE_INPUT, str(folder))
    model.save(str(folder / "MLmodel"))


def describe_version(
    client: MlflowClient, model_name: str, version: str, run_id: str, gate: GateResult, card: ModelCard, fate: str
) -> None:
    """What became of a version, where a reviewer looks: its run's name (`v3 · promoted · +0.023
    NDCG@10`) and `outcome` tag, and the model card as the run's and the version's description.
    Training writes it when the gate has spoken; the control plane again once it decided."""
    text = card.render(f"v{version}, {fate}")
    client.set_tag(run_id, "outcome", fate)
    client.set_tag(run_id, "mlflow.runName", f"v{version} · {fate} · {gate.mean_gain:+.3f} NDCG@10")
    client.set_tag(run_id, "mlflow.note.content", text)
    client.update_model_version(model_name, version, description=text)


def log_model_entity(run_id: str, name: str, mix: dict[str, float | None], gate: GateResult) -> str:
    """An MLflow 3 logged model for the run (its files stay the run's `model/` folder, which serving
    reads), so the run lists it under "Logged models" and the version can point at it."""
    logged = mlflow.create_external_model(
        name=name,
        source_run_id=run_id,
        model_type="bi-encoder reranker",
        params={k: str(v) for k, v in mix.items()},
        tags={"gate": gate.reason, "location": "the run's model/ folder"},
    )
    MlflowClient().log_outputs(run_id, [LoggedModelOutput(logged.model_id, 0)])
    return logged.model_id
