import random

import numpy as np
import pytest

from services.serve.worker import explore
from training.propensity import estimate_examination


def ranked(n=20):
    return [[f"d{i}", float(n - i)] for i in range(n)]


def test_exploration_shuffles_only_the_head_and_keeps_every_item_and_score():
    items = ranked()
    shown, explored = explore(items, random.Random(3), rate=1.0, depth=10)
    assert explored
    assert sorted(map(tuple, shown[:10])) == sorted(map(tuple, items[:10]))
    assert shown[:10] != items[:10]
    assert shown[10:] == items[10:]


def test_exploration_rate_is_respected():
    rng = random.Random(0)
    assert explore(ranked(), rng, rate=0.0, depth=10) == (ranked(), False)
    share = np.mean([explore(ranked(), rng, rate=0.1, depth=10)[1] for _ in range(4000)])
    assert 0.08 < share < 0.12


def test_explored_sessions_make_the_curve_identifiable_where_fixed_rankings_do_not():
    """Each query shows its docs in one fixed order, except for shuffled sessions: without them no
    (query, doc) is ever seen at two positions and the estimator refuses instead of guessing."""
    truth = [1.0, 0.8, 0.6, 0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.18]
    rng = np.random.default_rng(0)
    gamma = {q: rng.beta(1, 3, size=10) for q in range(300)}

    def log(rate):
        rows = []
        for _s in range(12000):
            q = int(rng.integers(300))
            order = rng.permutation(10) if rng.random() < rate else np.arange(10)
            rows += [(q, d, k + 1, float(rng.random() < truth[k] * gamma[q][d])) for k, d in enumerate(order)]
        return list(zip(*rows))

    with pytest.raises(ValueError, match="too little variation"):
        estimate_examination(*log(0.0))
    est = estimate_examination(*log(0.15))
    assert est.mae(truth) < 0.05, est.examination
