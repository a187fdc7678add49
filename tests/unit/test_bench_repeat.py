"""`bench loop --repeat`: figures become mean and range, checks read the mean and the worst run."""

from __future__ import annotations

import json
from pathlib import Path

from services.local.bench import LoopBenchResult
from services.local.bench_repeat import run_repeated

COMMITTED = Path(__file__).resolve().parents[2] / "docs" / "bench" / "scifact-loop.json"


def test_repeated_runs_report_mean_and_range_and_check_the_mean(tmp_path):
    base = LoopBenchResult.model_validate(json.loads(COMMITTED.read_text()))
    finals = {0: 0.79, 1: 0.81, 2: 0.83}

    def fake_run(seed: int, path: Path) -> LoopBenchResult:
        checks = base.checks.model_copy(update={"final_champion_ndcg_at_10": finals[seed]})
        return base.model_copy(update={"seed": seed, "checks": checks})

    out = tmp_path / "loop.json"
    summary = run_repeated(fake_run, [0, 1, 2], out)
    champion = summary.figures["final champion NDCG@10"]
    assert (champion.mean, champion.min, champion.max) == (0.81, 0.79, 0.83) and champion.values == [0.79, 0.81, 0.83]
    assert summary.checks.champion_mean_at_least_0_80 and summary.checks.every_champion_at_least_0_78
    md = out.with_suffix(".md").read_text()
    assert "| final champion NDCG@10 | 0.8100 | 0.7900–0.8300 | 0.7900, 0.8100, 0.8300 |" in md
    assert (tmp_path / "loop-rounds.png").stat().st_size > 5000
    assert json.loads(out.read_text())["seeds"] == [0, 1, 2]
