"""The durable label store: a Delta Lake table (on local disk, or on object storage by URL).

Every write is a transaction that also records the input offsets it covers, so a replayed message is
recognised and its labels not stored again (exactly once); counting is metadata; a training run
records the table version it read (time travel gives the exact labels back); compaction keeps the
latest revision of each `label_id`. Purges live beside it in a small table of their own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from schemas import InvalidInput, LabelledExample
from training.labels.store import Hold, Lineage, Purge, apply_holds, apply_purges, describe, frame, latest_holds, latest_revisions

LABEL_SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("label_id", pa.string()),
        ("revision", pa.int32()),
        ("request_id", pa.string()),
        ("query", pa.string()),
        ("doc_id", pa.string()),
        ("position", pa.int32()),
        ("grade", pa.int32()),
        ("weight", pa.float64()),
        ("propensity", pa.float64()),
        ("signals", pa.list_(pa.string())),
        ("event_ids", pa.list_(pa.string())),
        ("model_version", pa.string()),
        ("index_version", pa.string()),
        ("identity", pa.string()),
        ("api_keys", pa.list_(pa.string())),
        ("challenger_version", pa.string()),  # added later: a table from before gets the columns on its next write
        ("team", pa.string()),
        ("credit", pa.float64()),  # added with optimized interleaving, as challenger_version was
        ("source", pa.string()),  # added with the trust model: older rows read as not assessed
        ("trusted", pa.bool_()),
        ("timestamp", pa.float64()),
        ("stored_at", pa.float64()),  # when the store wrote the row: compaction's cut
    ]
)
TRAINING_COLUMNS = [
    "label_id", "revision", "request_id", "query", "doc_id", "position", "grade", "weight", "propensity",
    "signals", "identity", "api_keys", "timestamp", "model_version", "challenger_version", "team", "credit",
    "source", "trusted",
]  # fmt: skip
"""What training, its lineage, purges and the interleaving tally need: a read leaves the rest (event ids,
the index version) on disk."""
COMPACTED_AWAY = "rankloop-compacted-away"  # an app transaction: superseded revisions compaction removed, in total
PURGE_SCHEMA = pa.schema([("purge", pa.string())])
HOLD_SCHEMA = pa.schema([("hold", pa.string())])


class DeltaLabelStore:
    """Labels as a Delta Lake table at `uri`: a folder, or `s3://bucket/prefix` (credentials and
    endpoint from the standard AWS_* variables, which deltalake reads itself)."""

    def __init__(self, uri: str | Path):
        self.uri = str(uri)
        self.purges_uri = f"{self.uri.rstrip('/')}/_purges"  # "_": Delta's vacuum leaves it alone
        self.holds_uri = f"{self.uri.rstrip('/')}/_holds"
        self._table: Any = None

    def _open(self, version: int | None = None) -> Any:
        """The table (refreshed to its latest version), or None before the first write."""
        from deltalake import DeltaTable

        if version is not None:
            latest = self.version()
            if latest is None or not 0 <= version <= latest:
                raise InvalidInput(f"the label table has versions 0..{latest} (asked for {version})")
            return DeltaTable(self.uri, version=version)
        if self._table is None:
            if not DeltaTable.is_deltatable(self.uri):
                return None
            self._table = DeltaTable(self.uri)
        else:
            self._table.update_incremental()
        return self._table

    def write(self, labels: list[LabelledExample], positions: dict[str, int]) -> bool:
        from deltalake import write_deltalake
        from deltalake.transaction import CommitProperties, Transaction

        table = self._open()
        done = {src: table.transaction_version(src) if table is not None else None for src in positions}
        if positions and all(stored is not None and stored >= positions[src] for src, stored in done.items()):
            return False
        rows = [lab.model_dump(mode="json") for lab in labels]
        stored_at = time.time()
        for row in rows:
            row["stored_at"] = stored_at
        data = pa.Table.from_pylist(rows, schema=LABEL_SCHEMA)
        txns = [Transaction(src, last) for src, last in positions.items()]
        commit = CommitProperties(app_transactions=txns, max_commit_retries=50)
        write_deltalake(
            table if table is not None else self.uri,
            data,
            mode="append",
            schema_mode="merge",
            commit_properties=commit,
        )
        return True

    def stored_revisions(self, labels: list[LabelledExample], since: float) -> set[tuple[str, int]]:
        """Which of `labels` are stored already, as (label_id, revision): a replay's labels are written
        only if missing. Rows stored before `since` (a label's timestamp) are skipped by file stats."""
        table = self._open()
        if table is None or not labels:
            return set()
        ids = sorted({lab.label_id for lab in labels})
        found = table.to_pyarrow_table(
            columns=["label_id", "revision"], filters=[("timestamp", ">=", since), ("label_id", "in", ids)]
        ).to_pylist()
        return {(r["label_id"], r["revision"]) for r in found}

    def stored_offset(self, source: str) -> int | None:
        """The last offset of `source` stored (metadata only), or None."""
        table = self._open()
        return table.transaction_version(source) if table is not None else None

    def files(self) -> int:
        """Data files in the current version (metadata only): compaction is due when there are many."""
        table = self._open()
        return len(table.file_uris()) if table is not None else 0

    def version(self) -> int | None:
        table = self._open()
        return table.version() if table is not None else None

    def count(self) -> int:
        """Rows in the table's files (from the log's add actions) plus what compaction removed."""
        return self._contributions(self._open())

    @staticmethod
    def _contributions(table: Any) -> int:
        if table is None:
            return 0
        actions = pa.table(table.get_add_actions(flatten=True))  # arro3 -> pyarrow, no copy
        rows = pc.sum(actions.column("num_records")).as_py() if actions.num_rows else 0
        return int(rows or 0) + (table.transaction_version(COMPACTED_AWAY) or 0)

    def read(self, version: int | None = None, columns: list[str] | None = None) -> tuple[pd.DataFrame, Lineage]:
        """The latest revision of every label (at `version`: time travel), purges applied."""
        table = self._open(version)
        purges = self.purges()
        if table is None:
            return frame([]), {"location": self.uri, "table_version": None, "labels": 0, "contributions": 0}
        wanted = columns or TRAINING_COLUMNS
        present = {f.name for f in table.schema().fields}  # a table written before a column existed lacks it
        raw = table.to_pyarrow_table(columns=[c for c in wanted if c in present]).to_pandas()
        df = apply_purges(latest_revisions(raw.reindex(columns=wanted)), purges)
        df, held = apply_holds(df, self.holds())
        lineage = {
            "location": self.uri,
            "format": "delta",
            "table_version": table.version(),
            "files": len(table.file_uris()),
            "contributions": self._contributions(table),
            **describe(df),
            "purges": len(purges),
            "held": held,
        }
        return df, lineage

    def raw(self, columns: list[str]) -> pa.Table:
        """Every row as stored, revisions and all (audits: was anything stored twice?)."""
        table = self._open()
        return table.to_pyarrow_table(columns=columns) if table is not None else LABEL_SCHEMA.empty_table().select(columns)

    def compact(self) -> dict[str, int]:
        """Rewrites the rows stored until now as one file per ~128 MB with only the latest revision
        of each label, in one transaction (a concurrent append is kept: it lands after the cut);
        then checkpoints the log and removes files older than the retention (time travel's reach)."""
        from deltalake import write_deltalake
        from deltalake.transaction import CommitProperties, Transaction

        table = self._open()
        if table is None:
            return {"files_before": 0, "files_after": 0, "rows_removed": 0}
        files_before = len(table.file_uris())
        cut = time.time()
        old = table.to_pyarrow_table(filters=[("stored_at", "<=", cut)])
        kept = pa.Table.from_pandas(latest_revisions(old.to_pandas()), schema=LABEL_SCHEMA, preserve_index=False)
        removed = old.num_rows - kept.num_rows
        total = (table.transaction_version(COMPACTED_AWAY) or 0) + removed  # in the same commit: count() never jumps
        commit = CommitProperties(app_transactions=[Transaction(COMPACTED_AWAY, total)])
        write_deltalake(table, kept, mode="overwrite", predicate=f"stored_at <= {cut!r}", commit_properties=commit)
        table.update_incremental()
        table.create_checkpoint()
        table.cleanup_metadata()
        table.vacuum(dry_run=False)
        return {"files_before": files_before, "files_after": len(table.file_uris()), "rows_removed": removed}

    def purges(self) -> list[Purge]:
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(self.purges_uri):
            return []
        rows = DeltaTable(self.purges_uri).to_pyarrow_table().column("purge").to_pylist()
        return sorted((Purge.model_validate_json(r) for r in rows), key=lambda p: p.at)

    def purge(self, purge: Purge, count: bool = True) -> int:
        from deltalake import write_deltalake

        before = len(self.read()[0]) if count else 0
        row = pa.Table.from_pylist([{"purge": purge.model_dump_json()}], schema=PURGE_SCHEMA)
        write_deltalake(self.purges_uri, row, mode="append")
        return before - len(self.read()[0]) if count else 0

    def holds(self) -> list[Hold]:
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(self.holds_uri):
            return []
        rows = DeltaTable(self.holds_uri).to_pyarrow_table().column("hold").to_pylist()
        return latest_holds([Hold.model_validate_json(r) for r in rows])

    def hold(self, hold: Hold) -> None:
        from deltalake import write_deltalake

        write_deltalake(
            self.holds_uri, pa.Table.from_pylist([{"hold": hold.model_dump_json()}], schema=HOLD_SCHEMA), mode="append"
        )
