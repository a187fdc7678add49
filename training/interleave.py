"""Team-draft interleaving (Radlinski, Kurup & Joachims, 2008): the online test between the offline
gate and promotion.

The champion's and the challenger's rankings are merged into one list; each position is credited to
the ranker ("team") that contributed it, and the user's clicks decide which ranker won the session.
It is far more sensitive than an A/B split (both rankers are judged by the same user on the same
query, so user and query variance cancel), and unlike the offline gate it credits a document the
champion never showed: the challenger put it there, the user clicked it.

The verdict is a two-sided sign test over the sessions one team won, looked at on a doubling schedule
of session counts; each look tests at `p_value / looks` (Bonferroni), so peeking does not inflate the
rule's false-positive rate above `p_value`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
from scipy.stats import binomtest

from training.config import InterleaveConfig

Team = Literal["champion", "challenger"]
STAGE_TAG, INTERLEAVING = "stage", "interleaving"  # a nominated version's tag: serving interleaves it, the scheduler judges
Verdict = Literal["challenger", "champion", "no difference"]


@dataclass(frozen=True)
class Interleaved:
    doc_ids: list[str]
    teams: list[Team | None]  # who contributed each position; None: both rankers put it there


def shared_prefix(champion: Sequence[str], challenger: Sequence[str], k: int) -> int:
    """How many top positions the two rankings fill with the same documents in the same order."""
    n = 0
    while n < min(k, len(champion), len(challenger)) and champion[n] == challenger[n]:
        n += 1
    return n


def team_draft(champion: Sequence[str], challenger: Sequence[str], k: int, rng: random.Random) -> Interleaved:
    """Merges two rankings into `k` positions. Where both rank the same documents in the same order at
    the top, those are shown as they are and credited to neither: a click there says nothing about which
    ranker is better, and a coin-flipped credit would only add noise (most clicks land at the top).
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
        best = {t: _next_unshown(ranking[t], cursor[t], seen) for t in ranking}
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
    return Interleaved(shown, teams)


def _next_unshown(docs: Sequence[str], i: int, seen: set[str]) -> int:
    while i < len(docs) and docs[i] in seen:
        i += 1
    return i


def session_winner(teams: Sequence[str | None], clicked: Iterable[int]) -> Team | None:
    """The team whose positions (0-based) got more clicks in one session; None for a tie or no click.
    Clicks on positions neither team owns (the shared top) do not count."""
    counts = {"champion": 0, "challenger": 0}
    for position in set(clicked):
        team = teams[position] if 0 <= position < len(teams) else None
        if team is not None:
            counts[team] += 1
    if counts["champion"] == counts["challenger"]:
        return None
    return "challenger" if counts["challenger"] > counts["champion"] else "champion"


@dataclass
class Tally:
    """Sessions of one interleaving experiment, by outcome."""

    challenger: int = 0
    champion: int = 0
    ties: int = 0

    @property
    def sessions(self) -> int:
        return self.challenger + self.champion + self.ties

    def add(self, winner: Team | None) -> None:
        if winner is None:
            self.ties += 1
        elif winner == "challenger":
            self.challenger += 1
        else:
            self.champion += 1

    def p_value(self) -> float:
        """Two-sided sign test over the sessions one team won (ties carry no preference)."""
        decided = self.challenger + self.champion
        return 1.0 if decided == 0 else float(binomtest(self.challenger, decided, 0.5).pvalue)

    def preference(self) -> float:
        """(wins - losses) / sessions: the challenger's share of sessions it won, net."""
        return 0.0 if self.sessions == 0 else (self.challenger - self.champion) / self.sessions


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


def session_outcomes(labels: pd.DataFrame, challenger: str, champion: str | None = None) -> list[Team | None]:
    """Per request that interleaved `challenger` (with `champion`, when given: sessions against a
    champion since rolled back or replaced do not vote), in the order users answered, the team its
    users preferred: more positive labels (a click, cite or purchase not taken back) on the documents
    one team put there. Read from the label table, so it counts each request once, whatever replays."""
    if labels.empty or "challenger_version" not in labels.columns:
        return []
    rows = labels[labels["challenger_version"] == challenger]
    if champion is not None and "model_version" in rows.columns:
        rows = rows[rows["model_version"] == champion]
    out: list[tuple[float, Team | None]] = []
    for _, req in rows.groupby("request_id", sort=False):
        liked = req.loc[req["grade"] > 0, "team"]
        ch, cp = int((liked == "challenger").sum()), int((liked == "champion").sum())
        out.append((float(req["timestamp"].min()), None if ch == cp else "challenger" if ch > cp else "champion"))
    return [winner for _, winner in sorted(out, key=lambda t: t[0])]


@dataclass(frozen=True)
class Judgement:
    sessions: int  # interleaved requests with feedback so far
    look: int  # the last look reached (0: none yet)
    tally: Tally  # at that look
    p_value: float
    verdict: Verdict | None  # None: keep interleaving

    def describe(self, challenger: str, champion: str) -> str:
        t = self.tally
        counts = f"{t.challenger} won / {t.champion} lost / {t.ties} tied, p={self.p_value:.3g}"
        if self.verdict is None:
            last = f"at the look of {self.look}: {counts}" if self.look else "no look yet"
            return f"interleaving v{challenger} vs {champion}: undecided after {self.sessions} sessions ({last})"
        said = {"challenger": "challenger better", "champion": "champion better", "no difference": "no difference"}
        return f"interleaving v{challenger} vs {champion}: {said[self.verdict]} after {t.sessions} sessions ({counts})"


def judge(outcomes: Sequence[Team | None], cfg: InterleaveConfig) -> Judgement:
    """The stopping rule over the sessions so far: every look reached, in order, until one decides.
    Recomputed from the start each time, so a scheduler restart or a second replica decides the same."""
    tally, look, p = Tally(), 0, 1.0
    for n in looks(cfg):
        if n > len(outcomes):
            break
        tally = Tally()
        for winner in outcomes[:n]:
            tally.add(winner)
        look, p = n, tally.p_value()
        verdict = decide(p, tally.preference(), n, cfg)
        if verdict is not None:
            return Judgement(len(outcomes), look, tally, p, verdict)
    return Judgement(len(outcomes), look, tally, p, None)
