"""Every figure rankloop draws: for people reviewing a training in MLflow or a benchmark page."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from training.gate import GateResult


def gate_figure(gate: GateResult, deltas: Sequence[float]) -> Figure:
    """Champion vs challenger on held-out feedback, and the per-query differences."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].bar(["champion", "challenger"], [gate.champion_mean, gate.challenger_mean], color=["#888", "#2a7"])
    axes[0].set_title(f"held-out feedback NDCG@10 (p={gate.p_value:.3g})")
    axes[1].hist(list(deltas), bins=21, color="#47a")
    axes[1].set_title(f"per-query delta: {gate.wins} wins / {gate.losses} losses")
    fig.tight_layout()
    return fig


def examination_figure(curve: Sequence[float]) -> Figure:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(curve) + 1), list(curve), marker="o")
    ax.set_xlabel("position"), ax.set_ylabel("examination probability"), ax.set_title("propensity curve used for weights")
    fig.tight_layout()
    return fig


def rounds_figure(title: str, champion: Sequence[float], challenger: Sequence[float], promoted: Sequence[bool]) -> Figure:
    """The gate metric of every training round: champion at the time vs challenger."""
    xs = list(range(1, len(challenger) + 1))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(xs, list(champion), marker="o", color="#888", label="champion at the time")
    ax.plot(xs, list(challenger), marker="s", color="#2a7", label="challenger")
    ax.scatter(
        [x for x, p in zip(xs, promoted) if p],
        [c for c, p in zip(challenger, promoted) if p],
        s=140,
        facecolors="none",
        edgecolors="k",
        label="promoted (or passed)",
    )
    ax.set_xlabel("training round"), ax.set_ylabel("held-out feedback NDCG@10"), ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def examination_curves(curves: dict[str, list[float]], path: Path, title: str) -> Path:
    """Several examination curves on one plot, written as a PNG."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax.set_xlabel("position")
    ax.set_ylabel("examination probability (position 1 = 1)")
    ax.set_title(title)
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loop_rounds(
    path: Path,
    title: str,
    eval_label: str,
    train_label: str,
    eval_by_round: Sequence[float],
    train_by_round: Sequence[float],
    hybrid: float,
    skyline: float,
) -> Path:
    """Benchmark: the champion's metric by round on the eval and feedback queries, with references."""
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = list(range(len(eval_by_round)))
    ax.plot(xs, list(eval_by_round), marker="o", label=eval_label)
    ax.plot(xs, list(train_by_round), marker="s", label=train_label)
    return _rounds_axes(fig, ax, title, hybrid, skyline, path, "hybrid first stage", "full-information skyline")


def repeated_rounds(path: Path, title: str, by_seed: dict[int, Sequence[float]], hybrid: float, skyline: float) -> Path:
    """Benchmark repeated over seeds: every seed's champion by round, their mean, and the band between."""
    fig, ax = plt.subplots(figsize=(7, 4))
    n = max(len(v) for v in by_seed.values())
    xs = list(range(n))
    for seed, values in by_seed.items():
        ax.plot(range(len(values)), list(values), color="#4c78a8", alpha=0.35, lw=1, label=f"seed {seed}")
    columns = [[v[i] for v in by_seed.values() if i < len(v)] for i in xs]
    ax.fill_between(xs, [min(c) for c in columns], [max(c) for c in columns], color="#4c78a8", alpha=0.12)
    ax.plot(xs, [sum(c) / len(c) for c in columns], color="#4c78a8", marker="o", lw=2, label="mean")
    return _rounds_axes(fig, ax, title, hybrid, skyline, path, "hybrid first stage (mean)", "skyline (mean)")


def _rounds_axes(fig: Figure, ax: Any, title: str, hybrid: float, skyline: float, path: Path, *labels: str) -> Path:
    """The references, labels and file of a metric-by-round plot."""
    ax.axhline(hybrid, color="grey", ls="--", label=labels[0])
    ax.axhline(skyline, color="green", ls=":", label=labels[1])
    ax.set_xlabel("round"), ax.set_ylabel("NDCG@10"), ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scale_panels(path: Path, documents: Sequence[int], panels: dict[str, dict[str, Sequence[float | None]]]) -> Path:
    """One panel per cost (title -> {series label -> values}), against corpus size on a log axis."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (title, series) in zip(axes if len(panels) > 1 else [axes], panels.items()):
        for label, values in series.items():
            points = [(n, v) for n, v in zip(documents, values) if v is not None]
            ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("documents")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
