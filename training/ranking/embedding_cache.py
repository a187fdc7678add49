"""Document embeddings per model version, behind a protocol: Redis in serving (shared by replicas),
memory elsewhere. Imports numpy only, so storage code can name it without loading a model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np


class EmbeddingCache(Protocol):
    """Document embeddings per model version; Redis in serving (shared by replicas), memory elsewhere."""

    def get_many(self, version: str, doc_ids: list[str]) -> dict[str, np.ndarray]: ...
    def put_many(self, version: str, vectors: Mapping[str, np.ndarray]) -> None: ...


class MemoryEmbeddingCache:
    """Process-local embedding cache (training, evaluation, unit tests)."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, str], np.ndarray] = {}

    def get_many(self, version: str, doc_ids: list[str]) -> dict[str, np.ndarray]:
        return {d: self.store[(version, d)] for d in doc_ids if (version, d) in self.store}

    def put_many(self, version: str, vectors: Mapping[str, np.ndarray]) -> None:
        for d, v in vectors.items():
            self.store[(version, d)] = v
