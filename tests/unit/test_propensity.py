import numpy as np

from training.labels.rules import DEFAULT_EXAMINATION
from training.propensity import estimate_examination


def simulate_pbm_log(truth, queries=200, sessions_per_query=30, swap_rate=0.3, seed=0, ranked=False):
    """Each query has a base ranking of 10 docs with random attractiveness; each session shows it with
    random adjacent swaps (as when rankers change), and clicks follow theta_k * gamma."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(queries):
        gamma = rng.beta(1, 3, size=10)
        base = list(np.argsort(-gamma)) if ranked else list(range(10))
        for _ in range(sessions_per_query):
            order = list(base)
            for i in range(9):
                if rng.random() < swap_rate:
                    order[i], order[i + 1] = order[i + 1], order[i]
            for pos, d in enumerate(order):
                rows.append((q, d, pos + 1, float(rng.random() < truth[pos] * gamma[d])))
    return list(zip(*rows))


def test_em_recovers_the_true_examination_curve():
    truth = DEFAULT_EXAMINATION
    q, d, k, c = simulate_pbm_log(truth)
    est = estimate_examination(q, d, k, c)
    assert est.examination[0] == 1.0
    assert est.mae(truth) < 0.05, est.examination


def test_em_is_not_fooled_by_relevance_sorted_rankings():
    """Raw CTR by position mixes examination with relevance (better docs sit on top); EM separates them."""
    truth = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3]
    q, d, k, c = simulate_pbm_log(truth, swap_rate=0.5, seed=1, ranked=True)
    est = estimate_examination(q, d, k, c)
    clicks, pos = np.array(c), np.array(k)
    ctr = np.array([clicks[pos == p].mean() for p in range(1, 11)])
    naive_mae = float(np.mean(np.abs(ctr / ctr[0] - np.array(truth))))
    assert est.mae(truth) < naive_mae
    assert est.mae(truth) < 0.05


def test_click_log_leaves_out_quarantined_identities():
    """A click burst's fake clicks (dead-lettered, but still on the interactions topic) must not bend
    the examination curve: the click model's log skips impressions of a quarantined identity."""
    from services.control.scheduler import click_log

    def impression(rid: str, user: str | None, session: str | None) -> dict:
        items = [{"doc_id": d, "position": p} for p, d in enumerate(["a", "b", "c"], start=1)]
        return {"request_id": rid, "query": "q", "user": user, "session": session, "items": items}

    impressions = [impression("r1", "alice", "s1"), impression("r2", "mallory", "s2"), impression("r3", None, "s3")]
    clicks = [{"request_id": r, "doc_id": "c", "type": "click"} for r in ("r1", "r2", "r3")]
    log = click_log(impressions, clicks, {"user:mallory", "session:s3"})
    assert len(log) == 3 and log["clicked"].sum() == 1
    assert len(click_log(impressions, clicks, set())) == 9
