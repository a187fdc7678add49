"""A first stage that answers as it did when its index was built.

Building an index records, beside it (`self_check.json`), the top 10 of a few probe queries, the
first stage's figures on every judged split of the dataset, and the vector snapshot it was measured
on (exact, or IVF with its nprobe and its recall@100 against exact search). Serving compares the probes at start-up
and stays not ready on a mismatch; reports compare their first-stage figure with the recorded one and
refuse to print a table built on a broken index (a demo once printed NDCG@10 0.1143 for a first stage
that scores 0.7337).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from schemas import InvalidState, NotFound
from training.beir import Dataset
from training.corpus.dense import current_snapshot
from training.evaluate import evaluate_ranker
from training.ranking.first_stage import FirstStage
from training.ranking.rank import candidates_for

FILE = "self_check.json"
PROBES = 32
MIN_AGREEMENT = 0.9  # share of the recorded top 10 found again (bf16 or thread-count rounding may swap a close pair)
TOLERANCE = 0.002  # how far a recomputed figure may be from the recorded one
SPLITS = ("train", "dev", "test")
FIGURES = ("ndcg@10", "recall@100")


class IndexMismatch(InvalidState):
    """The first stage in this process does not answer as the index did when it was built."""


def _top(fs: FirstStage, queries: list[str], k: int) -> list[list[str]]:
    return [[c.doc_id for c in cands[:k]] for cands in fs.search_many(queries, k)]


def _depth(fs: FirstStage) -> int:
    """10, or half a tiny corpus (a top 10 of 8 documents holds all of them and would check nothing)."""
    return max(1, min(10, fs.count() // 2))


def record(fs: FirstStage, ds: Dataset) -> dict:
    """Writes the probes' top 10 and the judged figures beside the index; returns what it wrote."""
    probes = [text for _, text in sorted(ds.queries.items())[:PROBES]] or [
        ds.corpus[d].get("title") or ds.doc_text(d)[:200] for d in list(ds.corpus)[:PROBES]
    ]
    figures = {}
    for split in SPLITS:
        try:
            qrels = ds.qrels(split)
        except NotFound:
            continue
        cands = candidates_for(fs, [ds.queries[q] for q in qrels])
        metrics = evaluate_ranker(ds, split, cands, None, fs.text, depth=0)  # no reranker: first-stage order
        figures[split] = {k: metrics[k] for k in FIGURES} | {"queries": len(qrels)}
    snapshot = current_snapshot(fs.folder)
    data = {
        "index_version": fs.version,
        "probes": probes,
        "top": _top(fs, probes, _depth(fs)),
        "figures": figures,
        "vectors": asdict(snapshot) if snapshot else None,  # its kind, nprobe and recall@100 against exact search
    }
    (fs.folder / FILE).write_text(json.dumps(data, indent=1))
    return data


def _recorded(fs: FirstStage) -> dict | None:
    """What was recorded for the generation `fs` serves; None once the corpus changed since (the
    probes' answers may then rightly differ: the check is of the index as built, not of the corpus)."""
    path = fs.folder / FILE
    data = json.loads(path.read_text()) if path.exists() else None
    return data if data and data.get("index_version") == fs.version else None


def current(fs: FirstStage) -> bool:
    """Whether a self-check was recorded for the generation `fs` serves."""
    return _recorded(fs) is not None


def probe(fs: FirstStage) -> str | None:
    """Why this process's first stage cannot be trusted, or None (also when nothing was recorded:
    an index built before self-checks existed)."""
    data = _recorded(fs)
    if not data or not data["probes"]:
        return None
    recorded = data["top"]
    now = _top(fs, data["probes"], max(len(top) for top in recorded))
    agreement = sum(len(set(a) & set(b)) for a, b in zip(recorded, now)) / max(1, sum(len(b) for b in recorded))
    if agreement < MIN_AGREEMENT:
        return (
            f"first-stage self-check failed: the top results of {len(now)} probe queries share {agreement:.0%} of the documents "
            f"recorded when index {fs.version} was built (at least {MIN_AGREEMENT:.0%} expected)"
        )
    return None


def check_figures(fs: FirstStage, split: str, metrics: dict[str, float]) -> None:
    """Raises IndexMismatch when a first-stage figure about to be reported differs from the one
    recorded at build time on the same split."""
    recorded = (_recorded(fs) or {}).get("figures", {}).get(split)
    if not recorded:
        return
    for name in FIGURES:
        if abs(metrics[name] - recorded[name]) > TOLERANCE:
            raise IndexMismatch(
                f"the first stage scores {name} {metrics[name]:.4f} on {split} in this process but "
                f"{recorded[name]:.4f} when index {fs.version} was built: not reporting figures from a broken index "
                f"({fs.folder}); rerun, and rebuild it with `rankloop index` if it persists"
            )
