"""The model card: every figure from the run, wins and losses with the documents that moved."""

from __future__ import annotations

from dataclasses import replace

from training.gate import GateResult
from training.model_card import CarriedLearner, ModelCard, QueryChange, moves


def test_moves_name_the_documents_that_changed_rank_most():
    up, down = moves(["a", "b", "c", "d"], ["d", "a", "b", "c"])
    assert up == ["d (4→1)"] and down == ["a (1→2)", "b (2→3)", "c (3→4)"]
    assert moves(["a", "b"], ["a", "b"]) == ([], [])


def test_the_card_states_the_gate_the_labels_and_the_biggest_wins_and_losses():
    gate = GateResult(True, 0.61, 0.64, 0.03, 0.004, 40, 20, 8, "+0.0300 NDCG@10 on 40 queries (p=0.004)")
    changes = [
        QueryChange("vitamin d and bones", 0.5, 0.9, ["d7 (4→1)"], ["d2 (1→2)"]),
        QueryChange("flat query", 0.7, 0.7, [], []),
        QueryChange("statins | liver", 0.8, 0.6, [], ["d9 (1→3)"]),
    ]
    lineage = {"labels": 9040, "requests": 4000, "queries": 800, "by_grade": {"1": 5000, "-1": 4040}, "table_version": 12,
               "location": "/data/labels", "purges": 1, "by_signal": {"click": 5000}}  # fmt: skip
    card = ModelCard(
        model_name="rankloop-reranker", gate=gate, champion_version="2", lineage=lineage,
        examples=1200, selection={"fresh_queries": 300, "replay_queries": 60}, identity_share={"train": 0.031},
        trained_until=1795300000.0, changes=changes, mix={"alpha": 0.5}, depth=50,
    ).render("v3 promoted")  # fmt: skip
    assert card.startswith("# rankloop-reranker: v3 promoted")
    assert "+0.0300 NDCG@10 on 40 queries (p=0.004)" in card and "against v2" in card
    assert (
        "9,040 labels" in card
        and "table version 12" in card
        and "labels show --version 12" in card
        and "1 purges" in card
        and "train 3.1%" in card
    )
    wins, losses = card.split("## Biggest wins")[1].split("## Biggest losses")
    assert "vitamin d and bones" in wins and "d7 (4→1)" in wins and "flat query" not in wins
    assert "statins / liver" in losses and "+0.400" not in losses  # a | in a query cannot break the table


def test_the_card_says_whether_the_learned_combiner_or_the_mixes_score():

    gate = GateResult(True, 0.61, 0.64, 0.03, 0.004, 40, 20, 8, "+0.0300 NDCG@10 on 40 queries (p=0.004)")
    base = ModelCard(
        model_name="m", gate=gate, champion_version=None, lineage={}, examples=1, selection={}, identity_share={},
        trained_until=0.0, changes=[], mix={"alpha": 0.25}, depth=50,
    )  # fmt: skip
    kept = {"kept": True, "held_out": 0.8047, "mix": 0.8028, "importance": {"first_stage": 0.61}}
    card = replace(base, combiner=kept).render("passed")
    assert "learned LightGBM lambdarank combiner" in card and "0.8047" in card and "first_stage" in card
    lost = replace(base, combiner={**kept, "kept": False, "held_out": 0.79}).render("passed")
    assert "mixed as {'alpha': 0.25}" in lost and "0.7900" in lost and "not kept" in lost
    assert "not kept" not in base.render("passed")


def test_auto_compares_both_learners_then_carries_the_choice_until_the_labels_grow():
    from training.config import TrainConfig
    from training.pipeline import plan_learners

    auto = TrainConfig()  # debias auto, recheck at 4x the labels
    assert plan_learners(auto, 15_000, None, None).modes == ["naive", "ips"]  # no champion: compare
    compared = {"debias": "ips", "debias_compared_at": 15_000}
    carried = plan_learners(auto, 45_000, compared, "2")
    assert carried.modes == ["ips"] and carried.compared_at == 15_000 and carried.carried_from == "2"
    again = plan_learners(auto, 60_000, compared, "2")
    assert again.modes == ["naive", "ips"] and again.compared_at == 60_000 and again.carried_from is None
    assert plan_learners(auto, 16_000, {"debias": "ips"}, "2").modes == ["naive", "ips"]  # a champion that never compared
    assert plan_learners(TrainConfig(debias_recheck_growth=1.0), 16_000, compared, "2").modes == ["naive", "ips"]
    assert plan_learners(TrainConfig(debias="naive"), 16_000, compared, "2").modes == ["naive"]

    gate = GateResult(True, 0.61, 0.64, 0.03, 0.004, 40, 20, 8, "+0.0300 NDCG@10 on 40 queries (p=0.004)")
    card = ModelCard(
        model_name="m", gate=gate, champion_version="2", lineage={}, examples=1, selection={}, identity_share={},
        trained_until=0.0, changes=[], mix={}, depth=50, debias_carried=CarriedLearner("ips", "2", 15_000, 4.0),
    ).render("passed")  # fmt: skip
    assert "Learner debiased, carried from v2" in card and "15,000 labels" in card and "60,000" in card
