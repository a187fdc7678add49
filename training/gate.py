"""The promotion gate: a challenger passes only when it is better on held-out feedback.

Paired over queries (the same queries, the same candidates), one-sided Wilcoxon signed-rank test
plus a minimum mean gain: a model that is merely as good, or better by noise, is not promoted. The
test ranks the queries the two models score differently; the ones they score alike carry no evidence
either way (docs/retraining.md).

Traffic with few distinct queries asked many times (a help centre, an internal tool) never reaches
a floor of distinct queries; there the unit is the request, and since requests of one query are not
independent, the test resamples whole queries (a cluster bootstrap): `decide_clustered`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import wilcoxon

from training.config import GateConfig
from training.labels.feedback import QueryFeedback
from training.metrics import feedback_ndcg, per_query, ranking_to_run
from training.ranking.query import normalise_query, query_key
from training.ranking.rank import Candidates, Ranking, Text, rank_queries
from training.ranking.reranker import Reranker
from training.slices import Slices


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


def carried_by_one(names: list[str], contributions: np.ndarray, cap: float) -> str | None:
    """Why a gain rests on one query (its share of the positive contributions above `cap`), or None:
    an attacker who moved one query's answers must not pass a gate that averages over a few."""
    positive = np.clip(contributions, 0, None)
    if cap >= 1.0 or positive.sum() <= 0:
        return None
    top = int(np.argmax(positive))
    share = float(positive[top] / positive.sum())
    if share <= cap:
        return None
    return f"the gain rests on one query: {names[top]!r} carries {share:.0%} of it (gate.max_query_share {cap:.0%})"


def decide(
    champion: dict[str, float],
    challenger: dict[str, float],
    margin: float,
    p_max: float,
    min_queries: int = 10,
    max_query_share: float = 1.0,
) -> GateResult:
    qids = sorted(set(champion) & set(challenger))
    a = np.array([champion[q] for q in qids])
    b = np.array([challenger[q] for q in qids])
    diff = b - a
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    gain = float(diff.mean()) if len(diff) else 0.0
    p = 1.0
    if wins + losses > 0:
        p = float(wilcoxon(b, a, alternative="greater", zero_method="wilcox").pvalue)
    if len(qids) < min_queries:
        passed, reason = False, f"only {len(qids)} held-out queries (< {min_queries})"
    elif gain < margin:
        passed, reason = False, f"mean gain {gain:+.4f} below margin {margin}"
    elif p > p_max:
        passed, reason = False, f"not significant: p={p:.3g} > {p_max}"
    elif carried := carried_by_one(qids, diff, max_query_share):
        passed, reason = False, carried
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
    max_query_share: float = 1.0,
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
    elif carried := carried_by_one(names, sums, max_query_share):
        passed, reason = False, carried
    else:
        passed, reason = (
            True,
            f"better by {gain:+.4f} NDCG@10 on {n} requests of {len(names)} queries (cluster bootstrap p={p:.3g})",
        )
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    return GateResult(
        passed, float(a.mean()) if n else 0.0, float(b.mean()) if n else 0.0, gain, p, len(names), wins, losses, reason, n
    )


@dataclass(frozen=True)
class GateReport:
    champion: dict[str, float]  # per-query NDCG@10 on the gate slice
    challenger: dict[str, float]
    result: GateResult
    champion_order: dict[str, list[str]]  # per query: the judged documents as each model ranks them
    challenger_order: dict[str, list[str]]


def compare_on_feedback(
    champion: Reranker | None,
    challenger: Reranker,
    feedback: list[QueryFeedback],
    candidates: Candidates,
    text: Text,
    depth: int,
    gate: GateConfig,
) -> GateReport:
    """Per-query NDCG@10 of both rankers on held-out feedback, and the gate's decision.

    Both are scored on the documents users judged for the query (clicked, skipped, rejected): the
    feedback was collected under the champion, so a document it never showed has no label and would
    count as irrelevant, a bias that favours the champion whatever the challenger is worth. Measured
    in a loop benchmark: on all candidates the gate rejected a challenger that was +0.026 NDCG@10
    better on SciFact test; on judged documents it found +0.022, p=4e-5 (docs/retraining.md). The
    order of those documents is each ranker's order of every candidate, as serving shows it
    (`judged_orders`)."""
    queries = [f.query for f in feedback]
    before = judged_orders(feedback, rank_queries(queries, candidates, champion, text, depth))
    after = judged_orders(feedback, rank_queries(queries, candidates, challenger, text, depth))
    base, new = feedback_ndcg(feedback, before), feedback_ndcg(feedback, after)
    return GateReport(
        base,
        new,
        decide(base, new, gate.margin, gate.p_value, gate.min_queries, gate.max_query_share),
        {q: [d for d, _ in r] for q, r in before.items()},
        {q: [d for d, _ in r] for q, r in after.items()},
    )


def judged_orders(feedback: list[QueryFeedback], rankings: dict[str, Ranking]) -> dict[str, Ranking]:
    """Each query's ranking restricted to the documents its feedback judged. Ranking the judged
    documents alone would score a learned combiner on inputs it never serves (its min-max scaled
    features and positions over a handful of documents instead of the whole head)."""
    return {fb.query: [(d, s) for d, s in rankings[fb.query] if d in fb.evidence] for fb in feedback}


def compare_on_requests(
    champion: Reranker | None,
    challenger: Reranker,
    requests: list[tuple[str, QueryFeedback]],
    candidates: Candidates,
    text: Text,
    depth: int,
    gate: GateConfig,
) -> GateReport:
    """The gate for few distinct queries: NDCG@10 of both rankers per held-out request (on the
    documents judged in that request), decided by a cluster bootstrap over queries. The per-query
    figures it reports are the means of their requests."""
    queries = list(dict.fromkeys(fb.query for _, fb in requests))  # each query ranked once, restricted per request
    full = {
        "before": rank_queries(queries, candidates, champion, text, depth),
        "after": rank_queries(queries, candidates, challenger, text, depth),
    }
    rankings: dict[str, dict[str, Ranking]] = {side: {} for side in full}
    orders: dict[str, tuple[Ranking, Ranking]] = {}  # per query: the first request's two rankings
    for rid, fb in requests:
        for side, ranked in full.items():
            rankings[side][rid] = [(d, s) for d, s in ranked[fb.query] if d in fb.evidence]
        orders.setdefault(fb.query, (rankings["before"][rid], rankings["after"][rid]))
    qrels = {rid: fb.qrels() for rid, fb in requests}
    before = per_query(qrels, ranking_to_run(rankings["before"]), "ndcg@10")
    after = per_query(qrels, ranking_to_run(rankings["after"]), "ndcg@10")
    rids = [rid for rid, _ in requests if rid in before and rid in after]
    query_of = {rid: fb.query for rid, fb in requests}
    result = decide_clustered(
        [query_key(query_of[r]) for r in rids],
        [before[r] for r in rids],
        [after[r] for r in rids],
        gate.margin,
        gate.p_value,
        gate.min_requests,
        gate.min_clustered_queries,
        max_query_share=gate.max_query_share,
    )
    by_query: dict[str, tuple[list[float], list[float]]] = {}
    for r in rids:
        a, b = by_query.setdefault(query_key(query_of[r]), ([], []))
        a.append(before[r])
        b.append(after[r])
    return GateReport(
        {q: float(np.mean(a)) for q, (a, _) in by_query.items()},
        {q: float(np.mean(b)) for q, (_, b) in by_query.items()},
        result,
        {q: [d for d, _ in o[0]] for q, o in orders.items()},
        {q: [d for d, _ in o[1]] for q, o in orders.items()},
    )


@dataclass(frozen=True)
class Rise:
    """A document the challenger put far higher than the champion did, on a query of the labels."""

    query: str
    doc_id: str
    champion_rank: int
    challenger_rank: int
    signed_sources: int

    def __str__(self) -> str:
        return (
            f"doc {self.doc_id!r} rose from {self.champion_rank} to {self.challenger_rank} on {self.query!r} "
            f"with {self.signed_sources} signed users' positives behind it"
        )


def unsupported_rises(
    champion: Reranker | None,
    challenger: Reranker,
    slices: Slices,
    candidates: Candidates,
    text: Text,
    depth: int,
    gate: GateConfig,
) -> list[Rise]:
    """Documents with positive feedback from fewer than `gate.rise_sources` signed users that the
    challenger ranks in a query's top 10, more than `gate.max_unsupported_rise` places above the
    champion: what fake clicks from sources nobody vouches for would do, whatever the gate's sample says."""
    suspects: dict[str, set[str]] = {}
    for fb in [*slices.train, *slices.tune, *slices.gate]:
        backed = slices.support.get(normalise_query(fb.query), {})
        weak = {d for d in fb.positives() if len(backed.get(d, ())) < gate.rise_sources}
        if weak and fb.query in candidates:
            suspects.setdefault(fb.query, set()).update(weak)
    if not suspects:
        return []
    before = rank_queries(list(suspects), candidates, champion, text, depth)
    after = rank_queries(list(suspects), candidates, challenger, text, depth)
    rises = []
    for query, docs in suspects.items():
        old = {d: i + 1 for i, (d, _) in enumerate(before[query])}
        new = {d: i + 1 for i, (d, _) in enumerate(after[query])}
        for d in sorted(docs):
            if d in new and new[d] <= 10 and old.get(d, len(old) + 1) - new[d] > gate.max_unsupported_rise:
                signed = len(slices.support.get(normalise_query(query), {}).get(d, set()))
                rises.append(Rise(query, d, old.get(d, len(old) + 1), new[d], signed))
    return rises


@dataclass(frozen=True)
class AsServed:
    """Champion and challenger with the feedback memories they serve with, every label's; a verdict
    measures each with its train slice's (`Reranker.as_measured`)."""

    champion: Reranker | None
    challenger: Reranker


def run_gate(
    champion: Reranker | None,
    challenger: Reranker,
    slices: Slices,
    candidates: Candidates,
    text: Text,
    depth: int,
    gate: GateConfig,
    served: AsServed | None = None,
) -> GateReport:
    """Per query while there are `gate.min_queries` distinct held-out queries; with fewer, per request
    clustered by query (a few head queries asked many times still get a verdict). Held-out queries
    without `gate.min_trusted_sources` signed users behind their positives are left out (the slices
    do), and a challenger that passes is refused still if it lifted documents no signed user backs,
    ranked as both are `served` (every label's memory, the gate slice's too) when that is given: the
    verdict compares them as each was measured, the rise check what users would see change."""
    if len(slices.gate) >= gate.min_queries:
        report = compare_on_feedback(champion, challenger, slices.gate, candidates, text, depth, gate)
    else:
        report = compare_on_requests(champion, challenger, slices.gate_requests, candidates, text, depth, gate)
    result = report.result
    if slices.untrusted_gate_queries:
        result.reason += (
            f"; {slices.untrusted_gate_queries} held-out queries left out (< {gate.min_trusted_sources} signed users)"
        )
    before, after = (served.champion, served.challenger) if served else (champion, challenger)
    if result.passed and (rises := unsupported_rises(before, after, slices, candidates, text, depth, gate)):
        more = f" and {len(rises) - 1} more" if len(rises) > 1 else ""
        result.passed = False
        result.reason = f"refused: {rises[0]}{more} (gate.rise_sources {gate.rise_sources}); the gate had said: {result.reason}"
    return report
