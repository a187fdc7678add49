"""The poisoning benchmark's verdicts, from cases (the runs themselves are `rankloop bench poison`)."""

from __future__ import annotations

import pandas as pd

from services.bench.poison import PoisonCase, PoisonTarget, WithoutIdentities, checks


def target(challenger, control=15, after=15):
    return PoisonTarget(query="q", doc_id="d", rank_before=15, rank_control=control, rank_challenger=challenger, rank_after=after)


def case(identities, targets, promoted, ndcg_after=0.78, ndcg_control=0.78):
    return PoisonCase(
        identities=identities, clicks=5000, accepted=5000, rejected={}, dead_letters={}, quarantined_identities=0,
        target_rank_before=15, target_rank_control=None, target_rank_challenger=None, target_rank_after=15,
        challenger_version="2", promoted=promoted, gate="", clean_ndcg_before=0.78, clean_ndcg_control=ndcg_control,
        clean_ndcg_after=ndcg_after, targets=targets, seconds={},
    )  # fmt: skip


def test_one_identity_fails_the_check_if_any_challenger_puts_a_target_in_the_top_10_above_the_control():
    assert checks([case(1, [target(14), target(None)], False)]).one_identity_never_in_top_10
    assert not checks([case(1, [target(14), target(9)], False)]).one_identity_never_in_top_10  # rejected counts too
    # real users alone brought it to 8th (the control); the attack did not lift it further
    assert checks([case(1, [target(8, control=8)], True)]).one_identity_never_in_top_10
    assert not checks([case(1, [target(7, control=8)], True)]).one_identity_never_in_top_10


def test_the_top_3_counts_only_through_a_promoted_model_and_3_places_above_the_control_through_any():
    assert checks([case(500, [target(2, control=4)], False)]).never_in_top_3_of_a_promoted_model
    assert not checks([case(500, [target(2, control=4)], True)]).never_in_top_3_of_a_promoted_model
    assert checks([case(500, [target(2, control=2)], True)]).never_in_top_3_of_a_promoted_model
    assert checks([case(5000, [target(9, control=12)], False)]).never_more_than_3_above_control
    assert not checks([case(5000, [target(8, control=12)], False)]).never_more_than_3_above_control  # rejected counts too


def test_the_few_identity_cases_must_have_every_identity_quarantined():
    quarantined = case(20, [], True).model_copy(update={"quarantined_identities": 20})
    assert checks([quarantined]).few_identities_quarantined
    assert not checks([case(20, [], True)]).few_identities_quarantined
    assert checks([case(500, [], True)]).few_identities_quarantined is None  # many ids: other defences answer


def test_clean_quality_may_rise_but_not_fall_by_more_than_0_005_and_absent_cases_give_no_verdict():
    assert not checks([case(20, [], True, ndcg_after=0.77)]).clean_ndcg_at_most_0_005_lower
    assert checks([case(20, [], True, ndcg_after=0.80)]).clean_ndcg_at_most_0_005_lower  # real users kept teaching it
    assert not checks([case(20, [], True, ndcg_after=0.79, ndcg_control=0.80)]).clean_ndcg_at_most_0_005_below_control
    assert checks([case(20, [], True)]).one_identity_never_in_top_10 is None


def test_the_control_reads_the_store_without_the_attack_identities():
    class Store:
        def read(self):
            df = pd.DataFrame(
                {
                    "identity": ["user:a", "user:attacker-1", None],
                    "query": ["q1", "q1", "q2"],
                    "request_id": ["r1", "r2", "r3"],
                    "grade": [2, 2, 0],
                    "signals": [["click"], ["click"], ["skip"]],
                }
            )
            return df, {"labels": 3, "shards": 2}

    df, lineage = WithoutIdentities(Store(), {"user:attacker-1"}).read()  # type: ignore[arg-type]
    assert list(df["identity"].fillna("-")) == ["user:a", "-"]
    assert lineage["shards"] == 2 and lineage["labels"] == 2 and lineage["by_signal"] == {"click": 1, "skip": 1}
