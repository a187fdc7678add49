"""An application's documents from its own files: JSONL, CSV or Parquet with a field mapping, or a
BEIR folder (`corpus.jsonl` with `_id`, `title`, `text`). Rows are read one at a time (Parquet in
record batches), so a large file is never held whole; each becomes a raw document for
`schemas.documents.check_document`, which refuses it with a reason or accepts it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import InvalidInput
from schemas.documents import FieldType

FORMATS = ("jsonl", "csv", "parquet")


@dataclass
class Mapping:
    """Which column is what: `--id id --text body --title name --field lang --field year:number`."""

    id: str = "id"
    text: str = "text"
    title: str | None = "title"
    fields: dict[str, FieldType] = field(default_factory=dict)
    vector: str | None = None

    @classmethod
    def beir(cls) -> Mapping:
        return cls(id="_id", text="text", title="title")

    def document(self, row: dict[str, Any]) -> dict[str, Any]:
        """The raw document of one row: mapped columns only, numbers read from text where declared
        (a row that could not be read stays the error marker it is)."""
        if "__error__" in row:
            return row
        doc: dict[str, Any] = {"id": _string(row.get(self.id)), "text": row.get(self.text)}
        if self.title and row.get(self.title) is not None:
            doc["title"] = row[self.title]
        fields = {}
        for name, kind in self.fields.items():
            value = row.get(name)
            if value is None or value == "":
                continue
            fields[name] = _number(value) if kind is FieldType.number else value
        if fields:
            doc["fields"] = fields
        if self.vector and row.get(self.vector) is not None:
            vec = row[self.vector]
            doc["vector"] = json.loads(vec) if isinstance(vec, str) else list(vec)
        return doc


def parse_field(spec: str) -> tuple[str, FieldType]:
    """`lang` (a keyword field) or `year:number`."""
    name, _, kind = spec.partition(":")
    try:
        return name, FieldType(kind or "keyword")
    except ValueError:
        raise InvalidInput(f"--field {spec}: the type is keyword or number") from None


def _string(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value) if value.strip().lstrip("-").isdigit() else float(value)
        except ValueError:
            return value  # refused with its reason by check_document
    return value


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    fmt = {"json": "jsonl", "ndjson": "jsonl", "pq": "parquet"}.get(suffix, suffix)
    if fmt not in FORMATS:
        raise InvalidInput(f"{path}: cannot tell the format from .{suffix}; pass --format jsonl, csv or parquet")
    return fmt


def read_rows(path: Path, fmt: str | None = None) -> Iterator[dict[str, Any]]:
    """The rows of a file one at a time (a row that is not valid JSON is yielded as an error marker)."""
    fmt = fmt or detect_format(path)
    if fmt == "jsonl":
        with path.open() as f:
            for line in f:
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield {"__error__": f"not JSON: {e}"}
                        continue
                    yield row if isinstance(row, dict) else {"__error__": "a line is not a JSON object"}
    elif fmt == "csv":
        with path.open(newline="") as f:
            yield from csv.DictReader(f)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1000):
            yield from batch.to_pylist()
    else:
        raise InvalidInput(f"unknown format {fmt!r}: jsonl, csv or parquet")
