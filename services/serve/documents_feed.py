"""The `documents` topic: an application's change-data-capture feed of its corpus. A message is a
document (an upsert, `schemas.documents.Document`) or `{"id": ..., "deleted": true}`, keyed by the
document's id so one document's changes stay in order. The serving worker holding the indexer's
lease consumes it; a message that is not a valid change is dead-lettered with its reason; offsets are
committed only after the changes are in the store and the dead letters on the broker.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from schemas import DeadLetter, RejectCode
from schemas.documents import Document, check_document
from services.storage import Publisher
from training.corpus.store import DIM, DocumentStore

log = logging.getLogger("rankloop.serve")
Change = tuple[str, Document | str]  # ("upsert", document) or ("delete", id)


def parse_change(payload: bytes | None, store: DocumentStore) -> Change:
    """One message as a change, or ValueError with the reason it is not one."""
    try:
        raw: Any = json.loads(payload or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if isinstance(raw, dict) and raw.get("deleted") is True:
        doc_id = raw.get("id")
        if not isinstance(doc_id, str) or not doc_id or set(raw) - {"id", "deleted"}:
            raise ValueError('a delete is {"id": "...", "deleted": true}')
        return ("delete", doc_id)
    return ("upsert", check_document(raw, store.declared(), DIM))


class DocumentFeed:
    def __init__(self, bootstrap: str, topic: str, group: str, dead_letters: str, store: DocumentStore, publisher: Publisher):
        self.bootstrap, self.topic, self.group, self.dead_letters = bootstrap, topic, group, dead_letters
        self.store, self.publisher = store, publisher
        self.consumer: Any = None

    def poll(self) -> int:
        """Applies the changes waiting on the topic (up to a thousand); returns how many messages it took."""
        if self.consumer is None:
            from kafka import KafkaConsumer

            self.consumer = KafkaConsumer(
                self.topic,
                bootstrap_servers=self.bootstrap,
                group_id=self.group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=10_000,
            )
        records = [r for batch in self.consumer.poll(timeout_ms=100, max_records=1000).values() for r in batch]
        if not records:
            return 0
        run: list[Change] = []
        dead = []
        for record in records:
            try:
                change = parse_change(record.value, self.store)
            except ValueError as e:
                dead.append(
                    DeadLetter(source=self.topic, code=RejectCode.invalid_document, reason=str(e), payload=_text(record.value))
                )
                continue
            if run and run[-1][0] != change[0]:
                self._apply(run)
                run = []
            run.append(change)
        self._apply(run)
        for letter in dead:
            future = self.publisher.publish(self.dead_letters, letter.source, letter)
            if future is None:
                raise RuntimeError("dead letters cannot be recorded: offsets not committed, the batch is applied again")
            future.result(timeout=10)
        self.consumer.commit()  # after the store's commit: a crash before it applies the batch again
        return len(records)

    def _apply(self, run: list[Change]) -> None:
        if not run:
            return
        actor = f"topic:{self.topic}"
        if run[0][0] == "delete":
            self.store.delete([c for _, c in run if isinstance(c, str)], actor)
            return
        _, refused, _ = self.store.upsert([c for _, c in run if isinstance(c, Document)], actor)
        for _, reason in refused:  # older than stored: a replayed change; nothing to undo
            log.info("documents topic: %s", reason)

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()


def _text(payload: bytes | None) -> str:
    return (payload or b"").decode("utf-8", "replace")[:10_000]
