import math
import random

import numpy as np

from services.config import RetrainSettings, Settings
from services.schedule.scheduler import should_train
from training.config import TrainConfig
from training.gate import decide
from training.labels.feedback import QueryFeedback
from training.metrics import mean_metrics, per_query, ranking_to_run
from training.ranking.first_stage import minmax
from training.train import select_for_training


def test_ndcg_and_mrr_match_hand_computed_values():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = ranking_to_run({"q1": [("x", 3), ("a", 2)], "q2": [("b", 1)]})
    m = mean_metrics(qrels, run)
    assert math.isclose(m["ndcg@10"], (1 / math.log2(3) + 1) / 2, abs_tol=1e-4)
    assert math.isclose(m["mrr@10"], (0.5 + 1) / 2, abs_tol=1e-4)
    assert m["accuracy@1"] == 0.5


def test_missing_query_in_run_scores_zero():
    assert per_query({"q1": {"a": 1}, "q2": {"b": 1}}, {"q1": {"a": 1.0}})["q2"] == 0.0


def test_minmax_handles_constant_input():
    assert minmax(np.array([2.0, 2.0])).tolist() == [0.0, 0.0]
    assert minmax(np.array([1.0, 3.0, 2.0])).tolist() == [0.0, 1.0, 0.5]


def test_gate_passes_a_clearly_better_challenger():
    rng = random.Random(0)
    champ = {f"q{i}": rng.random() * 0.5 for i in range(60)}
    chall = {q: min(1.0, v + 0.2) for q, v in champ.items()}
    assert decide(champ, chall, margin=0.005, p_max=0.05).passed


def test_gate_rejects_equal_worse_and_noisy_challengers():
    rng = random.Random(1)
    champ = {f"q{i}": rng.random() for i in range(60)}
    assert not decide(champ, dict(champ), 0.005, 0.05).passed
    assert not decide(champ, {q: v * 0.8 for q, v in champ.items()}, 0.005, 0.05).passed
    noisy = {q: min(1, max(0, v + rng.gauss(0.01, 0.3))) for q, v in champ.items()}
    result = decide(champ, noisy, 0.005, 0.05)
    assert not result.passed and (result.p_value > 0.05 or result.mean_gain < 0.005)


def test_gate_needs_enough_queries():
    assert "only 3" in decide({"a": 0, "b": 0, "c": 0}, {"a": 1, "b": 1, "c": 1}, 0.0, 0.05).reason


def test_retrain_trigger_on_labels_or_interval():
    s = Settings(retrain=RetrainSettings(min_new_labels=100, interval_s=60))
    assert should_train(150, 40, 0, 10, s).due  # 110 new labels
    assert not should_train(120, 40, 0, 10, s).due  # 80 new, interval not passed
    assert should_train(41, 40, 0, 61, s).due  # interval passed with a new label
    assert not should_train(40, 40, 0, 1000, s).due  # nothing new: no pointless retraining


def test_continual_selection_trains_on_fresh_queries_plus_a_replay_sample():
    feedback = [QueryFeedback(f"q{i}", {"d": 1.0}) for i in range(20)]
    chosen, info = select_for_training(feedback, {"q1", "q2", "q3", "q4"}, TrainConfig(replay_fraction=0.5))
    names = {fb.query for fb in chosen}
    assert {"q1", "q2", "q3", "q4"} <= names and len(names) == 6
    assert info == {"fresh_queries": 4, "replay_queries": 2, "older_queries": 16}
    everything, _ = select_for_training(feedback, {fb.query for fb in feedback}, TrainConfig())
    assert len(everything) == 20
