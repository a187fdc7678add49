"""`rankloop bench interleave`: how fast and how reliably interleaving finds the better ranker, against
an A/B split of the same simulated traffic.

Rankers: the first stage (hybrid), its parts (BM25, dense), the model versions given (e.g. a loop
run's), and deliberately damaged copies of the best (its top result demoted, its top 10 shuffled).
Every pair gets an offline difference (NDCG@10 on the judged split) and two online experiments on
the same simulated users (the position-based click model of `simulate`): interleaving by the chosen
method, decided by the t-test on session credits of `training.interleave`, and an A/B split, decided
by Welch's t-test on the reciprocal rank of a session's first liked document; both stop at the same
looks with the same threshold. Both read a session as the scheduler does: a document counts when the label rules grade
its reactions positive (a click, cite or purchase not taken back by a deleted citation or a return).

How many sessions each design needs is measured twice: where the sequential rule stopped (one draw,
on a doubling grid, so a pair's ratio is a power of 2), and as the sample size each test needs to
reach p < 0.05 with 80 % power, from the per-session mean and variance of `ESTIMATE_SESSIONS`
sessions per design (the usual measure of an online metric's sensitivity; not quantized); the A/B
arms of an estimate session share the user's random draws (common random numbers).
"""

from __future__ import annotations

import itertools
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel
from rich.progress import Progress
from scipy.stats import norm, ttest_ind

from schemas import InteractionType
from services.config import Settings
from services.local.simulate import UserModel, examination_curve, session_events, session_spread
from training import beir
from training.config import InterleaveConfig, InterleaveMethod
from training.evaluate import evaluate_first_stage_parts
from training.indexing import build_index
from training.interleave import Tally, Verdict, decide, interleave, look_threshold, looks, session_credit
from training.labels.rules import LabelRules, grade_of
from training.metrics import per_query, ranking_to_run
from training.ranking.first_stage import Candidate, FirstStage, minmax
from training.ranking.model_files import META_FILE
from training.ranking.rank import candidates_for, rank
from training.ranking.reranker import Reranker

SHOWN = 10
ESTIMATE_SESSIONS = 40_000  # sessions per design and pair behind the sample-size estimate
ALPHA, POWER = 0.05, 0.8  # the sample-size estimate: two-sided p < ALPHA, reached with probability POWER
COPY = "first stage (hybrid), a copy"  # the null pair: identical rankers must be called no different


class Pair(BaseModel):
    challenger: str
    champion: str
    offline_delta: float  # NDCG@10 on the judged split, challenger - champion
    verdict: Verdict
    p_value: float
    sessions_interleaving: int | None  # sessions at the look that reached significance (None: never)
    sessions_ab: int | None
    ab_verdict: Verdict
    ab_p_value: float
    sessions_interleaving_estimated: int | None  # sessions the credit t-test needs (p < ALPHA, POWER); None: no preference
    sessions_ab_estimated: int | None  # the same for the A/B split's Welch test


class InterleaveBenchResult(BaseModel):
    dataset: str
    method: InterleaveMethod
    split: str
    rankers: dict[str, float]  # NDCG@10 on the split
    user_spread: float  # variance of the per-session examination multiplier of the simulated users
    pairs: list[Pair]
    agreement: float  # share of pairs with |offline_delta| >= 0.01 whose interleaving verdict has its sign
    agreement_pairs: int
    sensitivity_ratio: float  # median sessions_ab_estimated / sessions_interleaving_estimated, pairs |offline_delta| >= 0.01
    sensitivity_ratio_quartiles: tuple[float, float]
    sensitivity_ratio_sequential: float  # median sessions_ab / sessions_interleaving (A/B never: max_sessions)
    looks: list[int]
    look_threshold: float
    null_pairs_significant: int  # identical rankers declared different (should be 0)
    notes: list[str]


@dataclass(frozen=True)
class Shown:
    doc_id: str
    position: int  # 1-based, as `session_events` reads it


def part_ranking(cands: list[Candidate], part: str) -> list[str]:
    score = minmax(np.array([c.bm25 if part == "bm25" else c.dense for c in cands], dtype=np.float32))
    return [cands[i].doc_id for i in np.argsort(-score, kind="stable")]


def model_folders(paths: list[Path]) -> dict[str, Path]:
    """Model folders by a short name: each path is a model folder or holds some (a registry's versions)."""
    out: dict[str, Path] = {}
    for path in paths:
        found = [path] if (path / META_FILE).exists() else sorted(p.parent for p in path.rglob(META_FILE))
        for folder in found:
            name = "/".join(folder.relative_to(path.parent).parts[-3:-1]) if folder != path else folder.name
            out[name or folder.name] = folder
    return out


DAMAGES = {  # name -> (share of queries damaged, how)
    "top result demoted to 3rd on 10% of queries": (0.1, "demote"),
    "top result demoted to 3rd on 30% of queries": (0.3, "demote"),
    "top 10 shuffled on 10% of queries": (0.1, "shuffle"),
}


def damaged(ranking: list[str], share: float, how: str, rng: random.Random) -> list[str]:
    """A deliberately worse ranking: on a `share` of queries, the top result moved to 3rd, or the top 10 shuffled."""
    top = list(ranking[:SHOWN])
    if rng.random() < share:
        if how == "demote":
            top.insert(2, top.pop(0))
        else:
            rng.shuffle(top)
    return top + list(ranking[SHOWN:])


def simulate_pair(
    champion: dict[str, list[str]],
    challenger: dict[str, list[str]],
    qrels: dict[str, dict[str, int]],
    user: UserModel,
    rules: LabelRules,
    cfg: InterleaveConfig,
    seed: int,
) -> tuple[tuple[Verdict, float, int | None], tuple[Verdict, float, int | None]]:
    """(verdict, p, sessions to significance) for interleaving and for A/B on the same sessions."""
    qids = sorted(qrels)
    schedule = looks(cfg)
    tally = Tally()
    arms: dict[str, list[float]] = {"champion": [], "challenger": []}
    il_result: tuple[Verdict, float, int | None] | None = None
    ab_result: tuple[Verdict, float, int | None] | None = None
    for i in range(1, cfg.max_sessions + 1):
        rng = random.Random(seed * 1_000_003 + i)
        qid = rng.choice(qids)
        if il_result is None:
            tally.credits.append(interleaved_credit(champion[qid], challenger[qid], qrels[qid], user, rng, rules, cfg.method))
        if ab_result is None:
            arm = "challenger" if i % 2 else "champion"
            arms[arm].append(first_liked_rr((champion if arm == "champion" else challenger)[qid], qrels[qid], user, rng, rules))
        if i in schedule:
            if il_result is None:
                p = tally.p_value()
                verdict = decide(p, tally.preference(), i, cfg)
                if verdict is not None:
                    il_result = (verdict, p, i if verdict != "no difference" else None)
            if ab_result is None:
                a, b = np.array(arms["champion"]), np.array(arms["challenger"])
                p = float(ttest_ind(b, a, equal_var=False).pvalue) if a.std() + b.std() > 0 else 1.0
                verdict = decide(p, float(b.mean() - a.mean()), i, cfg)
                if verdict is not None:
                    ab_result = (verdict, p, i if verdict != "no difference" else None)
            if il_result is not None and ab_result is not None:
                break
    assert il_result is not None and ab_result is not None  # the last look always decides
    return il_result, ab_result


def sessions_needed_mean(credits: np.ndarray) -> int | None:
    """Sessions a two-sided test of a mean against 0 (interleaving's t-test) needs to reach p < ALPHA
    with probability POWER, for per-session values like `credits` (normal approximation)."""
    mu = float(credits.mean())
    if mu == 0:
        return None
    return round(float(credits.var(ddof=1)) * (norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER)) ** 2 / mu**2)


def sessions_needed_welch(champion: np.ndarray, challenger: np.ndarray) -> int | None:
    """Sessions (both arms together, split evenly) a two-sided test of the difference in means needs to
    reach p < ALPHA with probability POWER, for per-session values like these."""
    delta = float(challenger.mean() - champion.mean())
    if delta == 0:
        return None
    spread = float(champion.var(ddof=1) + challenger.var(ddof=1))
    return round(2 * spread * (norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER)) ** 2 / delta**2)


def estimate_pair(
    champion: dict[str, list[str]],
    challenger: dict[str, list[str]],
    qrels: dict[str, dict[str, int]],
    user: UserModel,
    rules: LabelRules,
    seed: int,
    method: InterleaveMethod = "optimized",
    sessions: int = ESTIMATE_SESSIONS,
) -> tuple[int | None, int | None]:
    """Sessions interleaving and A/B need (p < ALPHA, POWER), from `sessions` simulated sessions each.
    Both A/B arms of a session replay the same user with the same random draws (common random numbers):
    the A/B difference is then measured precisely, while each arm keeps the variance it has in a real
    split. With independent draws the estimate of a small difference is mostly noise."""
    qids = sorted(qrels)
    credits = np.zeros(sessions)
    arms: dict[str, list[float]] = {"champion": [], "challenger": []}
    for i in range(sessions):
        rng = random.Random(f"estimate {seed} {i}")
        qid = rng.choice(qids)
        credits[i] = interleaved_credit(champion[qid], challenger[qid], qrels[qid], user, rng, rules, method)
        user_draws = random.Random(f"estimate a/b {seed} {i}").getstate()
        for arm, ranking in (("champion", champion), ("challenger", challenger)):
            same_user = random.Random()
            same_user.setstate(user_draws)
            arms[arm].append(first_liked_rr(ranking[qid], qrels[qid], user, same_user, rules))
    return sessions_needed_mean(credits), sessions_needed_welch(np.array(arms["champion"]), np.array(arms["challenger"]))


def interleaved_credit(
    champion: list[str],
    challenger: list[str],
    qrels: dict[str, int],
    user: UserModel,
    rng: random.Random,
    rules: LabelRules,
    method: InterleaveMethod = "optimized",
) -> float:
    """One interleaving session on one query: the challenger's credit from the documents the label
    rules grade positive, as the scheduler sums it (`session_outcomes`). Interleaved as serving does:
    from each ranker's top `SHOWN` (a request's k), so a document the other ranker lacks ranks SHOWN + 1."""
    mixed = interleave(champion[:SHOWN], challenger[:SHOWN], SHOWN, rng, method)
    return session_credit(mixed.credits, _liked(rng, user, mixed.doc_ids, qrels, rules))


def first_liked_rr(ranking: list[str], qrels: dict[str, int], user: UserModel, rng: random.Random, rules: LabelRules) -> float:
    """One A/B session on one query: the reciprocal rank of the first document the label rules grade
    positive (0: none), the same evidence interleaving is credited with."""
    liked = _liked(rng, user, ranking[:SHOWN], qrels, rules)
    return 1.0 / (1 + min(liked)) if liked else 0.0


def _liked(rng: random.Random, user: UserModel, docs: list[str], qrels: dict[str, int], rules: LabelRules) -> list[int]:
    """0-based positions whose reactions the label rules grade positive (a click, cite or purchase not
    taken back by a deleted citation or a return)."""
    reactions: dict[str, tuple[set[InteractionType], float]] = {}
    for doc, kind, value in session_events(rng, user, [Shown(d, p + 1) for p, d in enumerate(docs)], qrels):
        types, dwell = reactions.get(doc, (set(), 0.0))
        types.add(InteractionType(kind))
        reactions[doc] = (types, max(dwell, value or 0.0) if kind == "dwell" else dwell)
    position = {d: p for p, d in enumerate(docs)}
    graded = {d: grade_of(types, dwell, rules) for d, (types, dwell) in reactions.items()}
    return sorted(position[d] for d, g in graded.items() if g is not None and g[0] > 0)


def run_interleave_bench(
    s: Settings,
    models: list[Path],
    split: str,
    seed: int,
    cfg: InterleaveConfig,
    spread: float | None = None,
    progress: bool = True,
) -> InterleaveBenchResult:
    """`spread`: how much simulated users differ (None: as much as the real click log's users)."""
    ds = beir.load(s.dataset, s.state_dir / "datasets")
    build_index(ds, s.state_dir)
    fs = FirstStage.current(s.state_dir)
    qrels = {q: r for q, r in ds.qrels(split).items() if any(v > 0 for v in r.values())}
    cands = candidates_for(fs, [ds.queries[q] for q in qrels])
    depth = s.serving.rerank_depth
    rankings: dict[str, dict[str, list[str]]] = {
        "first stage (hybrid)": {q: [c.doc_id for c in cands[ds.queries[q]]] for q in qrels},
        "bm25 only": {q: part_ranking(cands[ds.queries[q]], "bm25") for q in qrels},
        "dense only": {q: part_ranking(cands[ds.queries[q]], "dense") for q in qrels},
    }
    for name, folder in model_folders(models).items():
        reranker = Reranker(folder, name).warm(fs)
        rankings[name] = {q: [d for d, _ in rank(ds.queries[q], cands[ds.queries[q]], reranker, fs.text, depth)] for q in qrels}

    def ndcg(r: dict[str, list[str]]) -> dict[str, float]:
        return per_query(qrels, ranking_to_run({q: [(d, 0.0) for d in docs] for q, docs in r.items()}), "ndcg@10")

    scores = {name: ndcg(r) for name, r in rankings.items()}
    best = max(scores, key=lambda n: np.mean(list(scores[n].values())))
    rng = random.Random(seed)
    for label, (share, how) in DAMAGES.items():
        name = f"{best}, {label}"
        rankings[name] = {q: damaged(docs, share, how, rng) for q, docs in sorted(rankings[best].items())}
        scores[name] = ndcg(rankings[name])
    rankings[COPY] = rankings["first stage (hybrid)"]
    scores[COPY] = scores["first stage (hybrid)"]
    self_check_parts = evaluate_first_stage_parts(ds, split, cands)
    mean = {n: round(float(np.mean([sc.get(q, 0.0) for q in qrels])), 4) for n, sc in scores.items()}
    assert abs(mean["first stage (hybrid)"] - self_check_parts["hybrid"]["ndcg@10"]) < 2e-3, "ranking mismatch"

    user = UserModel(examination_curve(s.clicklog), spread=session_spread(s.clicklog) if spread is None else spread)
    names = list(rankings)
    pairs_to_run = [(a, b) for a, b in itertools.combinations(names, 2) if COPY not in (a, b)]
    pairs_to_run.append((COPY, "first stage (hybrid)"))
    out: list[Pair] = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"simulating {len(pairs_to_run)} pairs", total=len(pairs_to_run))
        for k, (champion, challenger) in enumerate(pairs_to_run):
            (v, p, n), (abv, abp, abn) = simulate_pair(
                rankings[champion], rankings[challenger], qrels, user, s.stream.rules, cfg, seed + k
            )
            il_needed, ab_needed = estimate_pair(
                rankings[champion], rankings[challenger], qrels, user, s.stream.rules, seed + k, cfg.method
            )
            out.append(
                Pair(
                    challenger=challenger,
                    champion=champion,
                    offline_delta=round(mean[challenger] - mean[champion], 4),
                    verdict=v,
                    p_value=p,
                    sessions_interleaving=n,
                    sessions_ab=abn,
                    ab_verdict=abv,
                    ab_p_value=abp,
                    sessions_interleaving_estimated=il_needed,
                    sessions_ab_estimated=ab_needed,
                )
            )
            bar.advance(task)
    judged = [p for p in out if abs(p.offline_delta) >= 0.01]
    agree = [p for p in judged if p.verdict == ("challenger" if p.offline_delta > 0 else "champion")]
    sequential = [(p.sessions_ab or cfg.max_sessions) / p.sessions_interleaving for p in out if p.sessions_interleaving]
    ratios = [
        p.sessions_ab_estimated / p.sessions_interleaving_estimated
        for p in judged
        if p.sessions_ab_estimated and p.sessions_interleaving_estimated
    ]
    quartiles = np.percentile(ratios, [25, 75]) if ratios else np.zeros(2)
    return InterleaveBenchResult(
        dataset=str(s.dataset),
        method=cfg.method,
        split=split,
        rankers=mean,
        user_spread=round(user.spread, 4),
        pairs=out,
        agreement=round(len(agree) / len(judged), 4) if judged else 0.0,
        agreement_pairs=len(judged),
        sensitivity_ratio=round(statistics.median(ratios), 2) if ratios else 0.0,
        sensitivity_ratio_quartiles=(round(float(quartiles[0]), 2), round(float(quartiles[1]), 2)),
        sensitivity_ratio_sequential=round(statistics.median(sequential), 2) if sequential else 0.0,
        looks=looks(cfg),
        look_threshold=look_threshold(cfg),
        null_pairs_significant=sum(1 for p in out if p.champion == COPY and p.verdict != "no difference"),
        notes=[
            f"simulated users: position-based click model, examination from {s.clicklog.name}, scaled per session by a "
            f"gamma multiplier of variance {user.spread:.3f} (fitted to that log's overdispersion of clicks per session "
            f"when not given); a session = one query of the split, {SHOWN} results shown",
            f"interleaving: {cfg.method} (optimized: fair merges drawn so random clicks earn no credit, a like credits "
            "1/rank under the challenger - 1/rank under the champion, scaled per query to at most 1; team_draft: a like "
            "credits 1 to the team that picked it), t-test on the session credits; A/B: alternate sessions per arm, "
            "Welch t-test on the reciprocal rank of the first liked document; both count a document the label rules "
            "grade positive (a click, cite or purchase not taken back), as the scheduler does",
            f"both stop at the first look in {looks(cfg)} with p < {look_threshold(cfg):.4g}; "
            "sessions_ab None = not significant by the last look (the sequential ratio then counts max_sessions: a lower bound)",
            f"sessions_*_estimated: sessions each test needs to reach p < {ALPHA} with {POWER:.0%} power (normal "
            f"approximation), from the per-session mean and variance of {ESTIMATE_SESSIONS:,} sessions per design "
            "(the two A/B arms of a session replay the same user's random draws, so their difference is measured "
            "precisely; each arm keeps its own variance); "
            "sensitivity_ratio: their median ratio over the pairs with |offline_delta| >= 0.01",
        ],
    )
