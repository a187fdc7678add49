"""Dense vectors at any corpus size: an immutable faiss snapshot, memory-mapped and shared by every
process of a machine, plus the changes made since it, held in memory by each process.

Why this shape (docs/scale.md): faiss cannot change an index it reads memory-mapped (a `remove_ids`
on one crashes), and loading every vector into every worker costs 1.5 GB each at a million
documents. So the indexer (`training.corpus.indexer`, the lease holder) writes a snapshot of the
store's vectors now and then, and each worker searches it plus a small in-memory `IndexIDMap2` of
the documents changed since; a document changed or deleted since the snapshot is hidden from it by
id. Below `ann_from` documents the snapshot is exact (`IndexFlatIP`); from there on it is IVF, with
`nprobe` chosen at build as the smallest that reaches `recall` at 100 against exact search on a
sample, and that recall recorded with the snapshot (`rankloop index` and the self-check print it).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from training.config import AnnSettings
from training.corpus.store import DIM, DocumentStore
from training.progress import Progress, silent

POINTER_FILE = "dense.json"
RECALL_QUERIES = 200
RECALL_K = 100


@dataclass(frozen=True)
class Snapshot:
    """What a snapshot file holds and how well it searches (recorded beside it)."""

    file: str
    seq: int  # every change up to this one is in the file
    documents: int
    kind: str  # "exact" or "ivf"
    nlist: int = 0
    nprobe: int = 0
    recall_at_100: float | None = None  # against exact search (exact: 1.0 by construction)
    build_s: float = 0.0
    bytes: int = 0


def describe(snap: Snapshot | None) -> str:
    """One line for `rankloop index`, `rankloop corpus` and the logs."""
    if snap is None:
        return "vectors: no snapshot yet (each worker reads them from the store)"
    kind = f"IVF, {snap.nlist} lists, nprobe {snap.nprobe}" if snap.kind == "ivf" else "exact"
    recall = f"recall@100 vs exact {snap.recall_at_100:.3f} on {RECALL_QUERIES} sampled queries; " if snap.kind == "ivf" else ""
    return (
        f"vectors: {snap.documents} in an {kind} snapshot at change {snap.seq} ({recall}"
        f"{snap.bytes / 1e6:.0f} MB, built in {snap.build_s:.1f} s)"
    )


def current_snapshot(folder: Path) -> Snapshot | None:
    try:
        return Snapshot(**json.loads((folder / POINTER_FILE).read_text()))
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def build_snapshot(
    store: DocumentStore, folder: Path, settings: AnnSettings = AnnSettings(), progress: Progress = silent
) -> Snapshot:
    """Writes a snapshot of every live vector in the store, streamed in chunks (never all as Python
    objects), and points readers at it; older snapshot files but the previous one are removed."""
    started = time.time()
    seq = store.head()  # read first: a change landing during the build is after it, so readers hold it in memory
    total = store.count_vectors()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # a build may use the machine; searches use one thread
    try:
        if total < settings.ann_from:
            index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
            nlist = nprobe = 0
        else:
            nlist = int(2 * np.sqrt(total))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT)
            progress("training the vector index", 0, 1)
            index.train(store.sample_vectors(min(total, 50 * nlist)))
            progress("training the vector index", 1, 1)
        done = 0
        for nums, vectors in store.iter_vectors(50_000):
            index.add_with_ids(vectors, nums)
            done += len(nums)
            progress("indexing vectors", done, total)
        recall = 1.0
        if nlist:
            nprobe, recall = _measured_nprobe(store, index, settings.recall, progress)
            faiss.extract_index_ivf(index).nprobe = nprobe
    finally:
        faiss.omp_set_num_threads(threads)
    name = f"dense-{seq}-{int(time.time() * 1000)}.faiss"
    tmp = folder / f".{name}.tmp"
    faiss.write_index(index, str(tmp))
    tmp.replace(folder / name)
    snap = Snapshot(name, seq, done, "ivf" if nlist else "exact", nlist, nprobe, recall, round(time.time() - started, 2))
    snap = Snapshot(**{**asdict(snap), "bytes": (folder / name).stat().st_size})
    previous = current_snapshot(folder)
    pointer = folder / f".{POINTER_FILE}.tmp"
    pointer.write_text(json.dumps(asdict(snap)))
    pointer.replace(folder / POINTER_FILE)
    keep = {name} | ({previous.file} if previous else set())
    for old in folder.glob("dense-*.faiss"):
        if old.name not in keep:
            old.unlink(missing_ok=True)  # a process still reading it keeps its mapping
    return snap


def _measured_nprobe(store: DocumentStore, index: faiss.Index, target: float, progress: Progress) -> tuple[int, float]:
    """nprobe for the snapshot, on sampled document vectors moved off themselves by noise to a
    cosine of about 0.6 (a query's to a relevant document)."""
    rng = np.random.default_rng(0)
    queries = store.sample_vectors(RECALL_QUERIES)
    queries = queries + rng.normal(0, 0.07, queries.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return choose_nprobe(index, queries, exact_top(store, queries, RECALL_K), target, progress)


def choose_nprobe(
    index: faiss.Index, queries: np.ndarray, truth: list[np.ndarray], target: float, progress: Progress = silent
) -> tuple[int, float]:
    """The smallest nprobe whose recall at len(truth[i]) against the exact answers reaches `target`,
    and that recall (every list probed, 1.0, when none does)."""
    ivf = faiss.extract_index_ivf(index)
    k = len(truth[0]) if truth else 1
    tried = [n for n in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512) if n < ivf.nlist]
    for step, nprobe in enumerate(tried, start=1):
        ivf.nprobe = nprobe
        found = index.search(queries, k)[1]
        recall = float(np.mean([len(set(f) & set(t)) / max(1, len(t)) for f, t in zip(found, truth)]))
        progress("choosing nprobe for the recall target", step, len(tried))
        if recall >= target:
            return nprobe, recall
    return ivf.nlist, 1.0


def exact_top(store: DocumentStore, queries: np.ndarray, k: int) -> list[np.ndarray]:
    """The exact top `k` document numbers of each query, by a streamed scan of the store."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for nums, vectors in store.iter_vectors(100_000):
        scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
        ids = np.concatenate([best_ids, np.broadcast_to(nums, (len(queries), len(nums)))], axis=1)
        keep = np.argsort(-scores, axis=1)[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
    return list(best_ids)


class DenseVectors:
    """One process's view: the current snapshot (memory-mapped) and the changes after it."""

    def __init__(self, store: DocumentStore, folder: Path):
        self.store, self.folder = store, folder
        self.snapshot: Snapshot | None = None
        self.base: faiss.Index | None = None
        self.delta = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
        self.hidden: set[int] = set()  # snapshot rows changed or deleted since it
        self._hidden_selector: tuple[faiss.IDSelector, faiss.IDSelector] | None = None
        self.seq = 0
        self._lock = threading.Lock()  # faiss is not safe to search while it is changed

    def refresh(self) -> bool:
        """Moves to a newer snapshot when there is one, then applies the changes after what it read."""
        changed = False
        snap = current_snapshot(self.folder)
        if snap is not None and (self.snapshot is None or snap.file != self.snapshot.file) and snap.seq >= self._snapshot_seq():
            try:
                base = faiss.read_index(str(self.folder / snap.file), faiss.IO_FLAG_MMAP_IFC)
            except RuntimeError:  # replaced between reading the pointer and the file: next time
                base = None
            if base is not None:
                delta, hidden, seq = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM)), set[int](), snap.seq
                for changes in self._changes(seq):
                    _apply(delta, hidden, changes)
                    seq = changes[-1].seq
                with self._lock:
                    self.base, self.snapshot, self.delta, self.hidden, self.seq = base, snap, delta, hidden, seq
                    self._hidden_selector = None
                changed = True
        for changes in self._changes(self.seq):
            with self._lock:
                _apply(self.delta, self.hidden, changes)
                self._hidden_selector = None
                self.seq = changes[-1].seq
            changed = True
        return changed

    def _snapshot_seq(self) -> int:
        return self.snapshot.seq if self.snapshot else 0

    def _changes(self, after: int) -> Iterator[list]:
        while changes := self.store.changes(after, 20_000):
            yield changes
            after = changes[-1].seq

    @property
    def pending(self) -> int:
        """Documents held in memory beside the snapshot (the indexer rewrites it past a bound)."""
        return len(self.hidden)

    def search(self, queries: np.ndarray, k: int, within: np.ndarray | None = None) -> list[list[int]]:
        """Each query's best `k` document numbers (among `within` when given), best first."""
        keep: list = []
        with self._lock:
            parts = []
            if self.base is not None and self.base.ntotal:
                parts.append(self.base.search(queries, min(k, self.base.ntotal), params=self._base_params(within, keep)))
            if self.delta.ntotal:
                sel = faiss.IDSelectorBatch(within) if within is not None else None
                keep.append(sel)
                params = faiss.SearchParameters(sel=sel) if sel is not None else None  # type: ignore[call-arg]
                parts.append(self.delta.search(queries, min(k, self.delta.ntotal), params=params))
        if not parts:
            return [[] for _ in queries]
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        out = []
        for s, i in zip(scores, ids):
            order = np.argsort(-s, kind="stable")
            out.append([int(i[j]) for j in order if i[j] >= 0][:k])
        return out

    def _base_params(self, within: np.ndarray | None, keep: list) -> faiss.SearchParameters | None:
        """The snapshot's search parameters: its nprobe, and a selector hiding what changed since it
        (and, with filters, allowing only `within`). `keep` holds the selectors' parts while faiss
        uses them (the Python wrappers own their memory)."""
        sel: faiss.IDSelector | None = None
        if self.hidden:
            if self._hidden_selector is None:
                batch = faiss.IDSelectorBatch(np.fromiter(self.hidden, dtype=np.int64))
                self._hidden_selector = (faiss.IDSelectorNot(batch), batch)
            sel = self._hidden_selector[0]
            keep.append(self._hidden_selector)
        if within is not None:
            allowed = faiss.IDSelectorBatch(within)
            keep.append(allowed)
            sel = faiss.IDSelectorAnd(allowed, sel) if sel is not None else allowed
            keep.append(sel)
        if self.snapshot is not None and self.snapshot.kind == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.snapshot.nprobe)  # type: ignore[call-arg]
        return faiss.SearchParameters(sel=sel) if sel is not None else None  # type: ignore[call-arg]


def _apply(delta: faiss.Index, hidden: set[int], changes: list) -> None:
    nums = np.array([c.num for c in changes], dtype=np.int64)
    delta.remove_ids(nums)  # type: ignore[arg-type]  # faiss takes an id array too
    hidden.update(int(n) for n in nums)
    live = [c for c in changes if not c.deleted and c.vector is not None]
    if live:
        delta.add_with_ids(np.stack([c.vector for c in live]), np.array([c.num for c in live], dtype=np.int64))
