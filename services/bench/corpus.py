"""`rankloop bench corpus`: a living corpus under traffic. How soon an upsert is served, whether a
delete or an edit is ever served stale after its answer, whether filters hold, what updates cost
`/rank`, whether `/rerank` answers become labels, and whether a kill -9 of the indexing worker loses
an acknowledged change.

On its own local stack (Tansu, redis-server, sqlite MLflow) with `serve --workers 2` (one per core)
and the stream processor. The corpus is synthetic, so no encoding is needed and no data folder is
read: each document's text is 60 words drawn (Zipf, s=1.1, from a seed) from a vocabulary of 20,000
made-up words, plus one marker word of its own; its vector is a random unit vector; its fields are a
`lang` (en/de/fr) and a `year` (2000-2024). A query that finds a document is its marker word (BM25
matches it exactly). Every figure comes from answers the benchmark received and checked.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from pydantic import BaseModel
from rich.console import Console

from schemas.documents import FieldType
from services.bench.serve import percentile
from services.config import CorpusSettings, Settings
from services.local import infra
from services.local.load import ClientThreads
from services.local.workers import settle_labels, spawn, wait_healthy, worker_env
from services.storage import open_labels
from training.corpus.bm25 import Lease
from training.indexing import LEASE_FILE, load_documents, open_store

console = Console()
VOCABULARY = 20_000
DIM = 384
FIELDS = {"lang": FieldType.keyword, "year": FieldType.number}


class Seconds(BaseModel):
    p50: float
    p95: float
    max: float


class FilterChecks(BaseModel):
    queries: int
    violations: int


class RerankTraffic(BaseModel):
    requests: int
    labels_from_rerank_traffic: int


class Kill9(BaseModel):
    lost: int
    acknowledged_before_kill: int


class CorpusBenchResult(BaseModel):
    documents: int
    upserts: int
    deletes: int
    edits: int
    upserts_per_s: float
    visible_s: Seconds
    not_visible_within_30s: int
    delete_visible_s: Seconds
    deleted_served_after_ack: int
    stale_text_served_after_ack: int
    lost_acknowledged: int
    filter_checks: FilterChecks
    rerank: RerankTraffic
    rank_p50_ms_during_updates: float
    rank_p50_ms_idle: float
    kill9_during_updates: Kill9
    encode_docs_per_s: float
    workers: int


class Corpus:
    """The synthetic documents (see the module's docstring), made from one seed."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        weights = 1.0 / np.arange(1, VOCABULARY + 1) ** 1.1
        self.p = weights / weights.sum()

    def words(self, n: int) -> list[str]:
        return [f"w{int(i)}" for i in self.np.choice(VOCABULARY, size=n, p=self.p)]

    def document(self, doc_id: str, revision: int = 0, vector: bool = True) -> dict:
        marker = marker_of(doc_id, revision)
        doc = {
            "id": doc_id,
            "title": f"{doc_id} revision {revision}",
            "text": " ".join([*self.words(60), marker]),
            "fields": {"lang": self.rng.choice(["en", "de", "fr"]), "year": self.rng.randint(2000, 2024)},
            "version": revision,
        }
        if vector:
            v = self.np.standard_normal(DIM).astype(np.float32)
            doc["vector"] = [round(float(x), 6) for x in v / np.linalg.norm(v)]
        return doc

    def query(self) -> str:
        return " ".join(self.words(3))


def run_corpus_bench(
    s: Settings, out: Path, documents: int = 5000, seconds: float = 60.0, rate: float = 5.0
) -> CorpusBenchResult:
    s.corpus = CorpusSettings(fields=FIELDS)
    infra.down(s)
    infra.up(s)
    procs: dict = {}
    try:
        corpus = Corpus(seed=0)
        console.print(f"loading {documents} synthetic documents (vectors supplied)")
        load_documents(s.state_dir, (corpus.document(f"doc-{i}") for i in range(documents)), FIELDS)
        env = worker_env(s)
        procs = {"serve": spawn(s, "serve", env, ("--workers", "2")), "stream": spawn(s, "stream", env)}
        wait_healthy(s, {"serve": procs["serve"]})
        result = measure(s, corpus, documents, seconds, rate)
        out.write_text(result.model_dump_json(indent=2))
        return result
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=30)
            except Exception:
                p.kill()
        infra.down(s)


class Traffic(ClientThreads):
    """Clients ranking random queries (some filtered, checked) and reranking, until stopped."""

    def __init__(self, base_url: str, corpus: Corpus, clients: int = 2):
        self.base_url, self.corpus, self.clients = base_url, corpus, clients
        self.rank_ms: list[float] = []
        self.filter_queries = self.violations = 0
        self.rerank_ids: list[str] = []
        self.errors = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _client(self, n: int) -> None:
        rng = random.Random(n)
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            while not self._stop.is_set():
                body: dict = {"query": self.corpus.query(), "k": 10}
                filtered = rng.random() < 0.3
                if filtered:
                    body |= {"filters": {"lang": "de", "year": {"gte": 2010}}, "fields": True}
                started = time.perf_counter()
                try:
                    r = http.post("/rank", json=body)
                except httpx.HTTPError:  # its worker was killed: counted, and on to the next request
                    self.errors += 1
                    continue
                ms = (time.perf_counter() - started) * 1000
                if r.status_code != 200:
                    self.errors += 1
                    continue
                items = r.json()["items"]
                if filtered:
                    self.filter_queries += 1
                    self.violations += sum(1 for it in items if it["fields"]["lang"] != "de" or it["fields"]["year"] < 2010)
                else:
                    self.rank_ms.append(ms)
                if rng.random() < 0.2 and items:  # the app reranks its own candidates and a user clicks one
                    candidates = [it["doc_id"] for it in items[:5]] + [
                        {"id": f"inline-{uuid.uuid4().hex[:8]}", "text": " ".join(self.corpus.words(30))}
                    ]
                    try:
                        rr = http.post("/rerank", json={"query": body["query"], "candidates": candidates, "user": f"u{n}"})
                    except httpx.HTTPError:
                        self.errors += 1
                        continue
                    if rr.status_code == 200:
                        answer = rr.json()
                        self.rerank_ids.append(answer["request_id"])
                        doc = answer["items"][0]["doc_id"]
                        event = {"event_id": uuid.uuid4().hex, "request_id": answer["request_id"], "doc_id": doc, "type": "click"}
                        with contextlib.suppress(httpx.HTTPError):  # a lost click only lowers the label count
                            http.post("/events", json=[event])
                    else:
                        self.errors += 1


def marker_of(doc_id: str, revision: int) -> str:
    return f"m{doc_id.replace('-', '')}r{revision}"


def served(base_url: str, doc_id: str, marker: str) -> Callable[[], bool]:
    return lambda: any(it["doc_id"] == doc_id for it in found(base_url, marker))


def found(base_url: str, marker: str) -> list[dict]:
    """The answer to a query for one marker word, on a new connection: whichever worker takes it."""
    try:
        r = httpx.post(f"{base_url}/rank", json={"query": marker, "k": 10}, timeout=60)
    except httpx.HTTPError:  # the worker that took it was killed: ask again
        return []
    return r.json()["items"] if r.status_code == 200 else []


class Updates:
    """Document changes at a steady rate, each checked from the moment it was answered on threads of
    its own (so checking never slows the rate): when its new text is served, and that nothing older
    or deleted is served after the answer."""

    def __init__(self, base_url: str, corpus: Corpus):
        self.base_url, self.corpus = base_url, corpus
        self.http = httpx.Client(base_url=base_url, timeout=60)
        self.checks = ThreadPoolExecutor(max_workers=4, thread_name_prefix="check")
        self.live: dict[str, int] = {}  # doc id -> its acknowledged revision
        self.settled: set[str] = set()  # documents whose last change was checked: safe to change again
        self.visible: list[float] = []
        self.delete_visible: list[float] = []
        self.deleted_served = self.stale = self.upserts = self.edits = self.deletes = self.unseen = 0
        self._lock = threading.Lock()  # the checks count from several threads

    def step(self, n: int) -> None:
        ready = sorted(self.settled)
        op = n % 5
        if op in (0, 1, 2) or not ready:
            self._upsert(f"new-{n}", 0)
        elif op == 3:
            doc_id = self.corpus.rng.choice(ready)
            self._upsert(doc_id, self.live[doc_id] + 1)
        else:
            self._delete(self.corpus.rng.choice(ready))

    def _upsert(self, doc_id: str, revision: int) -> None:
        self.settled.discard(doc_id)
        self.http.put("/documents", json=[self.corpus.document(doc_id, revision)]).raise_for_status()
        acked = time.time()
        self.live[doc_id] = revision
        if revision:
            self.edits += 1
        else:
            self.upserts += 1
        self.checks.submit(self._check_upsert, doc_id, revision, acked)

    def _check_upsert(self, doc_id: str, revision: int, acked: float) -> None:
        title = f"{doc_id} revision {revision}"
        markers = [marker_of(doc_id, r) for r in range(max(0, revision - 1), revision + 1)]
        while time.time() - acked < 30:
            answers = [it for m in markers for it in found(self.base_url, m) if it["doc_id"] == doc_id]
            with self._lock:
                self.stale += sum(1 for it in answers if it["title"] != title)  # older text after the answer
            if any(it["title"] == title for it in answers):
                self.visible.append(round(time.time() - acked, 3))
                self.settled.add(doc_id)
                return
            time.sleep(0.05)
        with self._lock:
            self.unseen += 1

    def _delete(self, doc_id: str) -> None:
        self.settled.discard(doc_id)
        marker = marker_of(doc_id, self.live.pop(doc_id))
        self.http.post("/documents/delete", json={"ids": [doc_id]}).raise_for_status()
        self.deletes += 1
        self.checks.submit(self._check_delete, doc_id, marker, time.time())

    def _check_delete(self, doc_id: str, marker: str, acked: float) -> None:
        for i in range(5):  # on new connections: whichever worker takes each
            if any(it["doc_id"] == doc_id for it in found(self.base_url, marker)):
                with self._lock:
                    self.deleted_served += 1
            elif i == 0:
                self.delete_visible.append(round(time.time() - acked, 3))

    def close(self) -> None:
        self.checks.shutdown(wait=True)
        self.http.close()


def measure(s: Settings, corpus: Corpus, documents: int, seconds: float, rate: float) -> CorpusBenchResult:
    base = s.base_url
    with Traffic(base, corpus) as idle:
        time.sleep(min(20.0, seconds / 3))
    console.print(f"idle /rank p50 {percentile(idle.rank_ms, 0.5)} ms over {len(idle.rank_ms)} requests")
    kill = Kill9(lost=0, acknowledged_before_kill=0)
    updates = Updates(base, corpus)
    started, n = time.time(), 0
    with Traffic(base, corpus) as busy:
        while time.time() - started < seconds:
            tick = time.time()
            updates.step(n)
            if not kill.acknowledged_before_kill and time.time() - started > seconds / 2 and kill_indexer(s):
                kill.acknowledged_before_kill = updates.upserts + updates.edits + updates.deletes
            n += 1
            time.sleep(max(0.0, 1.0 / rate - (time.time() - tick)))
        elapsed = time.time() - started
        updates.close()
    console.print(f"{n} changes in {elapsed:.0f}s under traffic ({busy.errors} failed requests while a worker was killed)")
    live = updates.live  # acknowledged and not deleted: each must be served with its last text
    lost = [d for d in live if _until(served(base, d, marker_of(d, live[d])), 30) is None]
    kill.lost = len(lost)
    labels = open_labels(s.label_store_url)
    settle_labels(s, labels, timeout=300)
    df = labels.read()[0]
    from_rerank = int(df["request_id"].isin(set(busy.rerank_ids) | set(idle.rerank_ids)).sum()) if not df.empty else 0
    encode_rate = measure_encoding(s, corpus)
    return CorpusBenchResult(
        documents=documents,
        upserts=updates.upserts,
        deletes=updates.deletes,
        edits=updates.edits,
        upserts_per_s=round((updates.upserts + updates.edits) / elapsed, 2),
        visible_s=seconds_of(updates.visible),
        not_visible_within_30s=updates.unseen,
        delete_visible_s=seconds_of(updates.delete_visible),
        deleted_served_after_ack=updates.deleted_served,
        stale_text_served_after_ack=updates.stale,
        lost_acknowledged=len(lost),
        filter_checks=FilterChecks(
            queries=busy.filter_queries + idle.filter_queries, violations=busy.violations + idle.violations
        ),
        rerank=RerankTraffic(requests=len(busy.rerank_ids) + len(idle.rerank_ids), labels_from_rerank_traffic=from_rerank),
        rank_p50_ms_during_updates=percentile(busy.rank_ms, 0.5),
        rank_p50_ms_idle=percentile(idle.rank_ms, 0.5),
        kill9_during_updates=kill,
        encode_docs_per_s=encode_rate,
        workers=2,
    )


def kill_indexer(s: Settings) -> bool:
    """kill -9 of the serving worker holding the indexer's lease (another takes it over)."""
    lease = Lease(s.state_dir / "index" / LEASE_FILE)
    pid = lease.holder()
    if not pid.isdigit():
        return False
    os.kill(int(pid), signal.SIGKILL)
    console.print(f"killed the indexing worker (pid {pid}) with SIGKILL")
    return True


def measure_encoding(s: Settings, corpus: Corpus, n: int = 200) -> float:
    """Documents per second the indexer encodes when documents come without a vector (BM25 serves
    them at once; their dense part waits for the encoding)."""
    docs = [corpus.document(f"enc-{i}", vector=False) for i in range(n)]
    store = open_store(s.state_dir)
    started = time.time()
    for start in range(0, n, 100):
        httpx.put(f"{s.base_url}/documents", json=docs[start : start + 100], timeout=60).raise_for_status()
    waited = _until(lambda: not store.missing_vectors(1), timeout=600)
    return round(n / (time.time() - started), 1) if waited is not None else 0.0


def _until(check, timeout: float = 30.0) -> float | None:
    started = time.time()
    while time.time() - started < timeout:
        try:
            if check():
                return round(time.time() - started, 3)
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return None


def seconds_of(values: list[float]) -> Seconds:
    if not values:
        return Seconds(p50=0.0, p95=0.0, max=0.0)
    ordered = sorted(values)
    return Seconds(p50=ordered[len(ordered) // 2], p95=ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], max=ordered[-1])
