"""`rankloop bench loop --repeat N`: the loop benchmark over N seeds, every headline as its mean and
range, so a figure quoted in docs is a distribution and not one draw.

Each seed runs on its own fresh local stack (`run_loop_bench`), one after the other; its JSON, Markdown
and plots go beside the summary as `<out>-s<seed>.*`. The checks read the mean (and the worst run).
`compare_same_seed` is the other half: two runs of one seed, and how far apart their figures came out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from statistics import mean

from pydantic import BaseModel

from schemas.errors import InvalidInput
from services.bench.loop import LoopBenchResult
from training import plots


class Spread(BaseModel):
    mean: float
    min: float
    max: float
    values: list[float]  # one per seed, in seed order


class RepeatChecks(BaseModel):
    """The reproducibility issue's targets, on the runs that were made."""

    champion_mean_at_least_0_80: bool
    every_champion_at_least_0_78: bool
    share_of_skyline_lift_mean_at_least_0_90: bool | None


class RepeatedLoopResult(BaseModel):
    dataset: str
    seeds: list[int]
    runs: list[str]  # the per-seed JSON files
    figures: dict[str, Spread]
    checks: RepeatChecks


def headline(r: LoopBenchResult) -> dict[str, float]:
    """The figures docs quote from one run."""
    out = {
        "hybrid NDCG@10": r.baselines["hybrid"]["ndcg@10"],
        "skyline NDCG@10": r.skyline["ndcg@10"],
        "final champion NDCG@10": r.checks.final_champion_ndcg_at_10,
        "propensity MAE": r.checks.propensity_mae,
        "rounds promoted": float(sum(x.promoted for x in r.rounds)),
    }
    if r.checks.share_of_skyline_lift is not None:
        out["share of skyline lift"] = r.checks.share_of_skyline_lift
    for x in r.rounds:
        out[f"round {x.round} champion NDCG@10"] = x.eval["ndcg@10"]
    return out


def summarise(results: list[LoopBenchResult], runs: list[Path]) -> RepeatedLoopResult:
    per_run = [headline(r) for r in results]
    names = [k for k in per_run[0] if all(k in h for h in per_run)]
    figures = {
        k: Spread(mean=round(mean(vs), 4), min=round(min(vs), 4), max=round(max(vs), 4), values=[round(v, 4) for v in vs])
        for k in names
        for vs in [[h[k] for h in per_run]]
    }
    champion = figures["final champion NDCG@10"]
    share = figures.get("share of skyline lift")
    return RepeatedLoopResult(
        dataset=results[0].dataset,
        seeds=[r.seed for r in results],
        runs=[str(p) for p in runs],
        figures=figures,
        checks=RepeatChecks(
            champion_mean_at_least_0_80=champion.mean >= 0.80,
            every_champion_at_least_0_78=champion.min >= 0.78,
            share_of_skyline_lift_mean_at_least_0_90=share.mean >= 0.90 if share else None,
        ),
    )


SAME_SEED_TOLERANCE = 0.003  # the reproducibility target: two runs of one seed this close on every headline


class SameSeedComparison(BaseModel):
    seed: int
    runs: list[str]
    figures_compared: int  # every number in the two results but timings
    figures_different: dict[str, tuple[float, float]]  # path -> (first run, second run)
    headline_max_difference: float  # the largest |difference| of a headline figure
    within_tolerance: bool  # headline_max_difference <= SAME_SEED_TOLERANCE


def _numbers(value: object, path: str = "") -> dict[str, float]:
    """Every number of a result by its JSON path, timings left out (they are the machine's, not the seed's)."""
    if isinstance(value, dict):
        return {
            k: v
            for key, item in value.items()
            if key not in ("timings", "seconds")
            for k, v in _numbers(item, f"{path}.{key}".lstrip(".")).items()
        }
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{path}[{i}]").items()}
    if isinstance(value, bool) or not isinstance(value, int | float):
        return {}
    return {path: float(value)}


def compare_same_seed(runs: list[Path]) -> SameSeedComparison:
    """Two `bench loop` results of one seed and setup: which figures differ, and by how much at most."""
    if len(runs) != 2:
        raise InvalidInput(f"give two runs of one seed, not {len(runs)}")
    results = [LoopBenchResult.model_validate_json(p.read_text()) for p in runs]
    a, b = results
    setup = [
        (r.dataset, r.eval_split, r.train_split, r.sessions_per_round, r.train_queries, len(r.rounds), r.seed) for r in results
    ]
    if setup[0] != setup[1]:
        raise InvalidInput(f"these runs differ in dataset, splits, sessions, train queries, rounds or seed: {setup}")
    na, nb = (_numbers(r.model_dump(mode="json", by_alias=True)) for r in results)
    differ = {
        k: (na.get(k, float("nan")), nb.get(k, float("nan"))) for k in sorted(na.keys() | nb.keys()) if na.get(k) != nb.get(k)
    }
    ha, hb = headline(a), headline(b)
    gap = max(abs(ha[k] - hb[k]) for k in ha.keys() & hb.keys())
    return SameSeedComparison(
        seed=a.seed,
        runs=[str(p) for p in runs],
        figures_compared=len(na.keys() | nb.keys()),
        figures_different=differ,
        headline_max_difference=round(gap, 6),
        within_tolerance=gap <= SAME_SEED_TOLERANCE,
    )


def run_repeated(run: Callable[[int, Path], LoopBenchResult], seeds: list[int], out: Path) -> RepeatedLoopResult:
    """`run(seed, out)` is one loop benchmark; the summary goes to `out` with Markdown and a plot."""
    stem = out.with_suffix("")
    results, runs = [], []
    for seed in seeds:
        path = Path(f"{stem}-s{seed}.json")
        results.append(run(seed, path))
        runs.append(path)
    summary = summarise(results, runs)
    write(summary, results, out)
    return summary


def summarise_files(runs: list[Path], out: Path) -> RepeatedLoopResult:
    """The summary of runs made separately (`bench loop --seed K`), which must be of one dataset and setup."""
    results = [LoopBenchResult.model_validate_json(p.read_text()) for p in runs]
    setups = {(r.dataset, r.eval_split, r.train_split, r.sessions_per_round, r.train_queries, len(r.rounds)) for r in results}
    if len(setups) > 1:
        raise InvalidInput(f"these runs differ in dataset, splits, sessions, train queries or rounds: {sorted(setups)}")
    if len({r.seed for r in results}) < len(results):
        raise InvalidInput("two of these runs have the same seed: a spread needs different seeds")
    ordered = sorted(zip(results, runs), key=lambda x: x[0].seed)
    results, runs = [r for r, _ in ordered], [p for _, p in ordered]
    summary = summarise(results, runs)
    write(summary, results, out)
    return summary


def write(summary: RepeatedLoopResult, results: list[LoopBenchResult], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(summary.model_dump_json(indent=2))
    stem = out.with_suffix("")
    figures = summary.figures
    plots.repeated_rounds(
        Path(f"{stem}-rounds.png"),
        f"{summary.dataset}: champion NDCG@10 by round, {len(results)} seeds",
        {r.seed: [r.baselines["hybrid"]["ndcg@10"]] + [x.eval["ndcg@10"] for x in r.rounds] for r in results},
        figures["hybrid NDCG@10"].mean,
        figures["skyline NDCG@10"].mean,
    )
    lines = [
        f"# Loop benchmark over {len(results)} seeds: {summary.dataset}",
        "",
        f"Seeds {', '.join(map(str, summary.seeds))}; each on a fresh stack. Mean and range (min–max).",
        "",
        "| figure | mean | range | per seed |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {s.mean:.4f} | {s.min:.4f}–{s.max:.4f} | {', '.join(f'{v:.4f}' for v in s.values)} |"
        for k, s in figures.items()
    ]
    lines += ["", "| check | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary.checks.model_dump().items()]
    lines += ["", f"![rounds]({Path(f'{stem}-rounds.png').name})"]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
