"""The model card of a trained version: what a reviewer reads in MLflow before approving it.

Written into the version folder as README.md (replacing the base model's card, which described a
different model) and set as the run's and the version's description. Every figure in it comes from
the run: the gate's result, the labels it read, the per-query table; nothing is restated by hand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from training.gate import GateResult
from training.labels.store import Lineage

SHOWN = 5  # wins and losses listed


@dataclass(frozen=True)
class QueryChange:
    """One gate query: NDCG@10 of both models and the judged documents that moved."""

    query: str
    champion: float
    challenger: float
    moved_up: list[str]  # "doc (5→2)"
    moved_down: list[str]

    @property
    def delta(self) -> float:
        return round(self.challenger - self.champion, 4)


def moves(before: list[str], after: list[str], top: int = 3) -> tuple[list[str], list[str]]:
    """The documents whose rank changed most, up and down, as "doc (old→new)"."""
    old = {d: i + 1 for i, d in enumerate(before)}
    shifts = [(old[d] - (i + 1), d, old[d], i + 1) for i, d in enumerate(after) if d in old and old[d] != i + 1]
    up = [f"{d} ({a}→{b})" for s, d, a, b in sorted(shifts, key=lambda x: -x[0]) if s > 0][:top]
    down = [f"{d} ({a}→{b})" for s, d, a, b in sorted(shifts, key=lambda x: x[0]) if s < 0][:top]
    return up, down


def _table(rows: list[QueryChange]) -> list[str]:
    out = ["| query | champion | this model | Δ NDCG@10 | moved up | moved down |", "|---|---|---|---|---|---|"]
    for r in rows:
        query = r.query.replace("|", "/")[:80]
        up, down = ", ".join(r.moved_up) or "-", ", ".join(r.moved_down) or "-"
        out.append(f"| {query} | {r.champion:.3f} | {r.challenger:.3f} | {r.delta:+.3f} | {up} | {down} |")
    return out


@dataclass(frozen=True)
class CarriedLearner:
    """A debias mode this run took from the champion's comparison instead of comparing again."""

    mode: str
    champion: str
    compared_at: int  # labels when both learners were last compared
    recheck_growth: float  # `train.debias_recheck_growth`

    def line(self) -> str:
        return (
            f"- Learner {'debiased' if self.mode == 'ips' else 'naive'}, carried from v{self.champion}: both learners were "
            f"last compared at {self.compared_at:,} labels, and are again from "
            f"{int(self.recheck_growth * self.compared_at):,} (`train.debias_recheck_growth`)."
        )


@dataclass(frozen=True)
class ModelCard:
    """What a version's card says, all but the outcome: training knows whether the version passed the
    gate, the control plane decides what becomes of it (promoted, interleaving, awaiting approval)."""

    model_name: str
    gate: GateResult
    champion_version: str | None
    lineage: Lineage
    examples: int
    selection: dict[str, int]
    identity_share: dict[str, float]
    trained_until: float
    changes: list[QueryChange]
    mix: dict[str, Any]
    depth: int
    debias: dict[str, float] | None = None
    debias_carried: CarriedLearner | None = None
    combiner: dict[str, Any] | None = None  # kept, held-out and mix NDCG@10, feature importance
    memory: tuple[int, int] | None = None  # queries in the feedback memory: as measured (train slice), as served

    def render(self, outcome: str) -> str:
        """Markdown; `changes` sorted by delta, best first."""
        return _card(self, outcome)


def _card(c: ModelCard, outcome: str) -> str:
    champion = f"v{c.champion_version}" if c.champion_version else "the first stage (no champion yet)"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(c.trained_until)) if c.trained_until else "-"
    grades = ", ".join(f"{k}: {v:,}" for k, v in sorted(c.lineage.get("by_grade", {}).items()))
    signals = ", ".join(f"{k}: {v:,}" for k, v in c.lineage.get("by_signal", {}).items())
    shares = ", ".join(f"{k} {v:.1%}" for k, v in c.identity_share.items())
    debias = c.debias or {}
    comb = c.combiner or {}
    wins = [q for q in c.changes if q.delta > 0][:SHOWN]
    losses = [q for q in reversed(c.changes) if q.delta < 0][:SHOWN]
    lines = [
        f"# {c.model_name}: {outcome}",
        "",
        f"**Gate** against {champion} on users' held-out judgements: {c.gate.reason}",
        f"({c.gate.champion_mean:.4f} → {c.gate.challenger_mean:.4f} NDCG@10, {c.gate.mean_gain:+.4f}, p={c.gate.p_value:.2g}, "
        f"{c.gate.wins} wins / {c.gate.losses} losses on "
        + (f"{c.gate.requests} requests of {c.gate.queries} queries)." if c.gate.requests else f"{c.gate.queries} queries)."),
        "",
        "## What it learned from",
        "",
        f"- {c.lineage.get('labels', 0):,} labels (latest revision of each) from {c.lineage.get('requests', 0):,} requests on "
        f"{c.lineage.get('queries', 0):,} queries; by grade {grades or '-'}; by signal {signals or '-'}.",
        f"- Label store: {c.lineage.get('location', 'memory')}, table version {c.lineage.get('table_version', '-')} "
        f"(`rankloop labels show --version {c.lineage.get('table_version', 'N')}` reads it again), "
        f"{c.lineage.get('purges', 0)} purges applied, {c.lineage.get('held', 0):,} labels held for review "
        "(`rankloop labels holds`; `lineage.json`; the labels are also the run's `labels` dataset input).",
        f"- {c.examples:,} training examples: {c.selection.get('fresh_queries', 0)} queries with labels newer than "
        f"{champion}, {c.selection.get('replay_queries', 0)} older ones replayed; labels up to {when} (server time).",
        f"- Labels from the 10 most prolific identities: {shares or '-'} (a high share is a flood from a few users).",
        *(
            [
                "- Learner chosen on the tune slice's clicks (NDCG@10): "
                + ", ".join(f"{'debiased' if k == 'ips' else k} {v:.4f}" for k, v in debias.items())
                + f" → {'debiased' if max(debias, key=lambda k: debias[k]) == 'ips' else 'naive'}."
            ]
            if debias
            else []
        ),
        *([c.debias_carried.line()] if c.debias_carried else []),
        "",
        "## Biggest wins",
        "",
        *(_table(wins) if wins else ["none"]),
        "",
        "## Biggest losses",
        "",
        *(_table(losses) if losses else ["none"]),
        "",
        "Documents that moved are among those users judged for the query; the full table, sorted by change,"
        " is `gate_per_query.json`.",
        "",
        "## How it ranks",
        "",
        f"A bi-encoder fine-tuned from {champion if c.champion_version else 'all-MiniLM-L6-v2'} on the labels above; serving"
        f" reranks the first stage's top {c.depth} with it, "
        + (
            f"scored by a learned LightGBM lambdarank combiner (NDCG@10 on held-out tune queries {comb['held_out']:.4f}"
            f" vs the tuned mixes' {comb['mix']:.4f}; feature importance {comb['importance']}), under the fusion of {c.mix}."
            if comb.get("kept")
            else f"mixed as {c.mix}"
            + (
                f" (a learned combiner scored {comb['held_out']:.4f} on held-out tune queries,"
                f" the mixes {comb['mix']:.4f}: not kept)."
                if comb.get("held_out") is not None
                else "."
            )
        )
        + (
            f" Its feedback memory serves {c.memory[1]:,} queries' feedback, every label above; tuning and the gate"
            f" measured it with the train slice's {c.memory[0]:,}."
            if c.memory
            else ""
        )
        + " As an MLflow pyfunc model it scores (query, document) pairs with the fine-tuned encoder:"
        " `mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({'query': [...], 'document': [...]}))`.",
    ]
    return "\n".join(lines) + "\n"
