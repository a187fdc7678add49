"""`bench loop --repeat`: figures become mean and range, checks read the mean and the worst run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.errors import InvalidInput
from services.bench.loop import LoopBenchResult
from services.bench.repeat import compare_same_seed, run_repeated, summarise_files

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


def test_runs_made_separately_are_summarised_in_seed_order_and_must_share_a_setup(tmp_path):
    base = LoopBenchResult.model_validate(json.loads(COMMITTED.read_text()))
    paths = []
    for seed, final in ((2, 0.83), (0, 0.79), (1, 0.81)):  # given out of order
        checks = base.checks.model_copy(update={"final_champion_ndcg_at_10": final})
        path = tmp_path / f"run-{seed}.json"
        path.write_text(base.model_copy(update={"seed": seed, "checks": checks}).model_dump_json(by_alias=True))
        paths.append(path)
    summary = summarise_files(paths, tmp_path / "summary.json")
    assert summary.seeds == [0, 1, 2] and summary.figures["final champion NDCG@10"].values == [0.79, 0.81, 0.83]

    other = tmp_path / "other.json"
    other.write_text(base.model_copy(update={"seed": 3, "sessions_per_round": 10}).model_dump_json(by_alias=True))
    with pytest.raises(InvalidInput, match="differ"):
        summarise_files([paths[0], other], tmp_path / "bad.json")
    with pytest.raises(InvalidInput, match="same seed"):
        summarise_files([paths[0], paths[0]], tmp_path / "bad.json")


def test_two_runs_of_one_seed_are_compared_figure_by_figure_against_the_tolerance(tmp_path):
    base = LoopBenchResult.model_validate(json.loads(COMMITTED.read_text()))
    first, same, apart = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    first.write_text(base.model_dump_json(by_alias=True))
    timings = {**base.timings, "total_s": base.timings["total_s"] + 60}  # another machine's speed is not a difference
    same.write_text(base.model_copy(update={"timings": timings}).model_dump_json(by_alias=True))
    moved = base.checks.model_copy(update={"final_champion_ndcg_at_10": base.checks.final_champion_ndcg_at_10 + 0.004})
    apart.write_text(base.model_copy(update={"checks": moved}).model_dump_json(by_alias=True))

    identical = compare_same_seed([first, same])
    assert identical.figures_compared > 50 and identical.figures_different == {} and identical.within_tolerance
    off = compare_same_seed([first, apart])
    assert list(off.figures_different) == ["checks.final_champion_ndcg@10"]
    assert off.headline_max_difference == pytest.approx(0.004) and not off.within_tolerance

    other_seed = tmp_path / "d.json"
    other_seed.write_text(base.model_copy(update={"seed": 5}).model_dump_json(by_alias=True))
    with pytest.raises(InvalidInput, match="differ"):
        compare_same_seed([first, other_seed])


def test_head_query_mode_cuts_a_split_of_n_queries_and_keeps_the_others(tmp_path):
    from services.bench.loop import head_queries
    from training import beir

    root = tmp_path / "ds"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": f"doc {i}"}) + "\n" for i in range(5))
    )
    (root / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"query {i}"}) + "\n" for i in range(10)))
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i % 5}\t1\n" for i in range(8)))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq8\td3\t1\nq9\td4\t1\n")
    head, split = head_queries(beir.load(root), "train", 3, seed=0, folder=tmp_path / "head")
    again, _ = head_queries(beir.load(root), "train", 3, seed=0, folder=tmp_path / "head2")
    assert split == "train-head3" and len(head.qrels(split)) == 3 and head.qrels(split) == again.qrels(split)
    assert set(head.qrels(split)) <= set(head.qrels("train")) and head.qrels("test") == {"q8": {"d3": 1}, "q9": {"d4": 1}}
