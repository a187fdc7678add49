"""The indexer: applies the store's changes to BM25 and encodes documents that came without a vector.

One process of a machine holds the indexer's lease (`bm25.Lease`) and runs `catch_up` in a loop; a
serving worker takes it when free (so a corpus stays live with nothing else running), `rankloop
index` takes it for a bulk load. Each worker's dense vectors catch up on their own
(`FirstStage.refresh`): vectors live in the store, so only BM25 has a single writer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

from training.config import AnnSettings
from training.corpus.bm25 import Bm25Index, Bm25Writer
from training.corpus.dense import build_snapshot, current_snapshot
from training.corpus.store import DocumentStore
from training.progress import Progress, silent

log = logging.getLogger("rankloop.corpus")
Encode = Callable[[list[str]], np.ndarray]
APPLY_BATCH = 5000


class Indexer:
    def __init__(
        self,
        store: DocumentStore,
        bm25: Bm25Index,
        encode: Encode | None,
        encode_batch: int = 64,
        ann: AnnSettings = AnnSettings(),
    ):
        self.store = store
        self.writer = Bm25Writer(bm25)
        self.encode = encode
        self.encode_batch = encode_batch
        self.ann = ann
        self.folder = store.path.parent
        self._snapshotting: threading.Thread | None = None

    def catch_up(self, progress: Progress = silent) -> int:
        """Encodes what lacks a vector, then applies every change up to the store's head to BM25.
        Returns the number of changes applied."""
        self.encode_missing(progress)
        applied, done = self.store.applied("bm25"), 0
        total = max(0, self.store.head() - applied)
        while changes := self.store.changes(applied, APPLY_BATCH):
            for c in changes:
                if c.deleted:
                    self.writer.delete(c.id)
                else:
                    self.writer.upsert(c.id, c.body)
            self.writer.commit()  # then recorded: a crash in between re-applies, which changes nothing
            applied = changes[-1].seq
            self.store.set_applied("bm25", applied)
            done += len(changes)
            progress("indexing BM25", min(done, total) if total else done, max(total, done))
        return done

    def encode_missing(self, progress: Progress = silent) -> int:
        """Encodes the live documents stored without a vector, in batches (resumable: each batch is
        stored as it is done). Returns how many were encoded."""
        if self.encode is None:
            return 0
        done = 0
        while rows := self.store.missing_vectors(self.encode_batch * 4):
            vectors = self.encode([body for _, _, body in rows])
            self.store.set_vectors([(num, key, v) for (num, key, _), v in zip(rows, vectors)])
            done += len(rows)
            progress("embedding documents", done, done + len(self.store.missing_vectors(100_000)))
        return done

    def snapshot_due(self) -> bool:
        """True when `rebuild_after` documents changed since the vector snapshot (or since none)."""
        snap = current_snapshot(self.folder)
        return self.store.changed_since(snap.seq if snap else 0) >= self.ann.rebuild_after

    def snapshot(self, progress: Progress = silent) -> None:
        """Writes a vector snapshot now (a bulk load ends with one)."""
        snap = build_snapshot(self.store, self.folder, self.ann, progress)
        log.info(
            "vector snapshot of %d documents (%s, recall@100 %s) in %.1f s",
            snap.documents,
            snap.kind,
            snap.recall_at_100,
            snap.build_s,
        )

    def snapshot_in_background(self) -> None:
        """Starts a snapshot when one is due and none is being written: workers keep the changes since
        the last one in memory, so this bounds that memory without stalling the catch-up loop."""
        if (self._snapshotting is None or not self._snapshotting.is_alive()) and self.snapshot_due():
            self._snapshotting = threading.Thread(target=self.snapshot, name="vector-snapshot", daemon=True)
            self._snapshotting.start()
