"""Datasets made harder on purpose, to show the loop correcting what a fixed design gets wrong.

`keyword_stuffed`: every document gets a tail of words from a few random queries of the query log
(search-engine spam). BM25 reads the whole text and matches the spam; the dense encoder reads the
first 256 word pieces, so on most documents it never sees the tail. One first-stage part then beats
the fixed fusion, and a learned fusion has something to learn.

`subset`: a seeded cut with fewer queries per split and fewer documents (every judged document of the
kept queries, plus random others). The loop benchmark then runs in minutes instead of hours, for
checks that need several runs, like two runs of one seed giving the same figures.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Mapping
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


def subset(ds: Dataset, out: Path, queries: Mapping[str, int], docs: int, seed: int = 0) -> Path:
    """Writes a BEIR folder at `out`: per split in `queries`, that many of its judged queries (a seeded
    draw), their qrels, and a corpus of their judged documents topped up with random others to `docs`."""
    rng = random.Random(seed)
    kept: dict[str, dict[str, dict[str, int]]] = {}
    for split, n in queries.items():
        judged = ds.qrels(split)
        kept[split] = {q: judged[q] for q in sorted(rng.sample(sorted(judged), min(n, len(judged))))}
    needed = {d for qrels in kept.values() for docs_of in qrels.values() for d in docs_of}
    others = sorted(set(ds.corpus) - needed)
    corpus = needed | set(rng.sample(others, max(0, min(docs - len(needed), len(others)))))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w") as f:
        for doc_id in sorted(corpus):
            f.write(json.dumps({"_id": doc_id, **ds.corpus[doc_id]}) + "\n")
    with (out / "queries.jsonl").open("w") as f:
        for q in sorted({q for qrels in kept.values() for q in qrels}):
            f.write(json.dumps({"_id": q, "text": ds.queries[q]}) + "\n")
    (out / "qrels").mkdir(exist_ok=True)
    for split, qrels in kept.items():
        rows = [f"{q}\t{d}\t{g}" for q, docs_of in qrels.items() for d, g in sorted(docs_of.items())]
        (out / "qrels" / f"{split}.tsv").write_text("\n".join(["query-id\tcorpus-id\tscore", *rows]) + "\n")
    sizes = ", ".join(f"{len(qrels)} {split}" for split, qrels in kept.items())
    (out / "VARIANT.md").write_text(
        f"A cut of {ds.name}: {sizes} queries (seed {seed}) and {len(corpus)} documents (their judged ones and "
        f"random others), made by `rankloop variant subset`.\n"
    )
    return out
