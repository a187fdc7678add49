"""Unit fixtures: a tiny real index and a tiny real model, no broker, Redis or MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import clear_rankloop_env

DOCS = {
    "d1": ("Vitamin D and bone fractures", "Vitamin D supplements reduce the risk of hip fractures in older adults."),
    "d2": ("Statins and the heart", "Statins lower cholesterol and the risk of heart attacks."),
    "d3": ("Smoking and lung cancer", "Tobacco smoking is the main cause of lung cancer."),
    "d4": ("Exercise and longevity", "Regular physical exercise is associated with a longer life."),
    "d5": ("Antibiotics and gut bacteria", "Antibiotics disturb the gut microbiome for months."),
    "d6": ("Sleep and memory", "Sleep consolidates memories formed during the day."),
    "d7": ("Coffee and the liver", "Coffee drinkers have a lower risk of liver disease."),
    "d8": ("Vaccines and measles", "Two doses of the measles vaccine protect almost everyone."),
}


@pytest.fixture(autouse=True)
def no_outside_settings(monkeypatch):
    """Unit tests see no RANKLOOP_* settings from the shell or from an integration fixture."""
    clear_rankloop_env(monkeypatch)


def write_beir(folder: Path) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": t, "text": x}) + "\n" for d, (t, x) in DOCS.items())
    )
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "does vitamin D prevent fractures"}) + "\n")
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return folder


@pytest.fixture(scope="session")
def tiny_first_stage(tmp_path_factory):
    from training import beir
    from training.indexing import build_index
    from training.ranking.first_stage import FirstStage

    root = tmp_path_factory.mktemp("tiny")
    return FirstStage(build_index(beir.load(write_beir(root / "beir")), root / "state"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The base encoder saved as a model version whose memory says d7 is the answer to one query."""
    from training.ranking.encoder import load_encoder
    from training.ranking.reranker import Mix, save_model_folder

    folder = tmp_path_factory.mktemp("model") / "model"
    return save_model_folder(
        load_encoder(), folder, Mix(alpha=0.5, beta=2.0, tau=0.5), {"does vitamin d prevent fractures": {"d7": 3.0}}
    )


@pytest.fixture()
def living_index(tiny_first_stage, tmp_path):
    """A private copy of the tiny index, for tests that change documents (the shared one stays as built)."""
    import shutil

    from training.ranking.first_stage import FirstStage

    folder = tmp_path / "state" / "index"
    shutil.copytree(tiny_first_stage.folder, folder, ignore=shutil.ignore_patterns("indexer.lock"))
    return FirstStage(folder)
