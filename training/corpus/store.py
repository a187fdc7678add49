"""The document store: the corpus's source of truth, an SQLite file in WAL mode beside the index.

Every upsert or delete is one transaction that numbers the change (`seq`); it is acknowledged only
after the commit reached the disk (`synchronous=FULL`), so an acknowledged change survives a kill -9
of any process. The indexes are views of the store: BM25 and every worker's vectors catch up by
reading the changes after the last they applied, which makes a crash mid-apply harmless (an
upsert applied twice is the same document). A deleted document stays as a tombstone row, so a worker
that was behind learns of the delete; its text and vector are cleared.

`num`, a document's integer row, never changes for an id: it is the id faiss knows the vector by.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas import InvalidInput
from schemas.documents import Condition, Document, FieldType

DIM = 384  # all-MiniLM-L6-v2
FIELD_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fields(name TEXT PRIMARY KEY, type TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(
  num INTEGER PRIMARY KEY,
  id TEXT UNIQUE NOT NULL,
  title TEXT NOT NULL DEFAULT '',
  body TEXT NOT NULL DEFAULT '',
  fields TEXT NOT NULL DEFAULT '{}',
  vector BLOB,
  content TEXT NOT NULL DEFAULT '',
  version INTEGER,
  updated_at REAL,
  deleted INTEGER NOT NULL DEFAULT 0,
  seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS documents_seq ON documents(seq);
CREATE INDEX IF NOT EXISTS documents_unencoded ON documents(num) WHERE vector IS NULL AND deleted = 0;
CREATE INDEX IF NOT EXISTS documents_aged ON documents(num) WHERE updated_at IS NOT NULL AND deleted = 0;
CREATE TABLE IF NOT EXISTS audit(seq INTEGER NOT NULL, at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
  documents INTEGER NOT NULL, ids TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inline_documents(id TEXT PRIMARY KEY, title TEXT NOT NULL, body TEXT NOT NULL, content TEXT NOT NULL);
"""


Feed = tuple[str, dict[int, int]]
"""A documents topic and, per partition, the next offset to read: stored with the changes read."""


def content_key(body: str) -> str:
    """What a document's embeddings are keyed by: an edit changes it, so no old vector is ever reused."""
    return hashlib.sha1(body.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Change:
    """A document's state as of change `seq` (deleted: a tombstone)."""

    num: int
    id: str
    body: str
    fields: dict
    vector: np.ndarray | None
    deleted: bool
    seq: int


@dataclass(frozen=True)
class StoredDocument:
    id: str
    title: str
    fields: dict
    content: str
    updated_at: float | None = None  # as the application sent it (what a document's age is read from)


class DocumentStore:
    """One SQLite file, shared by every process of a machine (one connection per thread)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('corpus_id', ?)", (uuid.uuid4().hex[:12],))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('seq', '0')")
        self.corpus_id: str = self._meta("corpus_id") or ""

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before a write is acknowledged
            self._local.db = db
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: other writers wait (BEGIN IMMEDIATE), a failure leaves nothing."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _meta(self, key: str) -> str | None:
        row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def _next_seq(self, db: sqlite3.Connection) -> int:
        seq = int(db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]) + 1
        db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (str(seq),))
        return seq

    def head(self) -> int:
        """The number of the last change."""
        return int(self._meta("seq") or 0)

    # ---- declared fields --------------------------------------------------------------------
    def declared(self) -> dict[str, FieldType]:
        return {n: FieldType(t) for n, t in self._db().execute("SELECT name, type FROM fields")}

    def declare(self, fields: dict[str, FieldType]) -> None:
        """Declares filterable fields; a field keeps its type (changing it would orphan stored values)."""
        import re

        known = self.declared()
        for name, kind in fields.items():
            if not re.match(FIELD_NAME, name):
                raise InvalidInput(f"field name {name!r}: letters, digits and _ only, starting with a letter")
            if name in known and known[name] is not kind:
                raise InvalidInput(f"field {name!r} is declared as {known[name].value}, not {kind.value}")
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO fields VALUES (?, ?)", [(n, k.value) for n, k in fields.items()])

    # ---- writes -----------------------------------------------------------------------------
    def upsert(
        self, docs: list[Document], actor: str = "local", feed: Feed | None = None
    ) -> tuple[list[str], list[tuple[int, str]], int]:
        """Stores the documents in one transaction, audited as `actor`. Returns the stored ids,
        (index, reason) of the ones refused as older than what is stored, and the change number. `feed`:
        the topic and offsets these documents were read up to, stored in the same transaction."""
        stored, refused = [], []
        with self._transaction() as db:
            seq = self._next_seq(db)
            for i, doc in enumerate(docs):
                row = db.execute(
                    "SELECT version, updated_at, content, vector, deleted FROM documents WHERE id = ?", (doc.id,)
                ).fetchone()
                if row and not row[4] and (problem := _older(doc, row[0], row[1])):
                    refused.append((i, problem))
                    continue
                body = doc.content()
                key = content_key(body)
                vector: bytes | None
                if doc.vector is not None:
                    vector = np.asarray(doc.vector, dtype=np.float32).tobytes()
                else:  # an unchanged text keeps its vector; a new one is encoded by the indexer
                    vector = row[3] if row and row[2] == key and not row[4] else None
                db.execute(
                    "INSERT INTO documents(id, title, body, fields, vector, content, version, updated_at, deleted, seq) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?) ON CONFLICT(id) DO UPDATE SET title=excluded.title, "
                    "body=excluded.body, fields=excluded.fields, vector=excluded.vector, content=excluded.content, "
                    "version=excluded.version, updated_at=excluded.updated_at, deleted=0, seq=excluded.seq",
                    (doc.id, doc.title, body, json.dumps(doc.fields), vector, key, doc.version, doc.updated_at, seq),
                )
                stored.append(doc.id)
            self._audit(db, seq, actor, "upsert", stored)
            self._feed(db, feed)
        return stored, refused, seq

    def delete(self, ids: list[str], actor: str = "local", feed: Feed | None = None) -> tuple[list[str], list[str], int]:
        """Tombstones the documents, audited as `actor`. Returns (deleted, missing, change number)."""
        deleted: list[str] = []
        missing: list[str] = []
        with self._transaction() as db:
            seq = self._next_seq(db)
            for doc_id in dict.fromkeys(ids):
                cur = db.execute(
                    "UPDATE documents SET deleted=1, body='', title='', fields='{}', vector=NULL, content='', seq=? "
                    "WHERE id = ? AND deleted = 0",
                    (seq, doc_id),
                )
                (deleted if cur.rowcount else missing).append(doc_id)
            self._audit(db, seq, actor, "delete", deleted)
            self._feed(db, feed)
        return deleted, missing, seq

    @staticmethod
    def _audit(db: sqlite3.Connection, seq: int, actor: str, action: str, ids: list[str]) -> None:
        """Who changed the corpus, in the change's own transaction (the first ids of a batch)."""
        if ids:
            db.execute(
                "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?)", (seq, time.time(), actor, action, len(ids), json.dumps(ids[:20]))
            )

    @staticmethod
    def _feed(db: sqlite3.Connection, feed: Feed | None) -> None:
        if feed:
            topic, offsets = feed
            upsert = "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
            db.executemany(upsert, [(f"offset:{topic}:{p}", str(o)) for p, o in offsets.items()])

    def set_feed_offsets(self, topic: str, offsets: dict[int, int]) -> None:
        with self._transaction() as db:
            self._feed(db, (topic, offsets))

    def feed_offsets(self, topic: str) -> dict[int, int]:
        """partition -> the next offset to read of a documents topic."""
        rows = self._db().execute("SELECT key, value FROM meta WHERE key LIKE ?", (f"offset:{topic}:%",))
        return {int(k.rsplit(":", 1)[1]): int(v) for k, v in rows}

    def audit(self, limit: int = 50) -> list[dict]:
        """The last changes: change number, time, who, what and how many documents."""
        rows = self._db().execute("SELECT seq, at, actor, action, documents, ids FROM audit ORDER BY seq DESC LIMIT ?", (limit,))
        return [{"seq": s, "at": a, "actor": w, "action": x, "documents": n, "ids": json.loads(i)} for s, a, w, x, n, i in rows]

    def set_vectors(self, vectors: list[tuple[int, str, np.ndarray]]) -> int:
        """Stores encoded vectors as (num, content key, vector), each only if the document still has
        that content (an edit since the encoding began wins). One change number for all."""
        with self._transaction() as db:
            seq = self._next_seq(db)
            db.executemany(
                "UPDATE documents SET vector = ?, seq = ? WHERE num = ? AND content = ? AND deleted = 0",
                [(np.asarray(v, dtype=np.float32).tobytes(), seq, num, key) for num, key, v in vectors],
            )
        return seq

    def keep_inline(self, docs: list[tuple[str, str, str]]) -> None:
        """Keeps the (id, title, body) of candidates an application sent inline to /rerank, so a
        training on their labels can read them."""
        rows = [(d, t, b, content_key(b)) for d, t, b in docs]
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO inline_documents VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET title=excluded.title, "
                "body=excluded.body, content=excluded.content WHERE inline_documents.content != excluded.content",
                rows,
            )

    def set_applied(self, name: str, seq: int) -> None:
        db = self._db()
        db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (f"applied:{name}", str(seq))
        )

    def applied(self, name: str) -> int:
        """The last change an index named `name` applied (0: none)."""
        return int(self._meta(f"applied:{name}") or 0)

    # ---- reads ------------------------------------------------------------------------------
    def changes(self, after: int, limit: int = 5000) -> list[Change]:
        """The documents changed after change `after`, oldest first: about `limit` of them, always whole
        changes (a batch shares one number, and a reader resumes after the last number it saw)."""
        db = self._db()
        upto = db.execute(
            "SELECT max(seq) FROM (SELECT seq FROM documents WHERE seq > ? ORDER BY seq LIMIT ?)", (after, limit)
        ).fetchone()[0]
        if upto is None:
            return []
        rows = db.execute(
            "SELECT num, id, body, fields, vector, deleted, seq FROM documents WHERE seq > ? AND seq <= ? ORDER BY seq",
            (after, upto),
        )
        return [
            Change(n, d, b, json.loads(f), None if v is None else np.frombuffer(v, dtype=np.float32), bool(x), s)
            for n, d, b, f, v, x, s in rows
        ]

    def missing_vectors(self, limit: int) -> list[tuple[int, str, str]]:
        """(num, content key, body) of live documents waiting to be encoded (a partial index: asked
        twice a second by the indexer, it never scans the corpus)."""
        return list(
            self._db().execute("SELECT num, content, body FROM documents WHERE vector IS NULL AND deleted = 0 LIMIT ?", (limit,))
        )

    def _live_rows(self, columns: str, ids: list[str]) -> Iterator[tuple]:
        """`columns` of the live documents among `ids`, 500 ids a query (under SQLite's variable limit)."""
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            yield from self._db().execute(f"SELECT {columns} FROM documents WHERE deleted = 0 AND id IN ({marks})", chunk)

    def live(self, ids: list[str]) -> dict[str, StoredDocument]:
        """The live documents among `ids` (deleted and unknown ones are absent)."""
        rows = self._live_rows("id, title, fields, content, updated_at", ids)
        return {d: StoredDocument(d, t, json.loads(f), c, at) for d, t, f, c, at in rows}

    def numbers(self, ids: list[str]) -> dict[str, tuple[dict, float | None]]:
        """The fields and `updated_at` of the live documents among `ids`: what a learned combiner reads
        per candidate, without their text (`live` brings titles and content a head does not need)."""
        return {d: (json.loads(f), at) for d, f, at in self._live_rows("id, fields, updated_at", ids)}

    def has_ages(self) -> bool:
        """Whether any live document carries the application's `updated_at` (what an age is read from).
        Answered from the partial index `documents_aged`: without it, a corpus with no ages was read
        whole, every row of it, once per training."""
        row = self._db().execute("SELECT 1 FROM documents WHERE deleted = 0 AND updated_at IS NOT NULL LIMIT 1").fetchone()
        return row is not None

    def content_keys(self, ids: list[str]) -> dict[str, str]:
        """Content keys of the live and inline documents among `ids`."""
        out: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for table, live in (("inline_documents", ""), ("documents", "deleted = 0 AND")):
                out.update(self._db().execute(f"SELECT id, content FROM {table} WHERE {live} id IN ({marks})", chunk))
        return out

    def text(self, doc_id: str) -> str | None:
        """The text the encoders see, of a live or an inline document."""
        db = self._db()
        row = db.execute("SELECT body FROM documents WHERE id = ? AND deleted = 0", (doc_id,)).fetchone()
        row = row or db.execute("SELECT body FROM inline_documents WHERE id = ?", (doc_id,)).fetchone()
        return row[0] if row else None

    def count(self) -> int:
        return int(self._db().execute("SELECT count(*) FROM documents WHERE deleted = 0").fetchone()[0])

    def ids(self) -> list[str]:
        return [d for (d,) in self._db().execute("SELECT id FROM documents WHERE deleted = 0 ORDER BY num")]

    def iter_live(self, batch: int = 1000) -> Iterator[list[tuple[str, str, str]]]:
        """(id, content key, body) of every live document, in batches."""
        last = 0
        while True:
            rows = list(
                self._db().execute(
                    "SELECT num, id, content, body FROM documents WHERE deleted = 0 AND num > ? ORDER BY num LIMIT ?",
                    (last, batch),
                )
            )
            if not rows:
                return
            last = rows[-1][0]
            yield [(d, c, b) for _, d, c, b in rows]

    # ---- vectors, by the document numbers faiss knows them by -------------------------------
    def count_vectors(self) -> int:
        return int(self._db().execute("SELECT count(*) FROM documents WHERE deleted = 0 AND vector IS NOT NULL").fetchone()[0])

    def changed_since(self, seq: int) -> int:
        """Documents changed (or deleted) after change `seq`."""
        return int(self._db().execute("SELECT count(*) FROM documents WHERE seq > ?", (seq,)).fetchone()[0])

    def iter_vectors(self, batch: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(numbers, float32 matrix) of every live document with a vector, in chunks by number."""
        last = 0
        while True:
            rows = (
                self._db()
                .execute(
                    "SELECT num, vector FROM documents WHERE num > ? AND deleted = 0 AND vector IS NOT NULL ORDER BY num LIMIT ?",
                    (last, batch),
                )
                .fetchall()
            )
            if not rows:
                return
            last = rows[-1][0]
            yield np.array([n for n, _ in rows], dtype=np.int64), _matrix([v for _, v in rows])

    def sample_vectors(self, n: int) -> np.ndarray:
        """About `n` live vectors spread evenly over the document numbers (an index's training set)."""
        top = int(self._db().execute("SELECT coalesce(max(num), 0) FROM documents").fetchone()[0])
        step = max(1, top // max(1, n))
        rows = (
            self._db()
            .execute("SELECT vector FROM documents WHERE num % ? = 0 AND deleted = 0 AND vector IS NOT NULL LIMIT ?", (step, n))
            .fetchall()
        )
        return _matrix([v for (v,) in rows])

    def vectors_of(self, ids: list[str]) -> dict[str, np.ndarray]:
        """The stored vectors of the live documents among `ids` (one not encoded yet is absent)."""
        out: dict[str, np.ndarray] = {}
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            for d, v in self._db().execute(
                f"SELECT id, vector FROM documents WHERE deleted = 0 AND vector IS NOT NULL AND id IN ({marks})", chunk
            ):
                out[d] = np.frombuffer(v, dtype=np.float32)
        return out

    def ids_of(self, nums: list[int]) -> dict[int, str]:
        """number -> id of the live documents among `nums`."""
        out: dict[int, str] = {}
        for chunk in _chunks(nums):
            marks = ",".join("?" * len(chunk))
            out.update(self._db().execute(f"SELECT num, id FROM documents WHERE deleted = 0 AND num IN ({marks})", chunk))
        return out

    def nums_of(self, ids: list[str]) -> list[int]:
        """The numbers of the live documents among `ids`."""
        out: list[int] = []
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            out += [n for (n,) in self._db().execute(f"SELECT num FROM documents WHERE deleted = 0 AND id IN ({marks})", chunk)]
        return out

    def matching(self, conditions: list[Condition]) -> list[str]:
        """Ids of the live documents whose fields pass every condition (filters, `schemas.documents`)."""
        where, args = ["deleted = 0"], []
        for c in conditions:
            path = f"$.{c.field}"  # declared names only: letters, digits and _
            if c.range is not None:
                for op, bound in (("gte", ">="), ("gt", ">"), ("lte", "<="), ("lt", "<")):
                    value = getattr(c.range, op)
                    if value is not None:
                        where.append(f"json_type(fields, ?) IN ('integer', 'real') AND json_extract(fields, ?) {bound} ?")
                        args += [path, path, value]
            else:
                values = [c.equals] if c.equals is not None else list(c.any_of or [])
                marks = ",".join("?" * len(values))
                where.append(f"EXISTS (SELECT 1 FROM json_each(fields, ?) WHERE json_each.value IN ({marks}))")
                args += [path, *values]
        return [d for (d,) in self._db().execute(f"SELECT id FROM documents WHERE {' AND '.join(where)}", args)]


def _chunks(items: list, size: int = 500) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _matrix(blobs: list[bytes]) -> np.ndarray:
    if not blobs:
        return np.zeros((0, DIM), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1).copy()


def _older(doc: Document, version: int | None, updated_at: float | None) -> str | None:
    """Why an upsert must not replace what is stored (None: it may)."""
    if doc.version is not None and version is not None and doc.version < version:
        return f"version {doc.version} is older than the stored version {version}"
    if doc.version is None and doc.updated_at is not None and updated_at is not None and doc.updated_at < updated_at:
        return f"updated_at {doc.updated_at} is older than the stored {updated_at}"
    return None
