import itertools
import random

import numpy as np
import pytest

from services.local.simulate import UserModel
from training.config import InterleaveConfig
from training.interleave import (
    Interleaved,
    Tally,
    decide,
    fair_merges,
    interleave,
    look_threshold,
    looks,
    optimized,
    plan,
    session_credit,
    shared_prefix,
    team_draft,
)


def _similar_pairs(n: int, size: int = 8, seed: int = 7):
    """Pairs of rankings as a retrained model makes them: a few swaps, sometimes a newcomer."""
    rng = random.Random(seed)
    pool = [f"d{i}" for i in range(size + 4)]
    for _ in range(n):
        champion = rng.sample(pool, size)
        challenger = champion[:]
        for _ in range(rng.randrange(5)):
            i, j = rng.randrange(size), rng.randrange(size)
            challenger[i], challenger[j] = challenger[j], challenger[i]
        if rng.random() < 0.5:
            challenger[rng.randrange(size)] = next(d for d in pool if d not in champion)
        yield champion, challenger


def _expected_credit(champion: list[str], challenger: list[str], depth: int, attraction: dict[str, float]) -> float:
    """The challenger's credit expected over the plan's lists, for users who examine position p with
    chance 1/(p+1) and click what they examine with the document's attraction."""
    drawn = plan(tuple(champion), tuple(challenger), depth)
    return sum(
        chance * sum(c * attraction[d] / (p + 1) for p, (d, c) in enumerate(zip(shown, credits)))
        for shown, credits, chance in zip(drawn.lists, drawn.credits, drawn.chances)
    )


def test_every_list_shown_is_a_fair_merge_without_repeats():
    """Each position holds the best document not yet shown of one of the two rankings."""
    for champion, challenger in _similar_pairs(30):
        for seed in range(5):
            mixed = interleave(champion, challenger, 6, random.Random(seed))
            assert len(mixed.doc_ids) == 6 and len(set(mixed.doc_ids)) == 6
            for p, doc in enumerate(mixed.doc_ids):
                shown = mixed.doc_ids[:p]
                assert doc in {next(d for d in r if d not in shown) for r in (champion, challenger)}


def test_random_clicks_earn_no_credit_at_any_cut_off():
    """Unbiased: whatever the rankings, users who click by position alone (the same attraction for
    every document) earn neither ranker credit in expectation, looking at any top k."""
    for champion, challenger in _similar_pairs(40):
        drawn = plan(tuple(champion), tuple(challenger), 6)
        assert drawn.chances.sum() == pytest.approx(1.0) and (drawn.chances >= 0).all()
        assert drawn.chances @ np.cumsum(drawn.credits, axis=1) == pytest.approx(np.zeros(6), abs=1e-9)
        assert _expected_credit(champion, challenger, 6, dict.fromkeys(champion + challenger, 0.5)) == pytest.approx(0, abs=1e-9)


def test_a_query_where_the_rankers_differ_only_deep_down_still_gets_a_full_vote():
    """Credits are scaled per query so the largest one its lists can show is 1: two rankers that swap
    their 7th and 8th documents are judged on that query as firmly as two that swap their 1st and 2nd."""
    deep = plan(tuple("abcdefgh"), tuple("abcdefhg"), 8)
    top = plan(tuple("abcdefgh"), tuple("bacdefgh"), 8)
    assert np.abs(deep.credits).max() == pytest.approx(1.0) == np.abs(top.credits).max()
    assert deep.credits[:, :6].tolist() == [[0.0] * 6] * len(deep.lists)  # the shared top earns nothing


def test_the_ranker_that_puts_liked_documents_higher_earns_the_credit():
    for champion, challenger in _similar_pairs(40):
        liked = challenger[0]
        if champion[0] == liked:
            continue
        attraction = {d: 0.9 if d == liked else 0.05 for d in champion + challenger}
        assert _expected_credit(champion, challenger, 6, attraction) > 0
        assert _expected_credit(challenger, champion, 6, attraction) < 0  # the same pair, roles swapped


def test_a_document_only_the_challenger_ranks_is_shown_and_credited_to_it():
    """The offline gate cannot credit what the champion never showed; interleaving can."""
    drawn = plan(("a", "b", "c"), ("new", "a", "b"), 3)
    shown_new = [(s.index("new"), c, p) for s, c, p in zip(drawn.lists, drawn.credits, drawn.chances) if "new" in s]
    assert sum(p for _, _, p in shown_new) > 0 and all(c[i] > 0 for i, c, _ in shown_new)
    mixed = next(
        m for seed in range(50) if "new" in (m := interleave(["a", "b", "c"], ["new", "a", "b"], 3, random.Random(seed))).doc_ids
    )
    assert mixed.teams[mixed.doc_ids.index("new")] == "challenger"


def test_identical_rankings_are_shown_as_they_are_with_no_credit():
    same = interleave(list("abcdef"), list("abcdef"), 4, random.Random(0))
    assert same.doc_ids == list("abcd") and same.credits == [0.0] * 4 and same.teams == [None] * 4


def test_positions_past_the_depth_follow_the_champion_and_earn_nothing():
    mixed = optimized(list("abcdefgh"), list("hgfedcba"), 8, random.Random(0), depth=3)
    assert mixed.credits[3:] == [0.0] * 5
    assert mixed.doc_ids[3:] == [d for d in "abcdefgh" if d not in mixed.doc_ids[:3]]


def test_one_ranking_running_out_is_filled_from_the_other():
    assert fair_merges(["a"], ["b", "c", "d"], 4) == [
        ("a", "b", "c", "d"),
        ("b", "a", "c", "d"),
        ("b", "c", "a", "d"),
        ("b", "c", "d", "a"),
    ]
    assert sorted(interleave(["a"], ["b", "c", "d"], 4, random.Random(1)).doc_ids) == ["a", "b", "c", "d"]


def test_rankings_that_allow_no_unbiased_full_plan_get_a_shorter_one():
    """Very different rankings (here one document against six) can leave no unbiased distribution over
    the full depth: the plan covers fewer positions, which stay unbiased, rather than failing a request."""
    drawn = plan(("d2",), ("d3", "d1", "d2", "d0", "d5", "d4"), 3)
    width = len(drawn.lists[0])
    assert 1 <= width < 3
    assert drawn.chances @ np.cumsum(drawn.credits, axis=1) == pytest.approx(np.zeros(width), abs=1e-9)
    assert len(interleave(["d2"], ["d3", "d1", "d2", "d0", "d5", "d4"], 3, random.Random(0)).doc_ids) == 3


def test_session_credit_sums_the_liked_positions():
    credits = [-0.5, 0.5, -0.25, 0.1]
    assert session_credit(credits, [1, 3]) == pytest.approx(0.6)
    assert session_credit(credits, []) == 0.0
    assert session_credit(credits, [0, 0, 2, 9]) == pytest.approx(-0.75)  # repeats and positions past the list ignored


def test_team_draft_alternates_picks_and_never_repeats_a_document():
    for seed in range(50):
        mixed = interleave(list("abcdef"), list("bcaxyz"), 6, random.Random(seed), "team_draft")
        assert len(set(mixed.doc_ids)) == 6
        assert set(mixed.teams[:2]) == {"champion", "challenger"}  # one pick each in the first round
        for doc, team in zip(mixed.doc_ids, mixed.teams):  # a team is only credited with what it ranks
            assert team is None or doc in ("abcdef" if team == "champion" else "bcaxyz")
        assert set(mixed.credits) <= {-1.0, 0.0, 1.0}


def test_team_draft_credits_neither_team_with_a_document_both_would_pick_at_the_toss():
    """Below the first round both rank c, d, e, f alike: whichever team the coin picks shows the same list."""
    for seed in range(20):
        mixed = team_draft(list("abcdef"), list("bacdef"), 6, random.Random(seed))
        assert sorted(mixed.doc_ids[:2]) == ["a", "b"] and mixed.doc_ids[2:] == list("cdef")
        assert mixed.teams[mixed.doc_ids.index("a")] == "champion" and mixed.teams[mixed.doc_ids.index("b")] == "challenger"
        assert mixed.teams[2:] == [None] * 4
    mixed = team_draft(list("abcx"), list("bacy"), 4, random.Random(0))  # c wanted by both, then x vs y
    assert mixed.teams[2] is None and mixed.teams[3] is not None


def _team_draft_expected_credit(champion: list[str], challenger: list[str], k: int, attraction: dict[str, float], draft) -> float:
    """The challenger's credit expected over every coin outcome, for users who examine position p with
    chance 1/(p+1) and click what they examine with the document's attraction."""

    class Coins:
        def __init__(self, bits: tuple[int, ...]) -> None:
            self.bits = iter(bits)

        def random(self) -> float:
            return 0.25 if next(self.bits) else 0.75

    total, outcomes = 0.0, list(itertools.product((0, 1), repeat=k))
    for bits in outcomes:
        mixed = draft(champion, challenger, k, Coins(bits))
        total += sum(c * attraction[d] / (p + 1) for p, (d, c) in enumerate(zip(mixed.doc_ids, mixed.credits)))
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
    return Interleaved(shown, [{"challenger": 1.0, "champion": -1.0, None: 0.0}[t] for t in teams])


def test_team_draft_crediting_neither_keeps_each_teams_expected_credit():
    """The credit dropped at a shared pick is a coin flip: textbook team draft expects the same difference
    between the teams for any users, and none for users who click by position alone."""
    for champion, challenger in _similar_pairs(40, size=6, seed=3):
        attraction = {d: random.Random(d).random() for d in champion + challenger}
        ours = _team_draft_expected_credit(champion, challenger, 6, attraction, team_draft)
        assert ours == pytest.approx(
            _team_draft_expected_credit(champion, challenger, 6, attraction, _textbook_team_draft), abs=1e-9
        )
        flat = dict.fromkeys(champion + challenger, 0.5)
        assert _team_draft_expected_credit(champion, challenger, 6, flat, team_draft) == pytest.approx(0.0, abs=1e-9)


def test_team_draft_shows_the_top_both_rankers_share_as_is_and_credits_neither():
    for seed in range(20):
        mixed = team_draft(list("abcdef"), list("abdcfe"), 6, random.Random(seed))
        assert mixed.doc_ids[:2] == ["a", "b"] and mixed.teams[:2] == [None, None]
        assert None not in mixed.teams[2:] and sorted(mixed.doc_ids[2:]) == list("cdef")
        assert session_credit(mixed.credits, [0, 1]) == 0.0  # clicks on the shared top only: a tie
    assert sorted(team_draft(["a"], ["b", "c", "d"], 4, random.Random(1)).doc_ids) == ["a", "b", "c", "d"]  # one ran out


def test_looks_double_and_the_threshold_spends_the_p_value_across_them():
    cfg = InterleaveConfig(min_sessions=100, max_sessions=1000)
    assert looks(cfg) == [100, 200, 400, 800, 1000]
    assert look_threshold(cfg) == pytest.approx(0.01)


def test_the_rule_decides_at_significance_and_gives_up_at_the_last_look():
    cfg = InterleaveConfig(min_sessions=100, max_sessions=1000)
    strong = Tally([0.3] * 80 + [-0.3] * 20)
    assert decide(strong.p_value(), strong.preference(), 100, cfg) == "challenger"
    weak = Tally([0.3] * 52 + [-0.3] * 48)
    assert decide(weak.p_value(), weak.preference(), 100, cfg) is None
    assert decide(weak.p_value(), weak.preference(), 1000, cfg) == "no difference"
    assert decide(Tally([0.3] * 20 + [-0.3] * 80).p_value(), -0.18, 100, cfg) == "champion"
    assert Tally([0.0] * 100).p_value() == 1.0 and Tally([0.2] * 100).p_value() == 0.0
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
            mixed = interleave(ranking, swapped, 10, rng)
            tally.credits.append(session_credit(mixed.credits, [p for p in range(10) if rng.random() < 0.3 / (p + 1)]))
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


def _interleaved_labels(
    challenger: str, wins: int, losses: int, ties: int, champion: str = "1", credit: float | None = 0.5
) -> list:
    """One request per session: a click (positive label) on the winning team's document, worth `credit`
    to its team (None: labels stored before credits, by team-draft interleaving)."""
    from schemas import LabelledExample

    out = []
    order = ["challenger"] * wins + ["champion"] * losses + [None] * ties
    random.Random(0).shuffle(order)
    for n, winner in enumerate(order):
        for team in ("champion", "challenger"):
            grade = 1 if team == winner or winner is None else -1
            out.append(
                LabelledExample(
                    label_id=f"{challenger}-r{n}:{team}", revision=1, request_id=f"{challenger}-r{n}", query="q",
                    doc_id=f"d-{team}", position=1,
                    grade=grade, weight=1.0, propensity=1.0, signals=["click"], event_ids=[], model_version=champion,
                    index_version="x", challenger_version=challenger, team=team, timestamp=1000.0 + n,
                    credit=None if credit is None else credit if team == "challenger" else -credit,
                )
            )  # fmt: skip
    return out


def test_session_outcomes_come_from_labels_of_the_challengers_requests_only():
    from services.storage.memory import MemoryLabelStore
    from training.interleave import session_outcomes

    df, _ = MemoryLabelStore(_interleaved_labels("2", 3, 1, 2) + _interleaved_labels("9", 5, 0, 0)).read()
    outcomes = session_outcomes(df, "2")
    assert sorted(outcomes) == [-0.5, 0.0, 0.0, 0.5, 0.5, 0.5]  # a tie: both documents liked, credits cancel


def test_labels_stored_before_credits_count_one_for_their_team():
    """An experiment running across the upgrade from team-draft interleaving keeps its earlier sessions."""
    from services.storage.memory import MemoryLabelStore
    from training.interleave import session_outcomes

    df, _ = MemoryLabelStore(_interleaved_labels("2", 3, 1, 2, credit=None)).read()
    assert sorted(session_outcomes(df, "2")) == [-1.0, 0.0, 0.0, 1.0, 1.0, 1.0]


def test_sessions_against_an_earlier_champion_do_not_vote():
    """A rollback mid-experiment changes what the challenger is compared with: only sessions against
    the champion now serving count."""
    from services.storage.memory import MemoryLabelStore
    from training.interleave import session_outcomes

    labels = _interleaved_labels("3", 0, 40, 0, champion="1") + _interleaved_labels("3", 7, 2, 1, champion="2")
    for n, label in enumerate(labels[80:]):  # distinct requests for the second champion's sessions
        labels[80 + n] = label.model_copy(update={"request_id": f"{label.request_id}b", "label_id": f"{label.label_id}b"})
    df, _ = MemoryLabelStore(labels).read()
    outcomes = session_outcomes(df, "3", champion="2")
    assert (outcomes.count(0.5), outcomes.count(-0.5), outcomes.count(0.0)) == (7, 2, 1)
    assert len(session_outcomes(df, "3")) == 50


@pytest.mark.parametrize(
    ("wins", "losses", "verdict", "alias"), [(150, 50, "challenger", "champion"), (50, 150, "champion", None)]
)
def test_the_scheduler_promotes_or_withdraws_the_challenger_on_the_verdict(wins, losses, verdict, alias):
    from services.control.interleaving import check_experiment
    from services.storage.memory import MemoryLabelStore
    from tests.factories import promotions_on
    from training.interleave import INTERLEAVING, STAGE_TAG
    from training.registry import MemoryRegistry

    registry = MemoryRegistry()
    promotions = promotions_on(registry)
    promotions.promote(registry.add("/v1"), "first", "test")
    challenger = registry.add("/v2")
    promotions.nominate(challenger, "gate passed", "scheduler", stage=INTERLEAVING)
    assert registry.get(challenger).tags[STAGE_TAG] == INTERLEAVING
    cfg = InterleaveConfig(min_sessions=100, max_sessions=400)
    early = check_experiment(promotions, MemoryLabelStore(_interleaved_labels(challenger, 30, 30, 10)), cfg)
    assert early is not None and early.running and registry.challenger() == challenger  # 70 sessions: no look yet
    decided = check_experiment(promotions, MemoryLabelStore(_interleaved_labels(challenger, wins, losses, 0)), cfg)
    assert decided is not None and decided.judgement.verdict == verdict and decided.judgement.look == 100
    assert registry.challenger() is None
    champion = registry.champion()
    assert champion is not None and (champion.version == challenger) == (alias == "champion")
    assert (decided.event is not None) == (verdict == "challenger")
    assert check_experiment(promotions, MemoryLabelStore(), cfg) is None  # nothing left to judge


def test_labels_of_an_interleaved_request_carry_each_documents_credit():
    from schemas import ImpressionEvent, InteractionEvent, ShownItem
    from training.labels.rules import label_request

    imp = ImpressionEvent(
        request_id="r1", query="q", items=[ShownItem(doc_id="a", position=1, score=1.0, team="challenger", credit=0.5),
        ShownItem(doc_id="b", position=2, score=0.5, team="champion", credit=-0.25)], model_version="1",
        index_version="x", challenger_version="2",
    )  # fmt: skip
    click = InteractionEvent(event_id="e1", request_id="r1", doc_id="b", type="click")
    labels = label_request(imp, [click])
    assert (labels["b"].team, labels["b"].credit) == ("champion", -0.25) and labels["b"].grade > 0
    assert labels["b"].challenger_version == "2"
    assert (labels["a"].team, labels["a"].credit) == ("challenger", 0.5) and labels["a"].grade < 0  # skipped


def test_an_undecided_experiment_says_how_far_it_got():
    from training.interleave import judge

    cfg = InterleaveConfig(min_sessions=100, max_sessions=400)
    assert "undecided after 60 sessions (no look yet)" in judge([0.5] * 60, cfg).describe("3", "v2")
    j = judge([0.5, -0.5] * 60, cfg)
    assert j.verdict is None and j.look == 100
    assert "undecided after 120 sessions (at the look of 100: 50 won / 50 lost / 0 tied" in j.describe("3", "v2")


def test_the_estimated_sessions_reach_significance_with_the_promised_power():
    """The bench's sample-size estimates: run each test on as many sessions as estimated, many times
    over; about POWER of those experiments reach p < ALPHA."""
    from scipy.stats import ttest_1samp, ttest_ind

    from services.bench.interleave import ALPHA, POWER, sessions_needed_mean, sessions_needed_welch

    rng = np.random.default_rng(0)
    credits, chances = [0.5, 0.1, -0.4, 0.0], [0.25, 0.15, 0.2, 0.4]  # sessions' credits, as a plan gives them
    n = sessions_needed_mean(rng.choice(credits, p=chances, size=200_000))
    assert n is not None and 200 < n < 1000
    hits = sum(ttest_1samp(rng.choice(credits, p=chances, size=n), 0.0).pvalue < ALPHA for _ in range(1000))
    assert abs(hits / 1000 - POWER) < 0.05

    champion, challenger = rng.exponential(0.5, 200_000), rng.exponential(0.55, 200_000)
    n = sessions_needed_welch(champion, challenger)
    assert n is not None
    hits = sum(
        ttest_ind(rng.exponential(0.55, n // 2), rng.exponential(0.5, n // 2), equal_var=False).pvalue < ALPHA
        for _ in range(1000)
    )
    assert abs(hits / 1000 - POWER) < 0.05
    assert sessions_needed_mean(np.zeros(10)) is None


def test_the_bench_credits_an_interleaved_session_as_the_scheduler_does():
    """A click taken back (a deleted citation, a return) is a negative label, so it does not vote:
    the champion's three irrelevant documents are clicked and returned, the challenger's one relevant
    document is clicked and kept; counting raw clicks would call the champion better."""
    from services.bench.interleave import interleaved_credit
    from training.labels.rules import LabelRules

    every_click_regretted = UserModel(
        [1.0] * 10, attract_relevant=1.0, attract_irrelevant=1.0, p_cite_relevant=0.0, p_reject_irrelevant=1.0
    )
    credits = [
        interleaved_credit(
            ["x1", "x2", "x3"], ["relevant"], {"relevant": 1}, every_click_regretted, random.Random(seed), LabelRules()
        )
        for seed in range(20)
    ]
    assert min(credits) >= 0 and sum(credits) > 0
