"""The `documents` topic: an application's change-data-capture feed of its corpus. A message is a
document (an upsert, `schemas.documents.Document`) or `{"id": ..., "deleted": true}`, keyed by the
document's id so one document's changes stay in order. The serving worker holding the indexer's
lease consumes it, with no consumer group: the offsets it has read up to are kept in the document
store, written in the same transaction as the changes they carry, so a crash never loses a change nor
applies one twice. A message that is not a valid change is dead-lettered with its reason (on the broker
before its offset is stored).
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
    def __init__(self, bootstrap: str, topic: str, dead_letters: str, store: DocumentStore, publisher: Publisher):
        self.bootstrap, self.topic, self.dead_letters = bootstrap, topic, dead_letters
        self.store, self.publisher = store, publisher
        self.consumer: Any = None

    def _consumer(self) -> Any:
        """Assigned every partition of the topic, each at the offset the store has read up to."""
        if self.consumer is None:
            from kafka import KafkaConsumer, TopicPartition

            consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False)
            partitions = consumer.partitions_for_topic(self.topic)
            if not partitions:
                consumer.close()
                return None
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            offsets = self.store.feed_offsets(self.topic)
            for tp in tps:
                if tp.partition in offsets:
                    consumer.seek(tp, offsets[tp.partition])
                else:
                    consumer.seek_to_beginning(tp)
            self.consumer = consumer
        return self.consumer

    def poll(self) -> int:
        """Applies the changes waiting on the topic (up to a thousand); returns how many messages it took."""
        consumer = self._consumer()
        if consumer is None:
            return 0
        records = [r for batch in consumer.poll(timeout_ms=100, max_records=1000).values() for r in batch]
        if not records:
            return 0
        offsets = {r.partition: r.offset + 1 for r in records}  # records come in offset order per partition
        runs: list[list[Change]] = []
        dead = []
        for record in records:
            try:
                change = parse_change(record.value, self.store)
            except ValueError as e:
                payload = _text(record.value)
                dead.append(DeadLetter(source=self.topic, code=RejectCode.invalid_document, reason=str(e), payload=payload))
                continue
            if not runs or runs[-1][0][0] != change[0]:
                runs.append([])
            runs[-1].append(change)
        for letter in dead:
            future = self.publisher.publish(self.dead_letters, letter.source, letter)
            if future is None:
                raise RuntimeError("dead letters cannot be recorded now: the batch is read again")
            future.result(timeout=10)
        for i, run in enumerate(runs):
            self._apply(run, offsets if i == len(runs) - 1 else None)
        if not runs:
            self.store.set_feed_offsets(self.topic, offsets)
        return len(records)

    def _apply(self, run: list[Change], offsets: dict[int, int] | None) -> None:
        """One run of upserts or of deletes, in one transaction (with the offsets read, on the last run)."""
        actor = f"topic:{self.topic}"
        feed = (self.topic, offsets) if offsets else None
        if run[0][0] == "delete":
            self.store.delete([c for _, c in run if isinstance(c, str)], actor, feed)
            return
        _, refused, _ = self.store.upsert([c for _, c in run if isinstance(c, Document)], actor, feed)
        for _, reason in refused:  # older than stored: a replayed change; nothing to undo
            log.info("documents topic: %s", reason)

    def close(self) -> None:
        if self.consumer is not None:
            self.consumer.close()


def _text(payload: bytes | None) -> str:
    return (payload or b"").decode("utf-8", "replace")[:10_000]
