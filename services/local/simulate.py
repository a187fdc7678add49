"""Simulated users: rank over HTTP, react by a position-based click model, emit through the SDK.

Relevance comes from the dataset's qrels (a higher grade is more attractive); examination defaults to
the click-through rate by position of the real Yandex click log, normalised to 1 at the top.
"""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import Progress

from schemas import NotFound
from services.auth import UserSecret
from services.config import Settings
from services.sdk import RankloopClient
from training.beir import Dataset


def examination_curve(clicklog: Path) -> list[float]:
    """CTR by position of the click log's train sample (its stats.json), normalised to 1 at the top."""
    stats_path = clicklog / "stats.json"
    if not stats_path.exists():
        raise NotFound(f"{stats_path} not found: set RANKLOOP_CLICKLOG to a click-log folder")
    ctr = json.loads(stats_path.read_text())["trainSample"]["ctr_by_pos"]
    values = [ctr[str(p)] for p in range(1, len(ctr) + 1)]
    return [v / values[0] for v in values]


def session_spread(clicklog: Path) -> float:
    """How much real users differ: the variance of a per-session multiplier on examination that explains
    the click log's overdispersion (clicks per session vary ~2x more than independent clicks at each
    position's rate would). Per query: (observed - independent variance) / mean^2, weighted by sessions."""
    import pandas as pd

    columns = ["file", "query_id", "session_idx", "position", "clicked"]
    df = pd.read_csv(clicklog / "impressions.tsv.gz", sep="\t", usecols=columns)
    df = df[df["file"] == "trainSample"]
    excess = weight = 0.0
    for _, rows in df.groupby("query_id"):
        per_session = rows.groupby("session_idx")["clicked"].sum()
        ctr = rows.groupby("position")["clicked"].mean().to_numpy()
        if len(per_session) < 2 or per_session.mean() == 0:
            continue
        excess += len(per_session) * (per_session.var() - float((ctr * (1 - ctr)).sum()))
        weight += len(per_session) * per_session.mean() ** 2
    return max(0.0, excess / weight) if weight else 0.0


@dataclass
class UserModel:
    examination: list[float]
    attract_relevant: float = 0.9
    attract_irrelevant: float = 0.05
    p_cite_relevant: float = 0.3
    p_reject_irrelevant: float = 0.5  # a clicked irrelevant doc is deleted as a citation or returned
    spread: float = 0.0  # variance of a per-session examination multiplier (mean 1, gamma): users differ

    def session_scale(self, rng: random.Random) -> float:
        return 1.0 if self.spread <= 0 else rng.gammavariate(1 / self.spread, self.spread)

    def attractiveness(self, grade: int) -> float:
        if grade <= 0:
            return self.attract_irrelevant
        return 1 - (1 - self.attract_relevant) ** grade


@dataclass
class SimStats:
    sessions: int = 0
    events: int = 0
    accepted: int = 0
    rejected: int = 0
    clicks: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


def session_events(rng: random.Random, user: UserModel, items, qrels: dict[str, int]) -> list[tuple[str, str, float | None]]:
    """(doc_id, type, value) reactions of one user to one ranked list."""
    out: list[tuple[str, str, float | None]] = []
    scale = user.session_scale(rng)
    for it in items:
        exam = min(1.0, scale * user.examination[min(it.position, len(user.examination)) - 1])
        if rng.random() >= exam:
            continue
        grade = qrels.get(it.doc_id, 0)
        if rng.random() < user.attractiveness(grade):
            out.append((it.doc_id, "click", None))
            if grade > 0:
                out.append((it.doc_id, "dwell", round(rng.uniform(40, 180), 1)))
                if rng.random() < user.p_cite_relevant:
                    out.append((it.doc_id, "cite", None))
            else:
                out.append((it.doc_id, "dwell", round(rng.uniform(2, 15), 1)))
                if rng.random() < user.p_reject_irrelevant:
                    out.append((it.doc_id, "cite", None))
                    out.append((it.doc_id, rng.choice(["citation_deleted", "return"]), None))
        else:
            out.append((it.doc_id, "skip", None))
    return out


def app_client(s: Settings, url: str | None = None, api_key: str | None = None) -> RankloopClient:
    """The client of the simulated application: like a real backend that authenticated its users, it
    signs their ids with the deployment's user-signing secret (made if there is none)."""
    secret = UserSecret(s.user_secret_file).ensure()
    return RankloopClient(url or s.base_url, deployment=s.deployment, api_key=api_key, user_secret=secret)


def simulate(
    client: RankloopClient,
    dataset: Dataset,
    split: str,
    sessions: int,
    user: UserModel,
    seed: int = 0,
    k: int = 10,
    progress: bool = True,
    concurrency: int = 4,
) -> SimStats:
    """Plays `sessions` users; each session has its own seeded RNG, so the traffic is the same
    whatever the concurrency."""
    qrels = dataset.qrels(split)
    qids = sorted(qrels)
    if not qids:
        raise ValueError(f"split {split!r} has no judged queries")
    stats = SimStats()
    lock = threading.Lock()

    def one(i: int) -> None:
        rng = random.Random(seed * 1_000_003 + i)
        qid = rng.choice(qids)
        ranked = client.rank(dataset.queries[qid], k=k, user=f"sim-{rng.randrange(10**6)}")
        reactions = session_events(rng, user, ranked.items, qrels[qid])
        answer = client.emit([client.event(ranked.request_id, d, t, v) for d, t, v in reactions]) if reactions else None
        with lock:
            stats.sessions += 1
            stats.events += len(reactions)
            if answer:
                stats.accepted += len(answer.accepted)
                stats.rejected += len(answer.rejected)
            for _, t, _ in reactions:
                stats.by_type[t] = stats.by_type.get(t, 0) + 1
            stats.clicks += sum(1 for _, t, _ in reactions if t == "click")

    with Progress(disable=not progress) as bar, ThreadPoolExecutor(concurrency) as pool:
        task = bar.add_task(f"simulating {sessions} sessions", total=sessions)
        for future in as_completed([pool.submit(one, i) for i in range(sessions)]):
            future.result()
            bar.advance(task)
    return stats
