"""The promotion gate: a challenger is promoted only when it is better on held-out feedback.

Paired over queries (the same queries, the same candidates), one-sided Wilcoxon signed-rank test
plus a minimum mean gain: a model that is merely as good, or better by noise, is not promoted.

Traffic with few distinct queries asked many times (a help centre, an internal tool) never reaches
a floor of distinct queries; there the unit is the request, and since requests of one query are not
independent, the test resamples whole queries (a cluster bootstrap): `decide_clustered`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import wilcoxon


@dataclass
class GateResult:
    passed: bool
    champion_mean: float
    challenger_mean: float
    mean_gain: float
    p_value: float
    queries: int
    wins: int
    losses: int
    reason: str
    requests: int = 0  # units when the gate compared requests clustered by query (0: it compared queries)


def decide(
    champion: dict[str, float], challenger: dict[str, float], margin: float, p_max: float, min_queries: int = 10
) -> GateResult:
    qids = sorted(set(champion) & set(challenger))
    a = np.array([champion[q] for q in qids])
    b = np.array([challenger[q] for q in qids])
    diff = b - a
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    gain = float(diff.mean()) if len(diff) else 0.0
    p = 1.0
    if wins + losses > 0:
        p = float(wilcoxon(b, a, alternative="greater", zero_method="zsplit").pvalue)
    if len(qids) < min_queries:
        passed, reason = False, f"only {len(qids)} held-out queries (< {min_queries})"
    elif gain < margin:
        passed, reason = False, f"mean gain {gain:+.4f} below margin {margin}"
    elif p > p_max:
        passed, reason = False, f"not significant: p={p:.3g} > {p_max}"
    else:
        passed, reason = True, f"better by {gain:+.4f} NDCG@10 on {len(qids)} queries (p={p:.3g})"
    return GateResult(
        passed, float(a.mean()) if len(a) else 0.0, float(b.mean()) if len(b) else 0.0, gain, p, len(qids), wins, losses, reason
    )


def decide_clustered(
    clusters: list[str],
    champion: list[float],
    challenger: list[float],
    margin: float,
    p_max: float,
    min_units: int,
    min_clusters: int,
    resamples: int = 2000,
    seed: int = 0,
) -> GateResult:
    """Paired per request (`champion[i]`, `challenger[i]` for the request in `clusters[i]`, its query).
    One-sided cluster bootstrap: whole queries are resampled with replacement and the mean gain over
    their requests recomputed; p is the share of resamples whose gain is not above zero."""
    a, b = np.asarray(champion, dtype=float), np.asarray(challenger, dtype=float)
    diff = b - a
    names = sorted(set(clusters))
    index = {c: i for i, c in enumerate(names)}
    member = np.array([index[c] for c in clusters], dtype=int)
    sums = np.bincount(member, weights=diff, minlength=len(names))
    sizes = np.bincount(member, minlength=len(names)).astype(float)
    gain = float(diff.mean()) if len(diff) else 0.0
    p = 1.0
    if len(names) >= 2 and np.any(diff != 0):
        picks = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
        boot = sums[picks].sum(axis=1) / sizes[picks].sum(axis=1)
        p = float((1 + np.sum(boot <= 0)) / (resamples + 1))
    n = len(diff)
    if n < min_units or len(names) < min_clusters:
        passed, reason = (
            False,
            f"only {n} held-out requests of {len(names)} queries (< {min_units} requests or < {min_clusters} queries)",
        )
    elif gain < margin:
        passed, reason = False, f"mean gain {gain:+.4f} below margin {margin} ({n} requests of {len(names)} queries)"
    elif p > p_max:
        passed, reason = False, f"not significant: p={p:.3g} > {p_max} ({n} requests of {len(names)} queries, cluster bootstrap)"
    else:
        passed, reason = (
            True,
            f"better by {gain:+.4f} NDCG@10 on {n} requests of {len(names)} queries (cluster bootstrap p={p:.3g})",
        )
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    return GateResult(
        passed, float(a.mean()) if n else 0.0, float(b.mean()) if n else 0.0, gain, p, len(names), wins, losses, reason, n
    )
