"""Optimized interleaving (Radlinski & Craswell, WSDM 2013): the online test between the offline gate
and promotion.

The champion's and the challenger's rankings are merged into one list. A like (a click, cite or
purchase not taken back) on a document credits the ranker that ranks it higher, by how much higher:
`1/rank under the challenger - 1/rank under the champion` (a document a ranker does not return ranks
just below its list), scaled per query so the largest credit its lists can show is 1. Like a
team-draft session, a query's disagreement is then worth at most one vote: queries where the two
differ only further down (as a champion and its retrained challenger often do) are not drowned by
those where they differ at the top, and the scaling keeps every query's random-click credit at 0.

Both rankers are judged by the same user on the same query, so user and query variance cancel, which
makes it far more sensitive than an A/B split; and unlike the offline gate it credits a document the
champion never showed: the challenger ranks it high, the user liked it.

Which list is shown is drawn from a distribution chosen per query by a small linear program:
- every list is a fair merge: each position holds the best document not yet shown of one of the two
  rankings, so a user never sees a document neither ranker would show there;
- it is unbiased: a user who clicks at random within the top k, for every k, earns neither ranker any
  credit in expectation, so only the documents' relevance moves the verdict;
- among such distributions it favours lists whose top positions carry much credit (where users click,
  a like says the most).

`interleave.method = team_draft` keeps team-draft interleaving (Radlinski, Kurup & Joachims 2008), its
credit 1 for a like on a document the team picked. Which needs fewer sessions depends on the pair of
rankers (`docs/online-evaluation.md` has both on the same pairs).

The verdict is a one-sample t-test on the per-session credit, looked at on a doubling schedule of
session counts; each look tests at `p_value / looks` (Bonferroni), so peeking does not inflate the
rule's false-positive rate above `p_value`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import pandas as pd

from training.config import InterleaveConfig, InterleaveMethod

Team = Literal["champion", "challenger"]
STAGE_TAG, INTERLEAVING = "stage", "interleaving"  # a nominated version's tag: serving interleaves it, the scheduler judges
Verdict = Literal["challenger", "champion", "no difference"]


@dataclass(frozen=True)
class Interleaved:
    doc_ids: list[str]
    credits: list[float]  # what a like at each position earns the challenger (negative: the champion)

    @property
    def teams(self) -> list[Team | None]:
        """Which ranker each position's credit goes to (None: both rank the document alike)."""
        return [None if c == 0 else "challenger" if c > 0 else "champion" for c in self.credits]


@dataclass(frozen=True)
class Plan:
    """The lists one query may show, with their credits per position and the chance each is shown."""

    lists: list[tuple[str, ...]]
    credits: np.ndarray  # lists x positions
    chances: np.ndarray


def credit(doc_id: str, champion: dict[str, int], challenger: dict[str, int]) -> float:
    """What a like on `doc_id` earns the challenger, before the plan scales it: 1/rank under it -
    1/rank under the champion (1-based; a document a ranker does not return ranks just below its list)."""
    return 1 / challenger.get(doc_id, len(challenger) + 1) - 1 / champion.get(doc_id, len(champion) + 1)


def fair_merges(champion: Sequence[str], challenger: Sequence[str], depth: int) -> list[tuple[str, ...]]:
    """Every list of up to `depth` documents whose each position holds the best document not yet shown
    of one of the two rankings (at most 2^depth, far fewer when the rankings overlap)."""
    out: set[tuple[str, ...]] = set()
    limit = min(depth, len(set(champion) | set(challenger)))

    def extend(shown: tuple[str, ...]) -> None:
        if len(shown) == limit:
            out.add(shown)
            return
        seen = set(shown)
        nexts = {r[i] for r in (champion, challenger) if (i := _next_index(r, 0, seen)) < len(r)}
        for best in sorted(nexts):
            extend((*shown, best))

    extend(())
    return sorted(out)


@lru_cache(maxsize=4096)
def plan(champion: tuple[str, ...], challenger: tuple[str, ...], depth: int) -> Plan:
    """The distribution over fair merges: unbiased under random clicks at every cut-off k, and among
    those the one whose lists put the most credit where users click (weight 1/position). When no
    distribution of `depth` positions is unbiased (rankings of different documents or lengths can
    make it so), the plan covers fewer positions; one always works. Cached: popular queries repeat,
    and a solve takes milliseconds."""
    from scipy.optimize import linprog  # here: the admin commands import this module's tags, not scipy (0.5 s)

    ranks = ({d: i + 1 for i, d in enumerate(champion)}, {d: i + 1 for i, d in enumerate(challenger)})
    for width in range(min(depth, len(set(champion) | set(challenger))), 0, -1):
        lists = fair_merges(champion, challenger, width)
        credits = np.array([[credit(d, *ranks) for d in shown] for shown in lists])
        if not credits.any():  # the two agree on every document shown: any list, no credit
            return Plan(lists[:1], credits[:1], np.ones(1))
        informative = -(np.abs(credits) / np.arange(1, width + 1)).sum(axis=1)
        equalities = np.vstack([np.ones(len(lists)), np.cumsum(credits, axis=1).T])
        solved = linprog(informative, A_eq=equalities, b_eq=np.r_[1.0, np.zeros(width)], bounds=(0, None), method="highs-ds")
        if solved.success:
            keep = solved.x > 1e-9
            shown = credits[keep] / (np.abs(credits[keep]).max() or 1.0)  # per query: the largest credit shown is 1
            return Plan([s for s, k in zip(lists, keep) if k], shown, solved.x[keep] / solved.x[keep].sum())
    return Plan([()], np.zeros((1, 0)), np.ones(1))  # two empty rankings


def interleave(
    champion: Sequence[str], challenger: Sequence[str], k: int, rng: random.Random, method: InterleaveMethod = "optimized"
) -> Interleaved:
    """The list one interleaved request shows, and each position's credit, by `interleave.method`."""
    if method == "team_draft":
        return team_draft(champion, challenger, k, rng)
    return optimized(champion, challenger, k, rng)


def optimized(champion: Sequence[str], challenger: Sequence[str], k: int, rng: random.Random, depth: int = 10) -> Interleaved:
    """`k` documents: the top positions drawn from the query's plan (up to `depth`), then the champion's
    next ones, then the challenger's (no credit: the comparison is decided where users look)."""
    drawn = plan(tuple(champion), tuple(challenger), min(k, depth))
    i = rng.choices(range(len(drawn.lists)), weights=drawn.chances.tolist())[0]
    shown = list(drawn.lists[i])
    seen = set(shown)
    rest = [d for d in dict.fromkeys([*champion, *challenger]) if d not in seen][: max(0, k - len(shown))]
    return Interleaved(shown + rest, [float(c) for c in drawn.credits[i]] + [0.0] * len(rest))


def shared_prefix(champion: Sequence[str], challenger: Sequence[str], k: int) -> int:
    """How many top positions the two rankings fill with the same documents in the same order."""
    n = 0
    while n < min(k, len(champion), len(challenger)) and champion[n] == challenger[n]:
        n += 1
    return n


def team_draft(champion: Sequence[str], challenger: Sequence[str], k: int, rng: random.Random) -> Interleaved:
    """Team-draft interleaving (Radlinski, Kurup & Joachims 2008): a like earns the team that picked
    the document 1. Merges two rankings into `k` positions. Where both rank the same documents in the
    same order at the top, those are shown as they are and credited to neither: a click there says
    nothing about which ranker is better, and a coin-flipped credit would only add noise (most clicks
    land at the top).
    Below that, the team with fewer picks picks next (a coin decides when both have as many); a team
    picks its best document not already shown.

    A document both teams would have picked at a coin toss is credited to neither either, and so is the
    next one when both teams would have picked that too. Either coin outcome puts that document in the
    same place under the same documents, so its credit is a coin flip with the same chance of a click
    both ways: dropping it keeps every team's expected credit and removes noise (the exact average over
    the coin outcomes that show the same list, where both picks of a round coincide)."""
    common = shared_prefix(champion, challenger, k)
    shown: list[str] = list(champion[:common])
    teams: list[Team | None] = [None] * common
    seen: set[str] = set(shown)
    cursor: dict[Team, int] = {"champion": common, "challenger": common}
    ranking: dict[Team, Sequence[str]] = {"champion": champion, "challenger": challenger}
    picks: dict[Team, int] = {"champion": 0, "challenger": 0}
    limit = min(k, len(set(champion) | set(challenger)))
    round_shared = False  # the coin toss of this round picked a document both teams wanted
    while len(shown) < limit:
        toss = picks["champion"] == picks["challenger"]
        if toss:
            team: Team = "challenger" if rng.random() < 0.5 else "champion"
        else:
            team = "champion" if picks["champion"] < picks["challenger"] else "challenger"
        best = {t: _next_index(ranking[t], cursor[t], seen) for t in ranking}
        wanted = {ranking[t][i] for t, i in best.items() if i < len(ranking[t])}
        both_want = len(wanted) == 1 and all(i < len(ranking[t]) for t, i in best.items())
        if best[team] == len(ranking[team]):  # this team has nothing new left: the other fills the list
            team = "challenger" if team == "champion" else "champion"
        if toss:
            round_shared = both_want
        i = best[team]
        cursor[team] = i + 1
        picks[team] += 1
        shown.append(ranking[team][i])
        seen.add(ranking[team][i])
        teams.append(None if both_want and round_shared else team)
    return Interleaved(shown, [{"challenger": 1.0, "champion": -1.0, None: 0.0}[t] for t in teams])


def _next_index(docs: Sequence[str], i: int, seen: set[str]) -> int:
    """The first position from `i` on whose document is not in `seen` (len(docs): none left)."""
    while i < len(docs) and docs[i] in seen:
        i += 1
    return i


def session_credit(credits: Sequence[float], liked: Sequence[int]) -> float:
    """The challenger's credit from one session: the sum over the positions (0-based) the user liked."""
    return float(sum(credits[p] for p in set(liked) if 0 <= p < len(credits)))


@dataclass
class Tally:
    """Sessions of one interleaving experiment: each one's credit to the challenger."""

    credits: list[float] = field(default_factory=list)

    @property
    def sessions(self) -> int:
        return len(self.credits)

    @property
    def challenger(self) -> int:
        return sum(1 for c in self.credits if c > 0)

    @property
    def champion(self) -> int:
        return sum(1 for c in self.credits if c < 0)

    @property
    def ties(self) -> int:
        return sum(1 for c in self.credits if c == 0)

    def p_value(self) -> float:
        """Two-sided one-sample t-test of the mean credit against 0."""
        x = np.asarray(self.credits)
        if len(x) < 2 or not x.any():
            return 1.0
        if np.ptp(x) == 0:
            return 0.0  # every session gave the same non-zero credit
        from scipy.stats import ttest_1samp

        return float(ttest_1samp(x, 0.0).pvalue)

    def preference(self) -> float:
        """The mean credit per session: positive when users preferred the challenger."""
        return float(np.mean(self.credits)) if self.credits else 0.0


def looks(cfg: InterleaveConfig) -> list[int]:
    """Session counts at which the rule looks: min_sessions, doubling, up to max_sessions."""
    out, n = [], cfg.min_sessions
    while n < cfg.max_sessions:
        out.append(n)
        n *= 2
    return [*out, cfg.max_sessions]


def look_threshold(cfg: InterleaveConfig) -> float:
    return cfg.p_value / len(looks(cfg))


def decide(p_value: float, preference: float, sessions: int, cfg: InterleaveConfig) -> Verdict | None:
    """The verdict at a look (None: keep going). Past `max_sessions` without significance: no difference."""
    if sessions < cfg.min_sessions:
        return None
    if p_value < look_threshold(cfg):
        return "challenger" if preference > 0 else "champion"
    return "no difference" if sessions >= cfg.max_sessions else None


def session_outcomes(labels: pd.DataFrame, challenger: str, champion: str | None = None) -> list[float]:
    """Per request that interleaved `challenger` (with `champion`, when given: sessions against a
    champion since rolled back or replaced do not vote), in the order users answered, the challenger's
    credit: summed over the documents with a positive label (a click, cite or purchase not taken back).
    A label stored before credits were (team-draft interleaving) counts 1 for its team. Read from the
    label table, so it counts each request once, whatever replays."""
    if labels.empty or "challenger_version" not in labels.columns:
        return []
    rows = labels[labels["challenger_version"] == challenger]
    if champion is not None and "model_version" in rows.columns:
        rows = rows[rows["model_version"] == champion]
    team_credit = rows["team"].map({"challenger": 1.0, "champion": -1.0}).fillna(0.0)
    credit = rows["credit"].astype(float).fillna(team_credit) if "credit" in rows.columns else team_credit
    liked = rows.assign(credit=credit.where(rows["grade"] > 0, 0.0))
    per_request = liked.groupby("request_id", sort=False).agg(credit=("credit", "sum"), at=("timestamp", "min"))
    return [float(c) for c in per_request.sort_values("at", kind="stable")["credit"]]


@dataclass(frozen=True)
class Judgement:
    sessions: int  # interleaved requests with feedback so far
    look: int  # the last look reached (0: none yet)
    tally: Tally  # at that look
    p_value: float
    verdict: Verdict | None  # None: keep interleaving

    def describe(self, challenger: str, champion: str) -> str:
        t = self.tally
        counts = (
            f"{t.challenger} won / {t.champion} lost / {t.ties} tied, mean credit {t.preference():+.4f}, p={self.p_value:.3g}"
        )
        if self.verdict is None:
            last = f"at the look of {self.look}: {counts}" if self.look else "no look yet"
            return f"interleaving v{challenger} vs {champion}: undecided after {self.sessions} sessions ({last})"
        said = {"challenger": "challenger better", "champion": "champion better", "no difference": "no difference"}
        return f"interleaving v{challenger} vs {champion}: {said[self.verdict]} after {t.sessions} sessions ({counts})"


def judge(outcomes: Sequence[float], cfg: InterleaveConfig) -> Judgement:
    """The stopping rule over the sessions so far: every look reached, in order, until one decides.
    Recomputed from the start each time, so a scheduler restart or a second replica decides the same."""
    tally, look, p = Tally(), 0, 1.0
    for n in looks(cfg):
        if n > len(outcomes):
            break
        tally = Tally(list(outcomes[:n]))
        look, p = n, tally.p_value()
        verdict = decide(p, tally.preference(), n, cfg)
        if verdict is not None:
            return Judgement(len(outcomes), look, tally, p, verdict)
    return Judgement(len(outcomes), look, tally, p, None)
