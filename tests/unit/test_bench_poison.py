"""The poisoning benchmark's verdicts, from cases (the runs themselves are `rankloop bench poison`)."""

from __future__ import annotations

from services.local.bench_poison import PoisonCase, checks


def case(identities, challenger, after, promoted, ndcg_after=0.78):
    return PoisonCase(
        identities=identities, clicks=5000, accepted=5000, rejected={}, dead_letters={}, quarantined_identities=0,
        target_rank_before=15, target_rank_challenger=challenger, target_rank_after=after, challenger_version="2",
        promoted=promoted, gate="", clean_ndcg_before=0.78, clean_ndcg_after=ndcg_after, targets=[], seconds={},
    )  # fmt: skip


def test_one_identity_fails_the_check_if_any_trained_model_puts_a_target_in_the_top_10():
    assert checks([case(1, 14, 15, False)]).one_identity_never_in_top_10
    assert not checks([case(1, 9, 15, False)]).one_identity_never_in_top_10  # even a rejected challenger counts


def test_many_identities_fail_only_through_a_promoted_model_in_the_top_3():
    assert checks([case(20, 2, 15, False)]).many_identities_never_in_top_3_of_a_promoted_model
    assert not checks([case(20, 2, 2, True)]).many_identities_never_in_top_3_of_a_promoted_model


def test_clean_quality_may_rise_but_not_fall_by_more_than_0_005_and_absent_cases_give_no_verdict():
    assert not checks([case(20, 14, 15, True, ndcg_after=0.77)]).clean_ndcg_at_most_0_005_lower
    assert checks([case(20, 14, 15, True, ndcg_after=0.80)]).clean_ndcg_at_most_0_005_lower  # real users kept teaching it
    assert checks([case(20, 14, 15, True)]).one_identity_never_in_top_10 is None
