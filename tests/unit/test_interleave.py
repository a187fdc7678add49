import itertools
import random

import numpy as np
import pytest

from services.local.simulate import UserModel
from training.config import InterleaveConfig
from training.interleave import Interleaved, Tally, decide, look_threshold, looks, session_winner, shared_prefix, team_draft


def test_team_draft_alternates_picks_and_never_repeats_a_document():
    for seed in range(50):
        mixed = team_draft(list("abcdef"), list("bcaxyz"), 6, random.Random(seed))
        assert len(set(mixed.doc_ids)) == 6
        assert set(mixed.teams[:2]) == {"champion", "challenger"}  # one pick each in the first round
        for doc, team in zip(mixed.doc_ids, mixed.teams):  # a team is only credited with what it ranks
            assert team is None or doc in ("abcdef" if team == "champion" else "bcaxyz")


def test_a_document_both_teams_would_pick_at_the_toss_is_credited_to_neither():
    """Below the first round both rank c, d, e, f alike: whichever team the coin picks shows the same list."""
    for seed in range(20):
        mixed = team_draft(list("abcdef"), list("bacdef"), 6, random.Random(seed))
        assert sorted(mixed.doc_ids[:2]) == ["a", "b"] and mixed.doc_ids[2:] == list("cdef")
        assert mixed.teams[mixed.doc_ids.index("a")] == "champion" and mixed.teams[mixed.doc_ids.index("b")] == "challenger"
        assert mixed.teams[2:] == [None] * 4
    mixed = team_draft(list("abcx"), list("bacy"), 4, random.Random(0))  # c wanted by both, then x vs y
    assert mixed.teams[2] is None and mixed.teams[3] is not None


def _expected_credit(champion: list[str], challenger: list[str], k: int, attraction: dict[str, float], credit) -> float:
    """Challenger minus champion clicks expected over every coin outcome, for users who examine position
    p with chance 1/(p+1) and click what they examine with the document's attraction."""

    class Coins:
        def __init__(self, bits: tuple[int, ...]) -> None:
            self.bits = iter(bits)

        def random(self) -> float:
            return 0.25 if next(self.bits) else 0.75

    total, outcomes = 0.0, list(itertools.product((0, 1), repeat=k))
    for bits in outcomes:
        mixed = credit(champion, challenger, k, Coins(bits))
        for p, (doc, team) in enumerate(zip(mixed.doc_ids, mixed.teams)):
            sign = {"challenger": 1, "champion": -1, None: 0}[team]
            total += sign * attraction[doc] / (p + 1)
    return total / len(outcomes)


def _textbook_team_draft(champion: list[str], challenger: list[str], k: int, rng) -> Interleaved:
    """Radlinski et al. (2008), every position credited to the team that picked it, below the top both
    share (shown as is, credited to neither)."""
    common = shared_prefix(champion, challenger, k)
    shown: list[str] = champion[:common]
    teams: list[str | None] = [None] * common
    while len(shown) < k:
        n_cp, n_ch = teams.count("champion"), teams.count("challenger")
        if n_cp == n_ch:
            team = "challenger" if rng.random() < 0.5 else "champion"
        else:
            team = "champion" if n_cp < n_ch else "challenger"
        docs = [d for d in (champion if team == "champion" else challenger) if d not in shown]
        if not docs:
            team = "challenger" if team == "champion" else "champion"
            docs = [d for d in (champion if team == "champion" else challenger) if d not in shown]
        shown.append(docs[0])
        teams.append(team)
    return Interleaved(shown, teams)


def test_crediting_neither_keeps_each_teams_expected_credit():
    """The credit dropped at a shared pick is a coin flip: textbook team draft expects the same difference
    between the teams for any users, and none for users who click by position alone."""
    rng = random.Random(7)
    pool = [f"d{i}" for i in range(9)]
    for _ in range(40):
        champion = rng.sample(pool, 6)
        challenger = champion[:]
        for _ in range(rng.randrange(4)):  # similar rankings: a few swaps and a newcomer
            i, j = rng.randrange(6), rng.randrange(6)
            challenger[i], challenger[j] = challenger[j], challenger[i]
        if rng.random() < 0.5:
            challenger[rng.randrange(6)] = next(d for d in pool if d not in champion)
        attraction = {d: rng.random() for d in pool}
        ours = _expected_credit(champion, challenger, 6, attraction, team_draft)
        assert ours == pytest.approx(_expected_credit(champion, challenger, 6, attraction, _textbook_team_draft), abs=1e-9)
        assert _expected_credit(champion, challenger, 6, dict.fromkeys(pool, 0.5), team_draft) == pytest.approx(0.0, abs=1e-9)


def test_team_draft_shows_a_document_only_the_challenger_ranks():
    """The offline gate cannot credit what the champion never showed; interleaving can."""
    mixed = team_draft(["a", "b", "c"], ["new", "a", "b"], 3, random.Random(0))
    assert "new" in mixed.doc_ids
    assert mixed.teams[mixed.doc_ids.index("new")] == "challenger"


def test_team_draft_fills_from_the_other_team_when_one_runs_out():
    mixed = team_draft(["a"], ["b", "c", "d"], 4, random.Random(1))
    assert sorted(mixed.doc_ids) == ["a", "b", "c", "d"]


def test_the_top_both_rankers_share_is_shown_as_is_and_credited_to_neither():
    """A click there cannot tell the rankers apart; crediting it to a coin-flipped team only adds noise."""
    for seed in range(20):
        mixed = team_draft(list("abcdef"), list("abdcfe"), 6, random.Random(seed))
        assert mixed.doc_ids[:2] == ["a", "b"] and mixed.teams[:2] == [None, None]
        assert None not in mixed.teams[2:] and sorted(mixed.doc_ids[2:]) == list("cdef")
        assert session_winner(mixed.teams, [0, 1]) is None  # clicks on the shared top only: a tie
    same = team_draft(list("abc"), list("abc"), 3, random.Random(0))
    assert same.doc_ids == list("abc") and same.teams == [None, None, None]


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
    swapped = [d for i in range(0, 10, 2) for d in (ranking[i + 1], ranking[i])]  # as good: clicks follow position only
    wrong = 0
    for seed in range(200):
        rng, tally = random.Random(seed), Tally()
        for n in range(1, cfg.max_sessions + 1):
            mixed = team_draft(ranking, swapped, 10, rng)
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


def _interleaved_labels(challenger: str, wins: int, losses: int, ties: int, champion: str = "1") -> list:
    """One request per session: a click (positive label) on the winning team's document."""
    from schemas import LabelledExample

    out = []
    plan = ["challenger"] * wins + ["champion"] * losses + [None] * ties
    random.Random(0).shuffle(plan)
    for n, winner in enumerate(plan):
        for team in ("champion", "challenger"):
            grade = 1 if team == winner or winner is None else -1
            out.append(
                LabelledExample(
                    label_id=f"{challenger}-r{n}:{team}", revision=1, request_id=f"{challenger}-r{n}", query="q",
                    doc_id=f"d-{team}", position=1,
                    grade=grade, weight=1.0, propensity=1.0, signals=["click"], event_ids=[], model_version=champion,
                    index_version="x", challenger_version=challenger, team=team, timestamp=1000.0 + n,
                )
            )  # fmt: skip
    return out


def test_session_outcomes_come_from_labels_of_the_challengers_requests_only():
    from training.interleave import session_outcomes
    from training.labels.store import MemoryLabelStore

    df, _ = MemoryLabelStore(_interleaved_labels("2", 3, 1, 2) + _interleaved_labels("9", 5, 0, 0)).read()
    outcomes = session_outcomes(df, "2")
    assert len(outcomes) == 6
    assert (outcomes.count("challenger"), outcomes.count("champion"), outcomes.count(None)) == (3, 1, 2)


def test_sessions_against_an_earlier_champion_do_not_vote():
    """A rollback mid-experiment changes what the challenger is compared with: only sessions against
    the champion now serving count."""
    from training.interleave import session_outcomes
    from training.labels.store import MemoryLabelStore

    labels = _interleaved_labels("3", 0, 40, 0, champion="1") + _interleaved_labels("3", 7, 2, 1, champion="2")
    for n, label in enumerate(labels[80:]):  # distinct requests for the second champion's sessions
        labels[80 + n] = label.model_copy(update={"request_id": f"{label.request_id}b", "label_id": f"{label.label_id}b"})
    df, _ = MemoryLabelStore(labels).read()
    outcomes = session_outcomes(df, "3", champion="2")
    assert (outcomes.count("challenger"), outcomes.count("champion"), outcomes.count(None)) == (7, 2, 1)
    assert len(session_outcomes(df, "3")) == 50


@pytest.mark.parametrize(
    ("wins", "losses", "verdict", "alias"), [(150, 50, "challenger", "champion"), (50, 150, "champion", None)]
)
def test_the_scheduler_promotes_or_withdraws_the_challenger_on_the_verdict(wins, losses, verdict, alias):
    from services.schedule.interleaving import check_experiment
    from training.interleave import INTERLEAVING, STAGE_TAG
    from training.labels.store import MemoryLabelStore
    from training.registry import MemoryRegistry

    registry = MemoryRegistry()
    registry.promote(registry.add("/v1"), "first")
    challenger = registry.add("/v2")
    registry.nominate(challenger, "gate passed")
    registry.tag(challenger, STAGE_TAG, INTERLEAVING)
    cfg = InterleaveConfig(min_sessions=100, max_sessions=400)
    early = check_experiment(registry, MemoryLabelStore(_interleaved_labels(challenger, 30, 30, 10)), cfg)
    assert early is not None and early.running and registry.challenger() == challenger  # 70 sessions: no look yet
    decided = check_experiment(registry, MemoryLabelStore(_interleaved_labels(challenger, wins, losses, 0)), cfg)
    assert decided is not None and decided.judgement.verdict == verdict and decided.judgement.look == 100
    assert registry.challenger() is None
    champion = registry.champion()
    assert champion is not None and (champion.version == challenger) == (alias == "champion")
    assert (decided.event is not None) == (verdict == "challenger")
    assert check_experiment(registry, MemoryLabelStore(), cfg) is None  # nothing left to judge


def test_labels_of_an_interleaved_request_say_which_team_showed_the_document():
    from schemas import ImpressionEvent, InteractionEvent, ShownItem
    from training.labels.rules import label_request

    imp = ImpressionEvent(
        request_id="r1", query="q", items=[ShownItem(doc_id="a", position=1, score=1.0, team="challenger"),
        ShownItem(doc_id="b", position=2, score=0.5, team="champion")], model_version="1", index_version="x",
        challenger_version="2",
    )  # fmt: skip
    click = InteractionEvent(event_id="e1", request_id="r1", doc_id="b", type="click")
    labels = label_request(imp, [click])
    assert labels["b"].team == "champion" and labels["b"].grade > 0 and labels["b"].challenger_version == "2"
    assert labels["a"].team == "challenger" and labels["a"].grade < 0  # shown above the click, skipped


def test_an_undecided_experiment_says_how_far_it_got():
    from training.interleave import judge

    cfg = InterleaveConfig(min_sessions=100, max_sessions=400)
    assert "undecided after 60 sessions (no look yet)" in judge(["challenger"] * 60, cfg).describe("3", "v2")
    j = judge(["challenger", "champion"] * 60, cfg)
    assert j.verdict is None and j.look == 100
    assert "undecided after 120 sessions (at the look of 100: 50 won / 50 lost / 0 tied" in j.describe("3", "v2")


def test_the_estimated_sessions_reach_significance_with_the_promised_power():
    """The bench's sample-size estimates: run each test on as many sessions as estimated, many times
    over; about POWER of those experiments reach p < ALPHA."""
    from scipy.stats import binomtest, ttest_ind

    from services.local.bench_interleave import ALPHA, POWER, sessions_needed_sign, sessions_needed_welch

    rng = np.random.default_rng(0)
    outcomes = rng.choice([1, -1, 0], p=[0.3, 0.2, 0.5], size=200_000)
    n = sessions_needed_sign(outcomes)
    assert n is not None and 300 < n < 500
    hits = 0
    for _ in range(1000):
        sample = rng.choice([1, -1, 0], p=[0.3, 0.2, 0.5], size=n)
        wins, losses = int(np.sum(sample == 1)), int(np.sum(sample == -1))
        hits += binomtest(wins, wins + losses, 0.5).pvalue < ALPHA
    assert abs(hits / 1000 - POWER) < 0.05

    champion, challenger = rng.exponential(0.5, 200_000), rng.exponential(0.55, 200_000)
    n = sessions_needed_welch(champion, challenger)
    assert n is not None
    hits = sum(
        ttest_ind(rng.exponential(0.55, n // 2), rng.exponential(0.5, n // 2), equal_var=False).pvalue < ALPHA
        for _ in range(1000)
    )
    assert abs(hits / 1000 - POWER) < 0.05
    assert sessions_needed_sign(np.zeros(10)) is None


def test_the_bench_credits_an_interleaved_session_as_the_scheduler_does():
    """A click taken back (a deleted citation, a return) is a negative label, so it does not vote:
    the champion's three irrelevant documents are clicked and returned, the challenger's one relevant
    document is clicked and kept; counting raw clicks would call the champion better."""
    from services.local.bench_interleave import interleaved_winner
    from training.labels.rules import LabelRules

    every_click_regretted = UserModel(
        [1.0] * 10, attract_relevant=1.0, attract_irrelevant=1.0, p_cite_relevant=0.0, p_reject_irrelevant=1.0
    )
    winner = interleaved_winner(
        ["x1", "x2", "x3"], ["relevant"], {"relevant": 1}, every_click_regretted, random.Random(0), LabelRules()
    )
    assert winner == "challenger"
