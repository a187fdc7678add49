"""Strings stored for reading in place: one UTF-8 file plus an offsets array, both memory-mapped.

Every serving worker reads document texts and titles by row; as Python lists they cost each worker
the corpus size in private memory (and ~1 GC-tracked object per row), while a memory-mapped file is
read from the page cache that all workers on the machine share.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np


def write_text_column(path: Path, values: Iterable[str]) -> Path:
    """Writes `path` (the bytes) and `path.offsets.npy` (row i is bytes offsets[i]:offsets[i+1])."""
    offsets = [0]
    with path.open("wb") as f:
        for value in values:
            offsets.append(offsets[-1] + f.write(value.encode("utf-8")))
    np.save(offsets_file(path), np.array(offsets, dtype=np.int64))
    return path


def offsets_file(path: Path) -> Path:
    return path.with_name(path.name + ".offsets.npy")


class TextColumn:
    """Read-only rows of a column written by `write_text_column`."""

    def __init__(self, path: Path):
        self.offsets = np.load(offsets_file(path), mmap_mode="r")
        size = int(self.offsets[-1])
        # np.memmap refuses an empty file; an empty column has nothing to map
        self.data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> str:
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        return self.data[start:end].tobytes().decode("utf-8")
