"""The one normal form of a query: caches, feedback memory and label aggregation all key on it."""

from __future__ import annotations

import hashlib


def normalise_query(query: str) -> str:
    """Lower case, single spaces: "Statins  and Heart" and "statins and heart" are one query."""
    return " ".join(query.lower().split())


def query_key(query: str) -> str:
    """A short stable id of the normalised query (cache keys, per-query metrics)."""
    return hashlib.sha1(normalise_query(query).encode()).hexdigest()[:16]
