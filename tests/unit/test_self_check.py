"""The first stage checks itself against what its index recorded when it was built."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from training import self_check
from training.corpus.bm25 import Bm25Index
from training.corpus.indexer import Indexer
from training.corpus.store import DocumentStore
from training.ranking.first_stage import BM25_FOLDER, STORE_FILE, FirstStage


def broken_copy(fs: FirstStage, tmp_path) -> FirstStage:
    """The same generation, but the doc ids of the texts reversed (in the store and BM25): every
    search answers with wrong ids."""
    folder = tmp_path / fs.folder.name
    shutil.copytree(fs.folder, folder)
    db = sqlite3.connect(folder / STORE_FILE, isolation_level=None)
    ids = [d for (d,) in db.execute("SELECT id FROM documents ORDER BY num")]
    db.execute("UPDATE documents SET id = '~' || id")
    for old, new in zip(ids, ids[::-1]):
        db.execute("UPDATE documents SET id = ? WHERE id = ?", (new, "~" + old))
    db.close()
    shutil.rmtree(folder / BM25_FOLDER)
    store = DocumentStore(folder / STORE_FILE)
    store.set_applied("bm25", 0)
    Indexer(store, Bm25Index(folder / BM25_FOLDER), None).catch_up()
    return FirstStage(folder)


def test_an_index_records_its_probes_and_figures_and_passes_its_own_check(tiny_first_stage):
    recorded = json.loads((tiny_first_stage.folder / self_check.FILE).read_text())
    assert recorded["index_version"] == tiny_first_stage.version and recorded["probes"] == ["does vitamin D prevent fractures"]
    assert set(recorded["figures"]) == {"test"} and recorded["figures"]["test"]["queries"] == 1
    assert self_check.probe(tiny_first_stage) is None
    self_check.check_figures(tiny_first_stage, "test", recorded["figures"]["test"])  # no exception


def test_a_first_stage_answering_differently_is_caught_at_start_and_in_reports(tiny_first_stage, tmp_path):
    broken = broken_copy(tiny_first_stage, tmp_path)
    problem = self_check.probe(broken)
    assert problem and "first-stage self-check failed" in problem and broken.version in problem
    recorded = json.loads((broken.folder / self_check.FILE).read_text())["figures"]["test"]
    wrong = {**recorded, "ndcg@10": recorded["ndcg@10"] - 0.6}
    with pytest.raises(self_check.IndexMismatch, match="not reporting figures from a broken index"):
        self_check.check_figures(broken, "test", wrong)
