"""Position bias: examination probabilities estimated from logged impressions and clicks.

Position-based click model: P(click | q, d, k) = theta_k * gamma_{q,d}. Expectation-maximisation
over the logs (Chuklin et al., "Click Models for Web Search"; the EM step of Wang et al. 2018's
regression-EM, with one relevance per (query, doc)) recovers theta up to scale; it is reported
normalised to 1 at the top position. Only (query, doc) pairs seen at two or more positions carry
information about theta (intervention harvesting, Agarwal et al. 2019); a pair seen at one position
only lets its free relevance absorb its clicks and, with few sessions, biases theta upwards at the
positions where it sits, so those pairs are left out. Serving exploration (shuffled top 10 for a
share of requests) and rankers changing between rounds provide the multi-position pairs.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

MIN_POSITIONS = 2  # a (query, doc) pair informs the curve only if seen at this many positions


@dataclass
class PropensityEstimate:
    examination: list[float]  # positions 1..K, normalised to 1 at position 1
    iterations: int
    impressions: int

    def mae(self, truth: list[float]) -> float:
        k = min(len(truth), len(self.examination))
        return float(np.mean(np.abs(np.array(self.examination[:k]) - np.array(truth[:k]))))


def estimate_examination(
    query_ids, doc_ids, positions, clicks, max_position: int = 10, iterations: int = 200, tol: float = 1e-7
) -> PropensityEstimate:
    """EM for the position-based model on (query, doc, 1-based position, clicked) rows."""
    df = pd.DataFrame({"q": query_ids, "d": doc_ids, "k": positions, "c": clicks})
    df = df[(df["k"] >= 1) & (df["k"] <= max_position)]
    df = df.assign(pair=pd.factorize(df["q"].astype(str) + "\x1f" + df["d"].astype(str))[0])
    df = df[df.groupby("pair")["k"].transform("nunique") >= MIN_POSITIONS]
    if df.empty or df["k"].nunique() < max_position:
        raise ValueError(
            f"too little variation to estimate examination: pairs seen at >= {MIN_POSITIONS} "
            f"positions cover {df['k'].nunique()} of {max_position} positions"
        )
    pair = pd.factorize(df["pair"])[0]
    k = df["k"].to_numpy(dtype=np.int64) - 1
    c = df["c"].to_numpy(dtype=np.float64)
    n_pairs = int(pair.max()) + 1 if len(pair) else 0
    theta = np.full(max_position, 0.5)
    gamma = np.full(n_pairs, 0.5)
    count_k = np.bincount(k, minlength=max_position).clip(min=1)
    count_pair = np.bincount(pair, minlength=n_pairs).clip(min=1)
    it = 0
    for it in range(1, iterations + 1):  # noqa: B007 - `it` is reported after the loop
        t, g = theta[k], gamma[pair]
        denom = np.clip(1 - t * g, 1e-12, None)
        examined_not_relevant = (1 - c) * t * (1 - g) / denom
        relevant_not_examined = (1 - c) * (1 - t) * g / denom
        new_theta = np.bincount(k, weights=c + examined_not_relevant, minlength=max_position) / count_k
        new_gamma = np.bincount(pair, weights=c + relevant_not_examined, minlength=n_pairs) / count_pair
        delta = max(np.abs(new_theta - theta).max(), np.abs(new_gamma - gamma).max() if n_pairs else 0.0)
        theta, gamma = np.clip(new_theta, 1e-6, 1.0), np.clip(new_gamma, 1e-6, 1.0)
        if delta < tol:
            break
    curve = (theta / theta[0]).clip(max=1.0)
    return PropensityEstimate([round(float(x), 4) for x in curve], it, len(df))


def read_click_log(path: Path) -> pd.DataFrame:
    """The Yandex WSCD 2012 sample: one row per (session, position) with a clicked flag."""
    with gzip.open(path, "rt") as f:
        return pd.read_csv(f, sep="\t", usecols=["query_id", "position", "doc_id", "clicked"])
