"""Datasets made harder on purpose, to show the loop correcting what a fixed design gets wrong.

`keyword_stuffed`: every document gets a tail of words from a few random queries of the query log
(search-engine spam). BM25 reads the whole text and matches the spam; the dense encoder reads the
first 256 word pieces, so on most documents it never sees the tail. One first-stage part then beats
the fixed fusion, and a learned fusion has something to learn.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

from training.beir import Dataset


def keyword_stuffed(ds: Dataset, out: Path, queries_per_doc: int = 3, seed: int = 0) -> Path:
    """Writes a BEIR folder at `out`: `ds` with stuffed document texts, its queries and qrels as they are."""
    rng = random.Random(seed)
    pool = [ds.queries[q] for q in sorted(ds.queries)]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w") as f:
        for doc_id, doc in ds.corpus.items():
            spam = [w for q in rng.sample(pool, min(queries_per_doc, len(pool))) for w in re.findall(r"\w+", q.lower())]
            text = f"{doc.get('text') or ''} {' '.join(spam)}".strip()
            f.write(json.dumps({"_id": doc_id, "title": doc.get("title", ""), "text": text}) + "\n")
    shutil.copy(ds.path / "queries.jsonl", out / "queries.jsonl")
    shutil.copytree(ds.path / "qrels", out / "qrels", dirs_exist_ok=True)
    (out / "VARIANT.md").write_text(
        f"{ds.name} with keyword-stuffed documents: each text ends with the words of {queries_per_doc} random "
        f"queries (seed {seed}), made by `rankloop variant keyword-stuffed`.\n"
    )
    return out
