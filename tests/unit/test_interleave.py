import random

import pytest

from services.local.simulate import UserModel
from training.config import InterleaveConfig
from training.interleave import Tally, decide, look_threshold, looks, session_winner, team_draft


def test_team_draft_alternates_picks_and_never_repeats_a_document():
    for seed in range(50):
        mixed = team_draft(list("abcdef"), list("bcaxyz"), 6, random.Random(seed))
        assert len(set(mixed.doc_ids)) == 6
        counts = [mixed.teams[: i + 1].count("challenger") - mixed.teams[: i + 1].count("champion") for i in range(6)]
        assert all(abs(c) <= 1 for c in counts)  # after every pair of picks the teams are level
        for doc, team in zip(mixed.doc_ids, mixed.teams):  # a team only shows what it ranks
            assert doc in ("abcdef" if team == "champion" else "bcaxyz")


def test_team_draft_shows_a_document_only_the_challenger_ranks():
    """The offline gate cannot credit what the champion never showed; interleaving can."""
    mixed = team_draft(["a", "b", "c"], ["new", "a", "b"], 3, random.Random(0))
    assert "new" in mixed.doc_ids
    assert mixed.teams[mixed.doc_ids.index("new")] == "challenger"


def test_team_draft_fills_from_the_other_team_when_one_runs_out():
    mixed = team_draft(["a"], ["b", "c", "d"], 4, random.Random(1))
    assert sorted(mixed.doc_ids) == ["a", "b", "c", "d"]


def test_session_winner_counts_clicks_per_team():
    teams = ["champion", "challenger", "champion", "challenger"]
    assert session_winner(teams, [1, 3]) == "challenger"
    assert session_winner(teams, [0, 1]) is None
    assert session_winner(teams, []) is None
    assert session_winner(teams, [0, 0, 2, 9]) == "champion"  # repeats and positions past the list ignored


def test_looks_double_and_the_threshold_spends_the_p_value_across_them():
    cfg = InterleaveConfig(min_sessions=100, max_sessions=1000)
    assert looks(cfg) == [100, 200, 400, 800, 1000]
    assert look_threshold(cfg) == pytest.approx(0.01)


def test_the_rule_decides_at_significance_and_gives_up_at_the_last_look():
    cfg = InterleaveConfig(min_sessions=100, max_sessions=1000)
    strong = Tally(challenger=80, champion=20)
    assert decide(strong.p_value(), strong.preference(), 100, cfg) == "challenger"
    weak = Tally(challenger=52, champion=48)
    assert decide(weak.p_value(), weak.preference(), 100, cfg) is None
    assert decide(weak.p_value(), weak.preference(), 1000, cfg) == "no difference"
    assert decide(Tally(champion=80, challenger=20).p_value(), -0.6, 100, cfg) == "champion"
    assert decide(0.0, 1.0, 50, cfg) is None  # never before min_sessions


def test_identical_rankers_are_rarely_called_different():
    """The rule's false-positive rate on simulated clicks stays near its p-value (0.05; here at most 0.09,
    sampling error of 200 experiments allowed), however often it looks."""
    cfg = InterleaveConfig(min_sessions=100, max_sessions=800)
    ranking = [f"d{i}" for i in range(10)]
    wrong = 0
    for seed in range(200):
        rng, tally = random.Random(seed), Tally()
        for n in range(1, cfg.max_sessions + 1):
            mixed = team_draft(ranking, ranking, 10, rng)
            tally.add(session_winner(mixed.teams, [p for p in range(10) if rng.random() < 0.3 / (p + 1)]))
            verdict = decide(tally.p_value(), tally.preference(), n, cfg) if n in looks(cfg) else None
            if verdict is not None:
                wrong += verdict != "no difference"
                break
    assert wrong <= 18


def test_users_differ_per_session_only_when_asked():
    same = UserModel([1.0])
    assert {same.session_scale(random.Random(s)) for s in range(5)} == {1.0}
    differ = UserModel([1.0], spread=0.6)
    scales = [differ.session_scale(random.Random(s)) for s in range(4000)]
    assert abs(sum(scales) / len(scales) - 1.0) < 0.05
    assert abs(sum((x - 1) ** 2 for x in scales) / len(scales) - 0.6) < 0.1
