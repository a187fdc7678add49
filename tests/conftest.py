"""Shared by unit and integration tests: free ports and a small BEIR dataset cut from SciFact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.local.infra import free_port

__all__ = ["free_port"]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCIFACT = SHARED_DATA / "scifact"


def make_small_beir(src: Path, dst: Path, queries: int = 40, extra_docs: int = 300) -> Path:
    """The first `queries` judged train queries, their relevant docs and `extra_docs` others."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "qrels").mkdir(exist_ok=True)
    lines = (src / "qrels" / "train.tsv").read_text().splitlines()
    header, rows = lines[0], [r.split("\t") for r in lines[1:]]
    qids = list(dict.fromkeys(r[0] for r in rows))[:queries]
    keep_rows = [r for r in rows if r[0] in qids]
    wanted = {r[1] for r in keep_rows}
    docs = []
    with (src / "corpus.jsonl").open() as f:
        for line in f:
            d = json.loads(line)
            if d["_id"] in wanted or len(docs) < extra_docs + len(wanted):
                docs.append(line)
    (dst / "corpus.jsonl").write_text("".join(docs))
    with (src / "queries.jsonl").open() as f:
        (dst / "queries.jsonl").write_text("".join(line for line in f if json.loads(line)["_id"] in qids))
    (dst / "qrels" / "train.tsv").write_text("\n".join([header] + ["\t".join(r) for r in keep_rows]) + "\n")
    return dst


def require_scifact() -> None:
    """The integration tests run on SciFact next to the checkout: without it CI must fail, not go green
    having run a third of the suite."""
    if not (SCIFACT / "corpus.jsonl").exists():
        pytest.fail(f"SciFact not found at {SCIFACT}: the tests read it from ../shared/data (never copied into the repo)")


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    require_scifact()
    return make_small_beir(SCIFACT, tmp_path_factory.mktemp("beir") / "small")


def clear_rankloop_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests see no settings from the shell or from an integration fixture."""
    import os

    for name in list(os.environ):
        if name.startswith("RANKLOOP_") or name == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(name)
