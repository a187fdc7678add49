"""The promotion gate: a challenger is promoted only when it is better on held-out feedback.

Paired over queries (the same queries, the same candidates), one-sided Wilcoxon signed-rank test
plus a minimum mean gain: a model that is merely as good, or better by noise, is not promoted.
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
