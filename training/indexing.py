"""Loading documents into the living index: validated one by one (refused with a reason), stored in
batches, then applied to BM25 and encoded by the indexer (`training.corpus`). The same path serves
`rankloop index` (files, BEIR folders) and `build_index` (a BEIR dataset, as the demo and the
benchmarks use it). Query-time search is `training.ranking.first_stage`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.documents import Document, FieldType, check_document
from training import self_check
from training.beir import Dataset
from training.config import AnnSettings
from training.corpus.bm25 import Bm25Index, Lease
from training.corpus.dense import current_snapshot
from training.corpus.indexer import Indexer
from training.corpus.store import DIM, DocumentStore
from training.progress import Progress, silent
from training.ranking.encoder import encode, load_encoder
from training.ranking.first_stage import BM25_FOLDER, STORE_FILE, FirstStage

BATCH = 1000
LEASE_FILE = "indexer.lock"
MAX_REPORTED = 20  # refusals listed by a report; all are counted


@dataclass
class LoadReport:
    stored: int = 0
    deleted: int = 0
    refused: int = 0
    refusals: list[tuple[int, str | None, str]] = field(default_factory=list)  # (row, id, reason), the first ones
    applied_by: str | None = None  # None: applied here; else the pid of the indexer that applies them


def open_store(state_dir: Path) -> DocumentStore:
    return DocumentStore(state_dir / "index" / STORE_FILE)


def encoder_function(batch_size: int = 32) -> Any:
    model = load_encoder()
    return lambda texts: encode(model, texts, batch_size)


def load_documents(
    state_dir: Path,
    rows: Iterable[dict[str, Any]],
    fields: dict[str, FieldType] | None = None,
    replace: bool = False,
    progress: Progress = silent,
    batch_size: int = 32,
    ann: AnnSettings = AnnSettings(),
) -> LoadReport:
    """Validates and stores `rows`; with `replace`, deletes the live documents not among them. Then
    encodes and indexes them here (ending with a vector snapshot), unless a running indexer holds the
    lease (it applies them)."""
    store = open_store(state_dir)
    if fields:
        store.declare(fields)
    declared = store.declared()
    report, seen = LoadReport(), set()
    batch: list[tuple[int, Document]] = []

    def flush() -> None:
        stored, refused, _ = store.upsert([d for _, d in batch])
        report.stored += len(stored)
        for i, reason in refused:
            refuse(batch[i][0], batch[i][1].id, reason)
        batch.clear()
        progress("storing documents", report.stored + report.refused, 0)

    def refuse(row: int, doc_id: str | None, reason: str) -> None:
        report.refused += 1
        if len(report.refusals) < MAX_REPORTED:
            report.refusals.append((row, doc_id, reason))

    for n, raw in enumerate(rows, start=1):
        doc_id = raw.get("id") if isinstance(raw.get("id"), str) else None
        if "__error__" in raw:
            refuse(n, None, raw["__error__"])
            continue
        try:
            doc = check_document(raw, declared, DIM)
        except ValueError as e:
            refuse(n, doc_id, str(e))
            continue
        if doc.id in seen:
            refuse(n, doc.id, "the same id again in this load (the first one is kept)")
            continue
        seen.add(doc.id)
        batch.append((n, doc))
        if len(batch) >= BATCH:
            flush()
    if batch:
        flush()
    if replace:
        gone = [d for d in store.ids() if d not in seen]
        for start in range(0, len(gone), BATCH):
            report.deleted += len(store.delete(gone[start : start + BATCH])[0])
    lease = Lease(state_dir / "index" / LEASE_FILE)
    if not lease.acquire():
        report.applied_by = lease.holder()
        return report
    try:
        indexer = Indexer(store, Bm25Index(state_dir / "index" / BM25_FOLDER), encoder_function(batch_size), ann=ann)
        if indexer.catch_up(progress) or current_snapshot(store.path.parent) is None:
            indexer.snapshot(progress)
    finally:
        lease.release()
    return report


def build_index(dataset: Dataset, state_dir: Path, batch_size: int = 32, progress: Progress = silent) -> Path:
    """Makes the index hold exactly a BEIR dataset's corpus (unchanged documents keep their vectors,
    so re-indexing costs no encoding) and records its self-check. Returns the index folder."""
    rows = ({"id": d, "title": doc.get("title") or "", "text": doc.get("text") or ""} for d, doc in dataset.corpus.items())
    report = load_documents(state_dir, rows, replace=True, progress=progress, batch_size=batch_size)
    if report.applied_by:
        raise RuntimeError(f"the indexer of process {report.applied_by} holds the index: stop serving to rebuild it")
    folder = state_dir / "index"
    fs = FirstStage(folder)
    if not self_check.current(fs):
        self_check.record(fs, dataset)
    return folder
