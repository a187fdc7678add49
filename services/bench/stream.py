"""`rankloop bench stream`: how many events the stream labels per second, how fresh the labels are, and
whether every accepted event ends as a label contribution or a dead letter, exactly once, even when a
worker is killed.

On its own local stack (Tansu, redis-server) with `--workers` stream processes on `kafka.partitions`
partitions, it sends impressions (as serving publishes them) and their interactions (click, dwell,
skip; plus resent duplicates, malformed payloads and clicks on documents never shown): a `http_share`
of the requests' interactions as applications post them (`POST /events` of a serving worker, in
batches), the rest as the SDK's Kafka path sends them. It waits until the stream has consumed
everything and stored every label, then audits the label table and the dead-letter topic against what
was accepted. Every figure comes from that audit.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from pydantic import BaseModel
from rich.console import Console

from services.cli.progress import ProgressBar
from services.config import Settings
from services.local import infra
from services.local.workers import settle_labels, spawn, stop, wait_healthy, worker_env
from services.storage import open_activity
from services.storage.delta import DeltaLabelStore
from services.storage.kafka import make_producer, read_topic
from training import beir
from training.indexing import build_index

console = Console()
INTERACTIONS_PER_REQUEST = 3  # click, dwell on it, skip of another
HTTP_BATCH = 500  # events per POST /events
HTTP_SENDERS = 4  # batches in flight at once, as several application servers would post


class Freshness(BaseModel):
    p50: float
    p95: float
    p99: float


class StreamBenchResult(BaseModel):
    events: int  # interaction events sent (valid, invalid and resent)
    impressions: int
    accepted: int  # interactions acknowledged by the broker, or accepted by POST /events
    http_share: float  # share of requests whose interactions went through POST /events
    http_events: int  # interaction events posted
    http_accepted: int
    http_rejected: dict[str, int] = {}  # refused at intake (the client is told), by code
    labels: int  # distinct labels in the table
    label_contributions: int  # label revisions stored
    dead_letters: int
    duplicates_rejected: int  # resent events the stream recognised (counted, not labelled again)
    lost: int  # accepted events that are neither in a label nor a dead letter
    lost_examples: list[str] = []  # a few of them (event ids, or "malformed"), to look for in the workers' logs
    dead_letters_by_code: dict[str, int] = {}
    duplicate_labels: int  # (label_id, revision) stored more than once
    seconds: float  # first send to the last label stored
    send_seconds: float
    labelled_per_s: float  # accepted interaction events / seconds
    messages_per_s: float  # impressions and interactions / seconds
    freshness_s: Freshness  # event sent -> the label revision it caused is in the table
    workers: int
    partitions: int
    rate: float  # interaction events per second asked for (0: as fast as the producer goes)
    killed_one: bool
    killed_all: bool  # the whole stream killed and restarted
    rss_mb: dict[str, list[float] | float]
    # CPU seconds each part used from the first send until the stream had caught up (user + system; a
    # killed worker's up to its kill, its replacement's from its start): where the cores went, and what
    # one accepted event costs in all
    cpu_s: dict[str, float]
    cpu_ms_per_event: float
    notes: list[str]


def traffic(n_requests: int, seed: int, planted: dict[str, int], http_share: float = 0.0) -> Iterator[tuple[str, str, bytes]]:
    """(route, key, payload) in send order, stamped when made: a request's impression, then its click,
    dwell and a skip; 1 % of events resent unchanged, 0.5 % malformed, 0.5 % on an unshown doc (counted
    into `planted` when they go to Kafka). Route: "impression", "interaction" (Kafka) or "http" (a
    `http_share` of the requests; a malformed one is an event missing its type, which JSON can carry)."""
    rng = random.Random(seed)
    for i in range(n_requests):
        now = time.time()
        rid = uuid.UUID(int=rng.getrandbits(128)).hex
        docs = [f"d{rng.randrange(5000)}" for _ in range(10)]
        impression = {
            "schema_version": 1, "request_id": rid, "query": f"query {rng.randrange(2000)}", "user": f"u{i % 50_000}",
            "items": [{"doc_id": d, "position": p + 1, "score": 1.0 / (p + 1)} for p, d in enumerate(docs)],
            "model_version": "first-stage", "index_version": "bench", "timestamp": now,
        }  # fmt: skip
        yield "impression", rid, json.dumps(impression).encode()
        route = "http" if rng.random() < http_share else "interaction"
        clicked = rng.randrange(10)
        acts = [
            (docs[clicked], "click", None),
            (docs[clicked], "dwell", 30.0 + rng.random() * 100),
            (docs[(clicked + 1) % 10], "skip", None),
        ]
        for doc, kind, value in acts:
            event = {"schema_version": 1, "event_id": uuid.UUID(int=rng.getrandbits(128)).hex, "request_id": rid,
                     "doc_id": doc, "type": kind, "value": value, "timestamp": now}  # fmt: skip
            roll = rng.random()
            if roll < 0.005:
                if route == "http":
                    yield route, rid, json.dumps({k: v for k, v in event.items() if k != "type"}).encode()
                    continue
                planted["malformed"] += 1
                yield route, rid, b'{"event_id": "' + str(event["event_id"]).encode() + b'", "type": '
                continue
            if roll < 0.01:
                event["doc_id"] = "never-shown"
                planted["unshown"] += 1
            payload = json.dumps(event).encode()
            yield route, rid, payload
            if rng.random() < 0.01:
                planted["duplicates"] += 1
                yield route, rid, payload


def start_intake(s: Settings) -> subprocess.Popen:
    """A serving worker for `POST /events`, on a one-document index (it ranks nothing here), with no
    per-key limit on batches."""
    corpus = s.state_dir / "intake-corpus"
    (corpus / "qrels").mkdir(parents=True, exist_ok=True)
    (corpus / "corpus.jsonl").write_text(json.dumps({"_id": "d0", "title": "intake", "text": "events only"}) + "\n")
    (corpus / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "events"}) + "\n")
    (corpus / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    build_index(beir.load(corpus), s.state_dir)
    proc = spawn(s, "serve", worker_env(s, RANKLOOP_AUTH__EVENTS_PER_S="0"), ("--workers", "1"))
    wait_healthy(s, {"serve": proc})
    return proc


class IntakeClient:
    """Posts batches of events from a few threads; what each answer accepted is stamped with the time
    its batch was sent (freshness counts from there)."""

    def __init__(self, base_url: str) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=60)
        self.pool = ThreadPoolExecutor(HTTP_SENDERS)
        self.futures: list[Future] = []
        self.batch: list[bytes] = []
        self.posted = 0

    def add(self, payload: bytes) -> None:
        self.batch.append(payload)
        self.posted += 1
        if len(self.batch) >= HTTP_BATCH:
            self.flush()

    def flush(self) -> None:
        if self.batch:
            body, self.batch = b"[" + b",".join(self.batch) + b"]", []
            self.futures.append(self.pool.submit(self._post, body))

    def _post(self, body: bytes) -> tuple[float, int, dict]:
        at = time.time()
        r = self.client.post("/events", content=body, headers={"Content-Type": "application/json"})
        return at, r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json") else {}

    def results(self) -> tuple[dict[str, float], Counter]:
        """(accepted event id -> when sent, rejections by code; a failed batch counts as "http <status>")."""
        self.flush()
        accepted: dict[str, float] = {}
        rejected: Counter = Counter()
        for f in self.futures:
            at, status, answer = f.result()
            for event_id in answer.get("accepted", []):
                accepted.setdefault(event_id, at)
            rejected.update(r["code"] for r in answer.get("rejected", []))
            if status >= 500 or not answer:
                rejected[f"http {status}"] += 1
        self.pool.shutdown()
        self.client.close()
        return accepted, rejected


def run_stream_bench(
    s: Settings,
    events: int,
    workers: int,
    kill_one: bool,
    out: Path,
    seed: int = 0,
    rate: float = 0.0,
    kill_all: bool = False,
    http_share: float = 0.0,
) -> StreamBenchResult:
    """`rate`: interaction events per second to send at (0: as fast as the producer goes). At 40 % of
    the sending, `kill_one` kills one worker with SIGKILL and `kill_all` every worker (the whole
    stream), and starts them again. `http_share`: share of requests whose interactions are posted to a
    serving worker's `POST /events` instead of sent to Kafka."""
    keys = s.keys
    notes: list[str] = []
    infra.up(s)
    intake = {"serve": start_intake(s)} if http_share > 0 else {}
    env = worker_env(s, RANKLOOP_STREAM__METRICS_PORT="0")
    procs = {f"stream-{i}": spawn(s, "stream", env, label=f"stream-{i}") for i in range(workers)}
    store = DeltaLabelStore(s.label_store_url)
    stream_rss: dict[str, float] = {}
    killed = False
    try:
        planted = {"duplicates": 0, "malformed": 0, "unshown": 0}
        n_requests = events // INTERACTIONS_PER_REQUEST
        time.sleep(8)  # the workers join the group and get their partitions
        producer = make_producer(s.kafka.address, linger_ms=20)
        poster = IntakeClient(s.base_url)
        topic = {"impression": keys.impressions, "interaction": keys.interactions}
        sent_at: dict[str, float] = {}
        ids: list[tuple[int, str, float]] = []  # (send number, event id, when) of well-formed interactions
        malformed: list[int] = []  # send numbers of the malformed ones
        futures, kinds = [], []
        cpu_at_start = _cpu_by_part(s, procs, intake)
        cpu_at_kill: dict[str, float] = {}
        t0 = time.time()
        what = f"sending {n_requests:,} requests' messages"
        with ProgressBar(console) as progress:
            for n, (kind, key, payload) in enumerate(traffic(n_requests, seed, planted, http_share)):
                if kind == "http":
                    poster.add(payload)
                    continue
                futures.append(producer.send(topic[kind], key=key.encode(), value=payload))
                kinds.append(kind)
                if kind == "interaction" and payload.endswith(b"}"):
                    ids.append((len(futures) - 1, json.loads(payload)["event_id"], time.time()))
                elif kind == "interaction":
                    malformed.append(len(futures) - 1)
                if (kill_one or kill_all) and not killed and n >= n_requests * 4 * 0.4:
                    for name in list(procs) if kill_all else ["stream-0"]:
                        stream_rss[f"{name} (killed)"] = _rss_mb(procs[name].pid)
                        cpu_at_kill[f"{name} (killed)"] = _cpu_s(procs[name].pid) - cpu_at_start.pop(name, 0.0)
                        procs[name].kill()  # SIGKILL: no shutdown, no commit
                        procs[name].wait()
                    for name in list(procs) if kill_all else ["stream-0"]:
                        procs[name] = spawn(s, "stream", env, label=name)
                    killed = True
                if n % 2000 == 0:
                    progress(what, n // 4, n_requests)
                if rate and n % 100 == 0:  # paced: freshness at a load the stream sustains
                    time.sleep(max(0.0, t0 + len(ids) / rate - time.time()))
            producer.flush()
            http_accepted, http_rejected = poster.results()
        send_s = time.time() - t0
        accepted = sum(1 for f in futures if f.succeeded())
        for n, event_id, at in ids:  # only what the broker acknowledged was accepted
            if futures[n].succeeded():
                sent_at.setdefault(event_id, at)
        for event_id, at in http_accepted.items():  # and what POST /events answered as accepted
            sent_at.setdefault(event_id, at)
        planted["malformed"] = sum(1 for n in malformed if futures[n].succeeded())
        interactions = kinds.count("interaction") + poster.posted
        accepted_interactions = sum(1 for f, kind in zip(futures, kinds, strict=True) if f.succeeded() and kind == "interaction")
        accepted_interactions += len(http_accepted)
        console.print(
            f"sent {len(kinds):,} messages to Kafka and posted {poster.posted:,} events in {send_s:.1f}s; "
            "waiting for the stream to label them"
        )
        settle_labels(s, store, timeout=1800)
        caught_up = _cpu_by_part(s, procs, intake)
        cpu = {**cpu_at_kill, **{name: v - cpu_at_start.get(name, 0.0) for name, v in caught_up.items()}}
        done_at = max(store.raw(["stored_at"]).column("stored_at").to_pylist())
        # joined requests are forgotten two windows after their impression: only then are the events
        # no label used dead-lettered, which the audit needs
        time.sleep(max(0.0, t0 + send_s + 2 * s.stream.join_window_s + 15 - time.time()))
        seconds = done_at - t0
        for name, p in procs.items():
            stream_rss[name] = _rss_mb(p.pid)
        audit = _audit(s, store, sent_at, planted)
        redis_rss = _rss_mb(_pid_of_redis(s))
    finally:
        stop({**procs, **intake})
        infra.down(s)
    if accepted < len(kinds):
        notes.append(f"{len(kinds) - accepted} sends were not acknowledged by the broker")
    result = StreamBenchResult(
        events=interactions,
        impressions=kinds.count("impression"),
        accepted=accepted_interactions,
        http_share=http_share,
        http_events=poster.posted,
        http_accepted=len(http_accepted),
        http_rejected=dict(sorted(http_rejected.items())),
        seconds=round(seconds, 2),
        send_seconds=round(send_s, 2),
        labelled_per_s=round(accepted_interactions / seconds, 1),
        messages_per_s=round((accepted + len(http_accepted)) / seconds, 1),
        workers=workers,
        partitions=s.kafka.partitions,
        rate=rate,
        killed_one=killed and not kill_all,
        killed_all=killed and kill_all,
        rss_mb={"stream": [round(v, 1) for v in stream_rss.values()], "redis": round(redis_rss, 1)},
        cpu_s={name: round(v, 1) for name, v in cpu.items()},
        cpu_ms_per_event=round(1000 * sum(cpu.values()) / max(1, accepted_interactions), 3),
        notes=notes,
        **audit,
    )
    out.write_text(result.model_dump_json(indent=2))
    return result


def _audit(s: Settings, store, sent_at: dict[str, float], planted: dict[str, int]) -> dict:
    """Every accepted event is in a label or a dead letter; no revision stored twice; freshness."""
    rows = store.raw(["label_id", "revision", "event_ids", "stored_at"]).to_pylist()
    stored_pairs = {(r["label_id"], r["revision"]) for r in rows}
    contributed = {e for r in rows for e in r["event_ids"]}
    fresh = sorted(r["stored_at"] - max(sent_at.get(e, 0.0) for e in r["event_ids"]) for r in rows if r["event_ids"])
    dead = list(read_topic(s.kafka.address, s.keys.dead_letters, idle_ms=3000))
    dead_ids = set()
    for d in dead:
        try:
            dead_ids.add(json.loads(d["payload"])["event_id"])
        except (ValueError, KeyError, TypeError):
            continue  # a malformed payload: counted below by its reason
    malformed = sum(1 for d in dead if d.get("code") == "invalid_event")
    missing = sorted(set(sent_at) - contributed - dead_ids)
    malformed_missing = max(0, planted["malformed"] - malformed)
    by_code = Counter(str(d.get("code")) for d in dead)
    counts = _activity_totals(s)

    def q(p: float) -> float:
        return round(fresh[min(len(fresh) - 1, int(p * len(fresh)))], 3) if fresh else 0.0

    return {
        "labels": len({r["label_id"] for r in rows}),
        "label_contributions": len(rows),
        "dead_letters": len(dead),
        "duplicates_rejected": counts.get("duplicates", 0),
        "lost": len(missing) + malformed_missing,
        "lost_examples": missing[:10] + ["malformed"] * min(malformed_missing, 3),
        "dead_letters_by_code": dict(sorted(by_code.items())),
        "duplicate_labels": len(rows) - len(stored_pairs),
        "freshness_s": Freshness(p50=q(0.5), p95=q(0.95), p99=q(0.99)),
    }


def _activity_totals(s: Settings) -> dict[str, int]:
    totals: dict[str, int] = {}
    for _, counts in open_activity(s.redis_url, s.keys).minutes(60):
        for k, v in counts.items():
            totals[k] = totals.get(k, 0) + v
    return totals


def _rss_mb(pid: int | None) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20 if pid else 0.0
    except psutil.NoSuchProcess:
        return 0.0


def _cpu_by_part(s: Settings, procs: dict[str, subprocess.Popen], intake: dict[str, subprocess.Popen]) -> dict[str, float]:
    """CPU seconds so far of each stream worker, the intake, the broker, Redis and this process."""
    own = psutil.Process().cpu_times()  # this process alone: the workers it started are its children
    return {
        **{name: _cpu_s(p.pid) for name, p in procs.items()},
        "intake": _cpu_s(intake["serve"].pid) if intake else 0.0,
        "broker": _cpu_s(_pid_from(s, "kafka")),
        "redis": _cpu_s(_pid_of_redis(s)),
        "bench": own.user + own.system,
    }


def _cpu_s(pid: int | None) -> float:
    """User and system CPU seconds of a process and its descendants so far (0 if it is gone)."""
    try:
        top = psutil.Process(pid) if pid else None
        procs = [top, *top.children(recursive=True)] if top else []
        return sum(sum(p.cpu_times()[:4]) for p in procs)  # user, system, and of children waited for
    except psutil.NoSuchProcess:
        return 0.0


def _pid_from(s: Settings, name: str) -> int | None:
    """The pid a locally started service (infra.up) wrote."""
    path = infra.run_dir(s) / f"{name}.pid"
    return int(path.read_text()) if path.exists() else None


def _pid_of_redis(s: Settings) -> int | None:
    for p in psutil.process_iter(["name", "cmdline"]):
        if "redis-server" in (p.info["name"] or "") and f":{s.redis.local_port}" in " ".join(p.info["cmdline"] or []):
            return p.pid
    return None


class CountCost(BaseModel):
    """What the scheduler's "how many new labels?" costs on a big table (it runs every check_s)."""

    labels: int
    commits: int
    files: int
    count_ms_first: float  # a new process: the table's log read from its last checkpoint
    count_ms_next: float  # the scheduler's later checks: only new commits are read (median of 5)
    count_ms_after_compaction: float
    files_after_compaction: int
    read_s: float  # what a training run's read of every label costs (latest revisions, its columns)


def measure_count(folder: Path, labels: int = 1_000_000, per_commit: int = 2000) -> CountCost:
    """Fills a fresh label table with `labels` rows in stream-sized commits, then times `count()`."""
    from schemas import LabelledExample
    from services.storage.delta import DeltaLabelStore

    store = DeltaLabelStore(folder)
    commits = labels // per_commit
    with ProgressBar(console) as progress:
        for c in range(commits):
            batch = [
                LabelledExample(
                    label_id=f"r{c}-{i}:d{i % 10}",
                    revision=1,
                    request_id=f"r{c}-{i}",
                    query=f"query {i % 997}",
                    doc_id=f"d{i % 10}",
                    position=i % 10 + 1,
                    grade=1 if i % 3 == 0 else -1,
                    weight=1.0,
                    propensity=0.5,
                    signals=["click"],
                    event_ids=[f"e{c}-{i}"],
                    model_version="1",
                    index_version="bench",
                    identity=f"user:u{i % 5000}",
                    timestamp=1.8e9 + c,
                )
                for i in range(per_commit)
            ]
            store.write(batch, {"bench@x-p0": c})
            progress("filling a label table", c + 1, commits)

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000

    fresh = DeltaLabelStore(folder)
    first = timed(fresh.count)
    store.write(batch[:10], {"bench@x-p0": commits})  # a new commit, as the stream makes between checks
    nexts = sorted(timed(fresh.count) for _ in range(5))
    files = fresh.files()
    t = time.perf_counter()
    fresh.read()
    read_s = time.perf_counter() - t
    fresh.compact()
    return CountCost(
        labels=fresh.count(),
        commits=commits + 1,
        files=files,
        count_ms_first=round(first, 1),
        count_ms_next=round(nexts[2], 1),
        count_ms_after_compaction=round(timed(DeltaLabelStore(folder).count), 1),
        files_after_compaction=fresh.files(),
        read_s=round(read_s, 2),
    )


class DedupCost(BaseModel):
    """Redis memory of intake de-duplication: what one event id seen within the TTL costs."""

    ids: int
    bytes_per_id_key_with_ttl: float  # the former scheme: SET <dep>:event:<id> NX EX
    bytes_per_id_bucketed_hashes: float  # now: 8-byte hashes in a set per time bucket
    gb_per_hour_at_3600_per_s_before: float
    gb_per_hour_at_3600_per_s_now: float


def measure_dedup(s: Settings, ids: int = 200_000) -> DedupCost:
    """Both schemes on the local redis-server, by `used_memory` before and after `ids` sightings."""
    from redis import Redis

    from services.storage.redis import RedisSeenEvents

    infra.start_redis(s)
    try:
        redis = Redis.from_url(s.redis_url)
        names = [uuid.UUID(int=random.Random(i).getrandbits(128)).hex for i in range(ids)]

        def used() -> int:
            return int(redis.info("memory")["used_memory"])

        redis.flushdb()
        before = used()
        pipe = redis.pipeline(transaction=False)
        for n, name in enumerate(names):
            pipe.set(f"{s.deployment}:event:{name}", 1, nx=True, ex=3600)
            if n % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        per_key = (used() - before) / ids
        redis.flushdb()
        before = used()
        seen = RedisSeenEvents(redis, s.keys, 3600)
        for name in names:
            seen.first_sighting(name)
        per_hash = (used() - before) / ids
        redis.flushdb()
    finally:
        infra.down(s)
    hourly = 3600 * 3600 / 1e9
    return DedupCost(
        ids=ids,
        bytes_per_id_key_with_ttl=round(per_key, 1),
        bytes_per_id_bucketed_hashes=round(per_hash, 1),
        gb_per_hour_at_3600_per_s_before=round(per_key * hourly, 2),
        gb_per_hour_at_3600_per_s_now=round(per_hash * hourly, 2),
    )
