"""`rankloop bench scale`: what a corpus of each size costs — building its index, each serving
worker's memory, `/rank` latency, the approximate index's recall, a promotion, a feedback-memory
lookup — with the product's own index code and serving workers, one size after another.

The corpus is synthetic, from a seed, so nothing is encoded (documents arrive with their vectors,
as an application's own embeddings would). A vector mixes two of 256·sqrt(n/5000) random "themes"
(Dirichlet weights), a direction shared by every vector, and Gaussian noise. This was fitted to real
all-MiniLM-L6-v2 embeddings of SciFact (5,183 documents, its 300 test queries) and errs on the hard
side: mean document-document cosine 0.175 (real 0.151), a query's best document 0.681 (0.628) and
its 100th 0.276 (0.324); an IVF index with 143 lists finds 0.666 of the exact top 100 probing 16
lists (real 0.807) and 0.805 probing 32 (0.916). Points clustered around separate centres, tried
first, let IVF reach 0.99 probing 2 lists: far easier than real text. How hard the mixtures are for
IVF changes with the size (the themes grow slower than the corpus, so neighbourhoods tighten), which
is why each row says which nprobe its snapshot needed and what a dense search cost. A document's text is 40 words drawn Zipf
(s=1.1) from 50,000 made-up words plus 4 words of each of its themes' own 20. A query is 3 words of
one theme plus one common word (its text goes to `/rank`); for recall, query vectors are fresh
draws of the same mixture. The feedback memory is measured at as many remembered queries as
documents.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import httpx
import mlflow
import numpy as np
from pydantic import BaseModel
from rich.console import Console

from services.bench.serve import percentile, served_version, wait_until
from services.cli.progress import ProgressBar
from services.config import Settings
from services.control.promotion import Promotions
from services.local import infra
from services.local.workers import spawn, stop, wait_healthy, worker_env
from services.storage import open_registry
from training import plots
from training.corpus.dense import DenseVectors, current_snapshot, exact_top
from training.indexing import load_documents, open_store
from training.ranking.encoder import load_encoder
from training.ranking.feedback_memory import FeedbackMemory, build_index
from training.ranking.reranker import Mix, save_model_folder

console = Console()
DIM = 384
VOCABULARY = 50_000
THEMES_AT_5K = 256  # themes grow with the square root of the corpus
THEMES_PER_DOCUMENT = 2
THEME_WORDS = 20
COMMON_WEIGHT = 0.5
NOISE = 0.7


class Percentiles(BaseModel):
    p50: float
    p99: float


class ScaleRow(BaseModel):
    documents: int
    index_build_s: float
    index_bytes: int
    vector_index: str  # exact or ivf, with its nprobe
    rss_mb_per_worker: float  # resident, counting the memory-mapped pages a worker touched
    pss_mb_per_worker: float  # proportional: a page shared by both workers counts half
    rank_miss_ms: Percentiles
    rank_hit_ms: Percentiles
    recall_at_100_vs_exact: float
    dense_search_ms: float  # p50 of one query's search of the served vector index (snapshot + changes), one thread
    promotion_ready_s: float | None  # alias moved -> every answer from the new version
    memory_queries: int
    memory_build_s: float
    memory_lookup_ms: float  # p50 of the 10 nearest remembered queries


class ScaleResult(BaseModel):
    workers: int
    corpus: str
    rows: list[ScaleRow]


class Synthetic:
    """The corpus of the module's docstring, from one seed."""

    def __init__(self, documents: int, seed: int = 0):
        self.n = documents
        self.themes = max(THEMES_AT_5K, int(THEMES_AT_5K * np.sqrt(documents / 5000)))
        rng = np.random.default_rng(seed)
        themes = rng.standard_normal((self.themes, DIM)).astype(np.float32)
        self.theme_vectors = themes / np.linalg.norm(themes, axis=1, keepdims=True)
        common = rng.standard_normal(DIM).astype(np.float32)
        self.common = common / np.linalg.norm(common)
        weights = 1.0 / np.arange(1, VOCABULARY + 1) ** 1.1
        self.p = weights / weights.sum()
        self.seed = seed

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`n` (themes, unit vectors): each a mixture of two themes (Dirichlet weights), the shared
        direction every embedding has, and noise."""
        themes = rng.integers(0, self.themes, (n, THEMES_PER_DOCUMENT))
        weights = rng.dirichlet(np.full(THEMES_PER_DOCUMENT, 0.5), n).astype(np.float32)
        x = COMMON_WEIGHT * self.common + (self.theme_vectors[themes] * weights[:, :, None]).sum(axis=1)
        x += (NOISE / np.sqrt(DIM)) * rng.standard_normal((n, DIM)).astype(np.float32)
        return themes, x / np.linalg.norm(x, axis=1, keepdims=True)

    def documents(self, chunk: int = 5000) -> Iterator[dict]:
        rng = np.random.default_rng((self.seed, 1))
        for start in range(0, self.n, chunk):
            size = min(chunk, self.n - start)
            themes, vectors = self.draw(size, rng)
            common = rng.choice(VOCABULARY, size=(size, 40), p=self.p)
            own = rng.integers(0, THEME_WORDS, (size, 4 * THEMES_PER_DOCUMENT))
            for i in range(size):
                words = [f"w{w}" for w in common[i]]
                words += [f"t{themes[i][j % THEMES_PER_DOCUMENT]}x{w}" for j, w in enumerate(own[i])]
                yield {"id": f"doc-{start + i}", "text": " ".join(words), "vector": vectors[i].tolist()}

    def query_texts(self, n: int, seed: int) -> list[str]:
        rng = np.random.default_rng((self.seed, 2, seed))
        return [
            " ".join([*(f"t{t}x{w}" for w in rng.integers(0, THEME_WORDS, 3)), f"w{rng.choice(VOCABULARY, p=self.p)}"])
            for t in rng.integers(0, self.themes, n)
        ]

    def query_vectors(self, n: int, seed: int) -> np.ndarray:
        return self.draw(n, np.random.default_rng((self.seed, 3, seed)))[1]


def run_scale_bench(s: Settings, sizes: list[int], out: Path, workers: int = 2, queries: int = 300) -> ScaleResult:
    rows: list[ScaleRow] = []
    for n in sizes:
        size_settings = s.model_copy(update={"state_dir": s.state_dir / f"docs-{n}"})
        size_settings.state_dir.mkdir(parents=True, exist_ok=True)
        rows.append(measure_size(size_settings, n, workers, queries))
        console.print_json(rows[-1].model_dump_json())
        result = ScaleResult(workers=workers, corpus=(__doc__ or "").split("\n\n")[1].replace("\n", " "), rows=rows)
        out.write_text(result.model_dump_json(indent=2))  # each size as it is done: a long run keeps what it measured
        plot(result, out.with_suffix(".png"))
        shutil.rmtree(size_settings.state_dir, ignore_errors=True)
    return result


def plot(result: ScaleResult, path: Path) -> Path:
    rows = result.rows
    return plots.scale_panels(
        path,
        [r.documents for r in rows],
        {
            "/rank (ms)": {
                "miss p50": [r.rank_miss_ms.p50 for r in rows],
                "miss p99": [r.rank_miss_ms.p99 for r in rows],
                "hit p50": [r.rank_hit_ms.p50 for r in rows],
            },
            "memory per worker (MB)": {"RSS": [r.rss_mb_per_worker for r in rows], "PSS": [r.pss_mb_per_worker for r in rows]},
            "seconds": {"index build": [r.index_build_s for r in rows], "promotion ready": [r.promotion_ready_s for r in rows]},
            "search (ms, p50)": {
                "dense search": [r.dense_search_ms for r in rows],
                "feedback memory lookup": [r.memory_lookup_ms for r in rows],
            },
        },
    )


def measure_size(s: Settings, n: int, workers: int, queries: int) -> ScaleRow:
    corpus = Synthetic(n)
    console.print(f"[bold]{n:,} documents[/bold]: building the index")
    started = time.time()
    with ProgressBar(console) as progress:
        load_documents(s.state_dir, corpus.documents(), progress=progress, ann=s.corpus.ann())
    build_s = time.time() - started
    folder = s.state_dir / "index"
    snapshot = current_snapshot(folder)
    index_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    recall, dense_ms = measure_recall(s, corpus)
    memory_build_s, memory_ms = measure_memory(corpus, n)

    infra.down(s)
    infra.up(s)
    procs = {"serve": spawn(s, "serve", worker_env(s, RANKLOOP_TORCH_THREADS="1"), ("--workers", str(workers)))}
    try:
        wait_healthy(s, procs, timeout=600)
        version = register_frozen_version(s)
        moved = time.time()
        Promotions.connect(s, open_registry(s)).promote(version, "bench scale", actor="bench")
        ready = wait_until(lambda: all(served_version(s.base_url) == version for _ in range(2 * workers)), 300, 0.1)
        promotion_ready = round(time.time() - moved, 2) if ready is not None else None
        miss = timed_ranks(s.base_url, corpus.query_texts(queries, seed=n))
        hit = timed_ranks(s.base_url, corpus.query_texts(1, seed=n) * queries)
        rss, pss = worker_memory(procs["serve"].pid)
    finally:
        stop(procs)
        infra.down(s)
    return ScaleRow(
        documents=n,
        index_build_s=round(build_s, 1),
        index_bytes=index_bytes,
        vector_index=f"{snapshot.kind} (nprobe {snapshot.nprobe})" if snapshot and snapshot.kind == "ivf" else "exact",
        rss_mb_per_worker=rss,
        pss_mb_per_worker=pss,
        rank_miss_ms=Percentiles(p50=percentile(miss, 0.5), p99=percentile(miss, 0.99)),
        rank_hit_ms=Percentiles(p50=percentile(hit, 0.5), p99=percentile(hit, 0.99)),
        recall_at_100_vs_exact=recall,
        dense_search_ms=dense_ms,
        promotion_ready_s=promotion_ready,
        memory_queries=n,
        memory_build_s=memory_build_s,
        memory_lookup_ms=memory_ms,
    )


def measure_recall(s: Settings, corpus: Synthetic, n: int = 200) -> tuple[float, float]:
    """The served vector index (snapshot + changes, as a worker reads it) against an exact scan:
    recall@100, and the p50 milliseconds of one query's search (one thread, as a worker searches)."""
    store = open_store(s.state_dir)
    dense = DenseVectors(store, s.state_dir / "index")
    dense.refresh()
    queries = corpus.query_vectors(n, seed=1)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    ms, found = [], []
    for q in queries:
        started = time.perf_counter()
        found += dense.search(q[None, :], 100)
        ms.append((time.perf_counter() - started) * 1000)
    faiss.omp_set_num_threads(threads)
    truth = exact_top(store, queries, 100)
    recall = round(float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])), 4)
    return recall, round(float(np.median(ms)), 2)


def measure_memory(corpus: Synthetic, n: int, lookups: int = 500) -> tuple[float, float]:
    """A feedback memory of `n` remembered queries: build seconds, lookup p50 (ms)."""
    embedded = np.concatenate([corpus.query_vectors(min(100_000, n - i), seed=10 + i) for i in range(0, n, 100_000)])
    started = time.time()
    index = build_index(embedded)
    build_s = round(time.time() - started, 1)
    memory = FeedbackMemory([f"q{i}" for i in range(n)], [{} for _ in range(n)], embedded, index)
    ms = []
    for q in corpus.query_vectors(lookups, seed=5):
        t = time.perf_counter()
        memory.nearest(q, 10)
        ms.append((time.perf_counter() - t) * 1000)
    return build_s, percentile(ms, 0.5)


def register_frozen_version(s: Settings) -> str:
    """The base checkpoint as a version with a frozen document tower and a small feedback memory, as
    a training registers one."""
    registry = open_registry(s)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_folder(
            load_encoder(), Path(tmp) / "model", Mix(0.5), {"a remembered query": {"doc-0": 1.0}}, {"document_tower": "frozen"}
        )
        with mlflow.start_run(run_name="bench-scale-version") as run:
            mlflow.log_artifacts(str(folder), "model")
        return registry.register(run.info.run_id)


def timed_ranks(base_url: str, texts: list[str]) -> list[float]:
    ms = []
    with httpx.Client(base_url=base_url, timeout=60) as http:
        http.post("/rank", json={"query": texts[0], "k": 10}).raise_for_status()
        for q in texts[1:]:
            started = time.perf_counter()
            http.post("/rank", json={"query": q, "k": 10}).raise_for_status()
            ms.append((time.perf_counter() - started) * 1000)
    return ms


def worker_memory(parent: int) -> tuple[float, float]:
    """The largest resident and proportional set (MB) among the serving processes."""
    pids = [parent] + [int(p) for p in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
    rss = pss = 0.0
    for pid in pids:
        try:
            fields = dict(
                line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines() if ":" in line
            )
        except FileNotFoundError:
            continue
        rss = max(rss, int(fields["Rss"].split()[0]) / 1024)
        pss = max(pss, int(fields["Pss"].split()[0]) / 1024)
    return round(rss, 1), round(pss, 1)
