"""BEIR-format datasets: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.

A folder is read as it is; a bare BEIR name (e.g. "scifact") that is not a folder is downloaded from
the public BEIR mirror into the cache dir (needs a network; offline machines pass a folder).
"""

from __future__ import annotations

import csv
import json
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from schemas import NotFound

BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


@dataclass
class Dataset:
    name: str
    path: Path
    corpus: dict[str, dict] = field(repr=False)  # doc_id -> {"title", "text"}
    queries: dict[str, str] = field(repr=False)  # query_id -> text

    def qrels(self, split: str) -> dict[str, dict[str, int]]:
        """query_id -> {doc_id: grade}; grades above 0 are relevant."""
        path = self.path / "qrels" / f"{split}.tsv"
        if not path.exists():
            raise NotFound(f"no qrels for split {split!r}: {path} does not exist")
        out: dict[str, dict[str, int]] = {}
        with path.open() as f:
            reader = csv.reader(f, delimiter="\t")
            next(reader, None)
            for row in reader:
                if len(row) >= 3 and int(float(row[2])) > 0:
                    out.setdefault(row[0], {})[row[1]] = int(float(row[2]))
        # judgements of documents outside the corpus (common in subsets) can never be retrieved
        out = {q: {d: g for d, g in docs.items() if d in self.corpus} for q, docs in out.items() if q in self.queries}
        return {q: docs for q, docs in out.items() if docs}

    def doc_text(self, doc_id: str) -> str:
        return doc_text(self.corpus[doc_id])


def doc_text(doc: dict) -> str:
    title = (doc.get("title") or "").strip()
    text = (doc.get("text") or "").strip()
    return f"{title}. {text}" if title else text


def _read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def resolve(dataset: str | Path, cache_dir: Path) -> Path:
    path = Path(dataset)
    if path.is_dir():
        return path
    if "/" in str(dataset) or path.suffix:
        raise NotFound(f"dataset folder {path} does not exist")
    target = cache_dir / str(dataset)
    if not (target / "corpus.jsonl").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        zip_path = target.with_suffix(".zip")
        url = BEIR_URL.format(name=dataset)
        try:
            urllib.request.urlretrieve(url, zip_path)
        except OSError as e:
            raise NotFound(f"{dataset!r} is not a folder and downloading {url} failed ({e}); pass a BEIR folder") from e
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(target.parent)
    return target


def load(dataset: str | Path, cache_dir: Path = Path(".rankloop/datasets")) -> Dataset:
    """Reads a BEIR folder (or fetches a BEIR name into `cache_dir` where a network exists)."""
    path = resolve(dataset, cache_dir)
    corpus_path = path / "corpus.jsonl"
    if not corpus_path.exists():
        raise NotFound(f"{corpus_path} not found: a BEIR folder has corpus.jsonl")
    corpus = {str(d["_id"]): {"title": d.get("title", ""), "text": d.get("text", "")} for d in _read_jsonl(corpus_path)}
    queries_path = path / "queries.jsonl"
    queries = {str(q["_id"]): q["text"] for q in _read_jsonl(queries_path)} if queries_path.exists() else {}
    return Dataset(name=path.name, path=path, corpus=corpus, queries=queries)
