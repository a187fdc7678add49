"""`rankloop bench poison`: can fake clicks move a document users never chose?

A clean round of simulated users on the train queries trains and promotes a champion. The simulated
application holds an API key and signs its users' ids (as a backend that authenticated them does).
Then, per case, while `case_sessions` more simulated users go on using the service, an attacker with
`identities` user ids it makes up (unsigned) sends `clicks` clicks (each with a long dwell) for one
irrelevant document per attacked query, a document the champion ranks between 15th and 20th, each
after a real /rank request, with timestamps backdated by `backdate_s`. The attacker uses the
application's key (as a web page exposes it), or in the keyed case a key of its own with
`events:write`. Each case attacks queries of its own, so one case's holds do not shield the next.
The next training runs on all of it and is gated as the
scheduler's would be; the case records where the targets rank in the challenger and in
the champion afterwards, whether the challenger was promoted, and clean NDCG@10 on the eval split
(which never feeds training). Every case starts from the clean champion without the previous
case's labels (purged by the bench as an operator would).

Real users teach the model during the attack too, and that alone moves documents (a target went
from 15th to 8th in a case whose store held no attack label). So each case also trains a *control*:
the same training from the same champion on the same labels minus every label of the attack's
identities, whatever the stream did with them. The attack's effect is the challenger against the
control, and the checks hold the attack, not the real users, to the issue's targets.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
from pydantic import BaseModel
from rich.console import Console
from rich.progress import Progress

from schemas import FIRST_STAGE, RequestFailed
from services.auth import KeyStore, Scope
from services.cli.progress import ProgressBar
from services.config import Settings
from services.control.promotion import Promotions
from services.control.scheduler import estimated_examination, retrain, training_job
from services.local import infra
from services.local.simulate import UserModel, app_client, examination_curve, simulate
from services.local.workers import settle_labels, spawn, stop, wait_healthy, worker_env
from services.sdk import RankloopClient
from services.storage import open_labels, open_registry
from services.storage.kafka import read_topic
from training import beir
from training.evaluate import evaluate_ranker
from training.indexing import build_index
from training.labels.store import LabelStore, Lineage, Purge, describe
from training.pipeline import TrainOutcome, train_once
from training.ranking.first_stage import Candidate, FirstStage
from training.ranking.rank import candidates_for, rank
from training.ranking.reranker import Reranker
from training.registry import MlflowRegistry

console = Console()
TARGET_POSITIONS = range(15, 21)  # where a target starts: out of the top 10, within reach of the reranker


class PoisonTarget(BaseModel):
    query: str
    doc_id: str
    rank_before: int
    rank_control: int | None  # in the control: trained without any label of the attack's identities
    rank_challenger: int | None  # in the model trained on the attack, promoted or not
    rank_after: int  # in the champion after the case

    def attack_held_off(self, top: int) -> bool:
        """The challenger keeps the target out of the top `top`, or no higher than the control has it."""
        r = self.rank_challenger
        return r is None or r > top or (self.rank_control is not None and r >= self.rank_control)


class PoisonCase(BaseModel):
    identities: int
    keyed: bool = False  # the attacker used an API key of its own, not the application's
    clicks: int
    accepted: int
    rejected: dict[str, int]
    dead_letters: dict[str, int]
    quarantined_identities: int
    holds: int = 0  # (query, doc) pairs the stream held for review during the case
    target_rank_before: int  # the best (lowest) rank of any target
    target_rank_control: int | None
    target_rank_challenger: int | None
    target_rank_after: int
    challenger_version: str | None
    promoted: bool
    gate: str
    clean_ndcg_before: float
    clean_ndcg_control: float | None  # the control's, had it been promoted instead
    clean_ndcg_after: float
    targets: list[PoisonTarget]
    seconds: dict[str, float]


class PoisonChecks(BaseModel):
    """The issue's targets, computed from the cases that were run (None: no such case). A target
    "in the top N" counts against the attack only where the control does not have it as high."""

    one_identity_never_in_top_10: bool | None  # of any challenger, promoted or not
    never_in_top_3_of_a_promoted_model: bool
    never_more_than_3_above_control: bool  # of any challenger, promoted or not
    few_identities_quarantined: bool | None  # every identity of the 1- and 20-identity cases
    clean_ndcg_at_most_0_005_lower: bool  # than before the case; real users go on, so it may rise
    clean_ndcg_at_most_0_005_below_control: bool


class PoisonPlan(BaseModel):
    """What the benchmark does: the clean traffic, then one attack per entry of `identities`."""

    dataset: str
    train_split: str = "train"
    eval_split: str = "test"
    identities: list[int] = [1, 20, 500, 5000]
    keyed_identities: int = 500  # one more case: this many identities behind the attacker's own key (0: none)
    clicks: int = 5000  # per case, spread over the identities and the attacked queries
    queries: int = 5
    sessions: int = 3000  # simulated users of the clean round
    case_sessions: int = 1000  # simulated users alongside each attack
    backdate_s: float = 240.0
    seed: int = 0


class PoisonBenchResult(BaseModel):
    plan: PoisonPlan
    burst_limit: int  # stream.burst_limit of the run (0: bursts not detected)
    defences: dict[str, float] = {}  # the trust settings of the run (docs/security.md)
    clean_champion: str
    clean_ndcg: float
    cases: list[PoisonCase]
    checks: PoisonChecks
    timings: dict[str, float]


def run_poison_bench(s: Settings, plan: PoisonPlan, out: Path) -> PoisonBenchResult:
    """Runs on its own local infrastructure, which is stopped afterwards, failed or not."""
    try:
        return _run(s, plan, out)
    finally:
        infra.down(s)


def _run(s: Settings, plan: PoisonPlan, out: Path) -> PoisonBenchResult:
    t_all = time.time()
    infra.up(s)
    ds = beir.load(s.dataset, s.state_dir / "datasets")
    with ProgressBar(console) as progress:
        build_index(ds, s.state_dir, progress=progress)
    fs = FirstStage.current(s.state_dir)
    registry = open_registry(s)
    labels = open_labels(s.label_store_url)
    depth = s.serving.rerank_depth
    eval_cands = candidates_for(fs, [ds.queries[q] for q in ds.qrels(plan.eval_split)])

    def champion() -> tuple[str, Reranker | None]:
        v = registry.champion()
        return (v.version, Reranker(registry.fetch(v), v.version).warm(fs)) if v else (FIRST_STAGE, None)

    def clean_ndcg(reranker: Reranker | None) -> float:
        return evaluate_ranker(ds, plan.eval_split, eval_cands, reranker, fs.text, depth)["ndcg@10"]

    s.serving = s.serving.model_copy(update={"champion_poll_s": 5.0, "explore_seed": plan.seed})
    keys = KeyStore(s.keys_file)
    _, app_key = keys.create("app", [Scope.rank, Scope.events_write])
    _, own_key = keys.create("attacker", [Scope.rank, Scope.events_write])
    procs = {name: spawn(s, name, worker_env(s, RANKLOOP_TORCH_THREADS="1")) for name in ("serve", "stream")}
    timings: dict[str, float] = {}
    cases_planned = [(n, False) for n in plan.identities] + ([(plan.keyed_identities, True)] if plan.keyed_identities else [])
    try:
        wait_healthy(s, procs)
        sdk = app_client(s, api_key=app_key)
        t = time.time()
        users = UserModel(examination_curve(s.clicklog))
        simulate(sdk, ds, plan.train_split, plan.sessions, users, seed=plan.seed)
        settle_labels(s, labels)
        clean = retrain(s, labels=labels, first_stage=fs, registry=registry)
        console.print(f"clean round: {clean.summary}")
        if clean.fate == "promoted":
            await_served(s, str(clean.outcome.version))
        clean_version, clean_model = champion()
        clean_score = clean_ndcg(clean_model)
        timings["clean_round_s"] = time.time() - t
        n_targets = plan.queries * len(cases_planned)
        chosen = list(choose_targets(ds, plan.train_split, fs, clean_model, depth, n_targets, plan.seed).items())
        console.print(f"clean champion {clean_version}: {plan.eval_split} NDCG@10 {clean_score:.4f}")
        cases = []
        for i, (n, keyed) in enumerate(cases_planned, start=1):
            targets = dict(chosen[(i - 1) * plan.queries : i * plan.queries])

            def clean_traffic(i: int = i) -> None:
                simulate(sdk, ds, plan.train_split, plan.case_sessions, users, seed=plan.seed * 1000 + i, progress=False)

            attacker = RankloopClient(s.base_url, deployment=s.deployment, api_key=own_key if keyed else app_key)
            case = attack_case(
                s,
                attacker,
                registry,
                labels,
                fs,
                targets,
                n,
                plan.clicks,
                plan.backdate_s,
                clean_model,
                clean_score,
                champion,
                clean_ndcg,
                clean_traffic,
                keyed,
            )
            cases.append(case)
            console.print(
                f"{n} identities{' (own key)' if keyed else ''}, {plan.clicks} clicks: target best rank "
                f"{case.target_rank_before} -> control {case.target_rank_control}, challenger {case.target_rank_challenger}, "
                f"champion {case.target_rank_after}; promoted {case.promoted}; clean NDCG@10 "
                f"{case.clean_ndcg_before:.4f} -> {case.clean_ndcg_after:.4f}"
            )
            if registry.champion() and registry.champion().version != clean_version:  # type: ignore[union-attr]
                back = "bench poison: the clean champion back for the next case"
                Promotions.connect(s, registry).promote(clean_version, back, actor="bench")
                await_served(s, clean_version)
    finally:
        stop(procs)
    timings["total_s"] = time.time() - t_all
    result = PoisonBenchResult(
        plan=plan,
        burst_limit=s.stream.burst_limit,
        defences={
            "train.unverified_weight": s.train.unverified_weight,
            "auth.new_identities_per_min": s.auth.new_identities_per_min,
            "stream.anomaly_min_identities": s.stream.anomaly_min_identities,
            "stream.anomaly_ratio": s.stream.anomaly_ratio,
            "gate.min_trusted_sources": s.gate.min_trusted_sources,
            "gate.max_query_share": s.gate.max_query_share,
            "gate.max_unsupported_rise": s.gate.max_unsupported_rise,
        },
        clean_champion=clean_version,
        clean_ndcg=round(clean_score, 4),
        cases=cases,
        checks=checks(cases),
        timings={k: round(v, 1) for k, v in timings.items()},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result.model_dump_json(indent=2))
    return result


def served(s: Settings) -> str | None:
    """The version the serving worker serves, from its open readiness route (keys are on in this bench)."""
    try:
        return str(httpx.get(f"{s.base_url}/health/ready", timeout=10).json().get("model_version"))
    except (httpx.HTTPError, ValueError):
        return None


def await_served(s: Settings, version: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while served(s) != version and time.time() < deadline:
        time.sleep(1)


def target_rank(
    query: str, doc_id: str, cands: list[Candidate], reranker: Reranker | None, fs: FirstStage, depth: int
) -> int | None:
    ranking = rank(query, cands, reranker, fs.text, depth)
    return next((i + 1 for i, (d, _) in enumerate(ranking) if d == doc_id), None)


def choose_targets(
    ds: beir.Dataset, split: str, fs: FirstStage, reranker: Reranker | None, depth: int, n: int, seed: int
) -> dict[str, str]:
    """query -> an irrelevant doc the champion ranks within TARGET_POSITIONS, for `n` train queries."""
    qrels = ds.qrels(split)
    qids = sorted(qrels)
    random.Random(seed).shuffle(qids)
    out: dict[str, str] = {}
    for qid in qids:
        query = ds.queries[qid]
        ranking = rank(query, candidates_for(fs, [query])[query], reranker, fs.text, depth)
        irrelevant = [d for d, _ in ranking[TARGET_POSITIONS.start - 1 : TARGET_POSITIONS.stop - 1] if d not in qrels[qid]]
        if irrelevant:
            out[query] = irrelevant[0]
        if len(out) == n:
            break
    return out


def dead_letter_codes(s: Settings) -> Counter[str]:
    return Counter(str(d.get("code")) for d in read_topic(s.kafka.address, s.keys.dead_letters, idle_ms=1500))


def attack_case(
    s: Settings,
    sdk: RankloopClient,
    registry: MlflowRegistry,
    labels: LabelStore,
    fs: FirstStage,
    targets: dict[str, str],
    n_identities: int,
    clicks: int,
    backdate_s: float,
    clean_model: Reranker | None,
    clean_score: float,
    champion: Callable[[], tuple[str, Reranker | None]],
    clean_ndcg: Callable[[Reranker | None], float],
    clean_traffic: Callable[[], None],
    keyed: bool = False,
) -> PoisonCase:
    depth = s.serving.rerank_depth
    cands = candidates_for(fs, list(targets))
    before = {q: target_rank(q, d, cands[q], clean_model, fs, depth) or 0 for q, d in targets.items()}
    who = [f"attacker-{n_identities}{'k' if keyed else ''}-{i}" for i in range(n_identities)]
    holds_before = {h.hold_id for h in labels.holds()}
    dead_before = dead_letter_codes(s)
    accepted, rejected = 0, Counter[str]()
    lock = threading.Lock()
    queries = list(targets)
    t = time.time()

    def click(i: int) -> None:
        nonlocal accepted
        query, user = queries[i % len(queries)], who[i % len(who)]
        for _ in range(10):  # an explored (shuffled) answer may not show the target: ask again
            try:
                ranked = sdk.rank(query, k=TARGET_POSITIONS.stop + 5, user=user)
            except RequestFailed as e:  # 429: the key's (or network's) budget of new identities is spent
                with lock:
                    rejected["rank_" + ("new_identity_limit" if "429" in str(e) else "failed")] += 1
                return
            if targets[query] in {it.doc_id for it in ranked.items}:
                break
        else:
            return
        stamp = time.time() - backdate_s
        events = [
            sdk.event(ranked.request_id, targets[query], kind, value).model_copy(update={"timestamp": stamp})
            for kind, value in (("click", None), ("dwell", 120.0))
        ]
        answer = sdk.emit(events)
        with lock:
            accepted += sum(1 for e in answer.accepted if e == events[0].event_id)
            rejected.update(r.code.value for r in answer.rejected if r.event_id == events[0].event_id)

    users = threading.Thread(target=clean_traffic)  # real users go on meanwhile
    users.start()
    with Progress(disable=not console.is_terminal) as bar, ThreadPoolExecutor(4) as pool:
        task = bar.add_task(f"attack: {clicks} clicks from {n_identities} identities", total=clicks)
        for _ in pool.map(click, range(clicks)):
            bar.advance(task)
    users.join()
    settle_labels(s, labels)
    t_control = time.time()
    control = train_control(s, registry, labels, fs, {f"user:{u}" for u in who})
    control_model = load_version(registry, fs, control)
    t_train = time.time()
    done = retrain(s, labels=labels, first_stage=fs, registry=registry)
    outcome = done.outcome
    challenger = load_version(registry, fs, outcome)
    if done.fate == "promoted":
        await_served(s, str(outcome.version))
    _, after_model = champion()
    rows = [
        PoisonTarget(
            query=q,
            doc_id=d,
            rank_before=before[q],
            rank_control=target_rank(q, d, cands[q], control_model, fs, depth) if control_model else None,
            rank_challenger=target_rank(q, d, cands[q], challenger, fs, depth) if challenger else None,
            rank_after=target_rank(q, d, cands[q], after_model, fs, depth) or 0,
        )
        for q, d in targets.items()
    ]
    dead = dead_letter_codes(s) - dead_before
    quarantined = {p.identity for p in labels.purges() if p.actor == "stream" and p.identity}
    for user in who:  # the operator's clean-up, so the next case starts from clean labels
        if f"user:{user}" not in quarantined:
            labels.purge(
                Purge(identity=f"user:{user}", reason="bench poison: end of case", actor="bench", at=time.time()), count=False
            )
    new_holds = [h for h in labels.holds() if h.hold_id not in holds_before]
    for h in new_holds:  # the operator's verdict on what the stream held: the attack's, purged up to now
        end = time.time()
        labels.hold(h.model_copy(update={"status": "purged", "decided_by": "bench", "decided_at": end, "decision": "attack"}))
        labels.purge(
            h.as_purge("bench", "bench poison: held pair, end of case", end).model_copy(update={"until": end}), count=False
        )
    challenger_ranks = [r.rank_challenger for r in rows if r.rank_challenger is not None]
    control_ranks = [r.rank_control for r in rows if r.rank_control is not None]
    return PoisonCase(
        identities=n_identities,
        keyed=keyed,
        clicks=clicks,
        accepted=accepted,
        rejected=dict(rejected),
        dead_letters=dict(dead),
        quarantined_identities=sum(1 for u in who if f"user:{u}" in quarantined),
        holds=len(new_holds),
        target_rank_before=min(r.rank_before for r in rows),
        target_rank_control=min(control_ranks) if control_ranks else None,
        target_rank_challenger=min(challenger_ranks) if challenger_ranks else None,
        target_rank_after=min(r.rank_after for r in rows),
        challenger_version=str(outcome.version) if outcome.version else None,
        promoted=done.fate == "promoted",
        gate=outcome.message,
        clean_ndcg_before=round(clean_score, 4),
        clean_ndcg_control=round(clean_ndcg(control_model), 4) if control_model else None,
        clean_ndcg_after=round(clean_ndcg(after_model), 4),
        targets=rows,
        seconds={
            "attack": round(t_control - t, 1),
            "control": round(t_train - t_control, 1),
            "train_and_gate": round(time.time() - t_train, 1),
        },
    )


def checks(cases: list[PoisonCase]) -> PoisonChecks:
    one = [c for c in cases if c.identities == 1]
    few = [c for c in cases if c.identities <= 20 and not c.keyed]
    return PoisonChecks(
        one_identity_never_in_top_10=all(t.attack_held_off(10) for c in one for t in c.targets) if one else None,
        never_in_top_3_of_a_promoted_model=all(t.attack_held_off(3) for c in cases if c.promoted for t in c.targets),
        never_more_than_3_above_control=all(
            t.rank_challenger is None or t.rank_control is None or t.rank_challenger >= t.rank_control - 3
            for c in cases
            for t in c.targets
        ),
        few_identities_quarantined=all(c.quarantined_identities == c.identities for c in few) if few else None,
        clean_ndcg_at_most_0_005_lower=all(c.clean_ndcg_after >= c.clean_ndcg_before - 0.005 for c in cases),
        clean_ndcg_at_most_0_005_below_control=all(
            c.clean_ndcg_control is None or c.clean_ndcg_after >= c.clean_ndcg_control - 0.005 for c in cases
        ),
    )


class WithoutIdentities:
    """A label store read as if these identities had never sent anything: the control's labels."""

    def __init__(self, store: LabelStore, identities: set[str]):
        self.store, self.identities = store, identities

    def read(self) -> tuple[pd.DataFrame, Lineage]:
        df, lineage = self.store.read()
        kept = df[~df["identity"].isin(self.identities)].reset_index(drop=True)
        return kept, {**lineage, **describe(kept)}


def train_control(
    s: Settings, registry: MlflowRegistry, labels: LabelStore, fs: FirstStage, identities: set[str]
) -> TrainOutcome:
    """The training the scheduler would run from the same champion, on the labels minus the
    attack's; registered (tagged as the bench's control) but never promoted."""
    curve = estimated_examination(s, labels) if s.train.debias != "naive" else None
    outcome = train_once(registry, WithoutIdentities(labels, identities), fs, training_job(s, curve))  # type: ignore[arg-type]
    if outcome.version:
        registry.tag(str(outcome.version), "bench", "poison control: trained without the attack's identities")
    return outcome


def load_version(registry: MlflowRegistry, fs: FirstStage, outcome: TrainOutcome) -> Reranker | None:
    version = str(outcome.version) if outcome.version else None
    return Reranker(registry.fetch(registry.get(version)), version).warm(fs) if version else None
