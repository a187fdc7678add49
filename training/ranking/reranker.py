"""The reranker: a fine-tuned bi-encoder whose similarity is mixed with the first-stage score.

Why a bi-encoder and not a cross-encoder (docs/ranking.md): the only offline checkpoint is
all-MiniLM-L6-v2, a bi-encoder; a cross-encoder built on it starts from a random head and, measured
here, stays below the hybrid first stage, while a bi-encoder fine-tuned with in-batch negatives lifts
it. By default only its query side is fine-tuned (`document_tower: frozen`): documents keep the
vectors the index holds, so a promotion embeds nothing (docs/scale.md). A tuned document tower
embeds the corpus once per version (`warm`).

A model is a folder: the sentence-transformers save (safetensors + config) plus `rankloop.json`,
the feedback memory (`feedback_prior.json`, its queries embedded, and their faiss index).
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from sentence_transformers import SentenceTransformer

from training.corpus.store import content_key
from training.progress import Progress, silent
from training.ranking.combiner import COMBINER_FILE, WITHOUT_MEMORY_FILE, Combiner
from training.ranking.embedding_cache import EmbeddingCache, MemoryEmbeddingCache
from training.ranking.encoder import encode, load_encoder
from training.ranking.features import Features, memory_scores
from training.ranking.feedback_memory import INDEX_FILE, Evidence, FeedbackMemory, build_index
from training.ranking.first_stage import Candidate, FirstStage, minmax
from training.ranking.model_files import MEASURED_PRIOR_FILE, MEMORY_FILE, META_FILE, PRIOR_FILE
from training.ranking.query import normalise_query

MEMORY_NEIGHBOURS = 10
QUERY_VECTORS = 50_000  # query embeddings a version remembers (~80 MB)
FAMILIAR_AT = 0.7
"""Cosine (under the version's model) to the nearest query users gave feedback on, from which a query
counts as familiar. Under all-MiniLM-L6-v2 paraphrases of one question sit above it; on SciFact 54 % of
test queries have a train query this close, in a 20-query head cut 2 % (docs/ranking.md)."""


@dataclass(frozen=True)
class Mix:
    """score = alpha * model similarity + (1 - alpha) * first stage + beta * tanh(feedback memory);
    tau is the similarity below which a past query's feedback is not borrowed; bm25_weight is the
    first stage's fusion, learned per deployment (None: the index's; 0: dense alone; 1: BM25 alone)."""

    alpha: float
    beta: float = 0.0
    tau: float = 0.5
    bm25_weight: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


class Reranker:
    """A model version: the fine-tuned encoder, how it scores (its tuned `Mix`, or a learned
    `Combiner` when that won on the tune slice) and its feedback memory.

    The feedback memory is what users said about this query *and queries like it*: for the
    `MEMORY_NEIGHBOURS` most similar past queries q' (cosine s under this model), each doc gets
    w(s) * evidence(q', doc), with w(s) = max(0, (s - tau) / (1 - tau)); the exact same query has
    w = 1. Head queries repeat and related queries share answers (on SciFact two thirds of the test
    queries have a relevant document that is relevant to some train query), so remembering
    feedback is the first thing a loop should do; the bi-encoder carries what generalises beyond.
    """

    def __init__(self, folder: Path, version: str, cache: EmbeddingCache | None = None):
        self.folder = Path(folder)
        self.version = version
        self.meta: dict[str, Any] = json.loads((self.folder / META_FILE).read_text())
        self.mix = mix_from(self.meta)
        unfamiliar = self.meta.get("unfamiliar")
        self.unfamiliar_mix: Mix | None = mix_from(unfamiliar) if unfamiliar else None  # None: one mix for every query
        prior_path = self.folder / PRIOR_FILE
        self.prior: dict[str, Evidence] = json.loads(prior_path.read_text()) if prior_path.exists() else {}
        self.model = load_encoder(self.folder)
        self.cache: EmbeddingCache = cache or MemoryEmbeddingCache()
        self.memory_queries = list(self.prior)
        self.document_prior = document_prior(self.prior)
        self.combiner = Combiner.load(self.folder / COMBINER_FILE) if self.meta.get("scorer") == "combiner" else None
        self.memory = FeedbackMemory.load(
            self.folder, self.prior, memory_embeddings(self.model, self.folder, self.memory_queries)
        )
        self.frozen_documents = self.meta.get("document_tower") == "frozen"  # see `doc_embeddings`
        self.doc_matrix: np.ndarray | None = None  # a tuned tower's embedding of every indexed doc (see `warm`)
        self.doc_rows: dict[str, tuple[int, str]] = {}  # doc_id -> (row, content key embedded)
        self.index: FirstStage | None = None
        self.query_vectors: dict[str, np.ndarray] = {}  # shared by `with_mix` copies: same model, same vectors

    def warm(self, index: FirstStage, batch: int = 256, progress: Progress = silent) -> Reranker:
        """Makes every document of `index` cost a row lookup instead of an encoding: loads this
        version's embedding matrix for that corpus (memory-mapped, shared by every process on the
        machine), computing and saving it first when the folder has none. A training computes it
        with the version; a serving worker that meets a version without one computes it *before*
        it swaps, so a promotion never starts with a cold cache. A row is used only while its
        document's text is what was embedded: an edited document is embedded again (and cached).
        A version with a frozen document tower has nothing to compute: it reads the index's vectors."""
        if self.frozen_documents:
            self.index = index
            return self
        path = self.folder / doc_matrix_file(index.corpus_id)
        rows_path = path.with_suffix(".rows.json")
        if not path.exists() or not rows_path.exists():
            total, parts, rows = index.count(), [], {}  # type: int, list[np.ndarray], dict[str, list]
            for chunk in index.store.iter_live(batch):
                parts.append(encode(self.model, [body for _, _, body in chunk]).astype(np.float16))
                for doc_id, key, _ in chunk:
                    rows[doc_id] = [len(rows), key]
                progress(f"embedding {total} documents for version {self.version}", len(rows), total)
            writer = f"{os.getpid()}-{threading.get_ident()}"  # two threads may warm one version at once
            tmp = path.with_suffix(f".{writer}.tmp.npy")
            np.save(tmp, np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float16))
            rows_tmp = rows_path.with_suffix(f".{writer}.tmp")
            rows_tmp.write_text(json.dumps(rows))
            rows_tmp.replace(rows_path)
            tmp.replace(path)  # atomic: another process never reads half a matrix
        self.doc_rows = {d: (int(r), key) for d, (r, key) in json.loads(rows_path.read_text()).items()}
        self.doc_matrix = np.load(path, mmap_mode="r")
        self.index = index
        return self

    def with_mix(self, mix: Mix, unfamiliar: Mix | None = None) -> Reranker:
        """The same model (shared weights and caches) under another mix (and another one for unfamiliar
        queries; None: `mix` for every query), scored by the mix."""
        other = copy.copy(self)
        other.mix, other.unfamiliar_mix, other.combiner = mix, unfamiliar, None
        return other

    def as_measured(self) -> Reranker:
        """The same model with the feedback memory tuning and the gate measured it with, its train
        slice's (it serves every label's): how a later gate compares it with a challenger measured
        the same way. A version saved before the two differed is its own measure."""
        path = self.folder / MEASURED_PRIOR_FILE
        if not path.exists():
            return self
        prior: dict[str, Evidence] = json.loads(path.read_text())
        row = {q: i for i, q in enumerate(self.memory_queries)}
        known = all(q in row for q in prior)
        return self.with_memory(prior, self.memory.embeddings[[row[q] for q in prior]] if known else None)

    def with_memory(self, prior: dict[str, Evidence], embedded: np.ndarray | None = None) -> Reranker:
        """The same model (and mix or combiner) with another feedback memory; `embedded`: its queries
        as this model embeds them, when already computed."""
        embedded = embedded if embedded is not None else encode(self.model, list(prior))
        other = copy.copy(self)
        other.prior, other.memory_queries, other.document_prior = prior, list(prior), document_prior(prior)
        other.memory = FeedbackMemory(list(prior), list(prior.values()), embedded, build_index(embedded))
        return other

    def with_combiner(self, combiner: Combiner) -> Reranker:
        """The same model scored by `combiner` (under the familiar mix's fusion)."""
        other = copy.copy(self)
        other.combiner = combiner
        return other

    def stored_combiner(self, memory: bool = True) -> Combiner | None:
        """The combiner trained with the version (kept or not; `memory=False`: the one trained without
        the feedback memory's features), for comparing designs (`training.evaluate.evaluate_designs`)."""
        path = self.folder / (COMBINER_FILE if memory else WITHOUT_MEMORY_FILE)
        return Combiner.load(path) if path.exists() else None

    def familiarity(self, query_embedding: np.ndarray) -> float:
        """Cosine to the nearest query of the feedback memory (0 without one)."""
        return self.memory.familiarity(query_embedding)

    def mix_for(self, query_embedding: np.ndarray) -> Mix:
        """The mix a query is served with: the familiar one near queries users gave feedback on, else
        the one tuned on unfamiliar queries. A model fine-tuned on a few head queries must not impose
        what it learned there on every other query (measured: -0.078 NDCG@10 on unseen ones)."""
        if self.unfamiliar_mix is None or self.familiarity(query_embedding) >= FAMILIAR_AT:
            return self.mix
        return self.unfamiliar_mix

    def doc_embeddings(self, doc_ids: list[str], text: Callable[[str], str]) -> np.ndarray:
        """This version's embeddings of the documents as they are now. A frozen document tower: the
        base encoder's vectors the first stage holds (a new version changes no document vector, so
        promotion costs the same at any corpus size). A tuned one: a matrix row while the text is the
        one embedded, else the cache keyed by the document's content (an edit is a new key)."""
        if self.frozen_documents:
            if self.index is None:
                raise RuntimeError(f"version {self.version} scores documents with the index's vectors: warm it first")
            return self.index.base_vectors(doc_ids, text, self.cache)
        keys = self.index.content_keys(doc_ids) if self.index is not None else {}
        out: dict[str, np.ndarray] = {}
        cached: dict[str, str] = {}  # doc_id -> its cache key
        for d in doc_ids:
            key = keys.get(d) or content_key(text(d))
            row = self.doc_rows.get(d)
            if self.doc_matrix is not None and row is not None and row[1] == key:
                out[d] = np.asarray(self.doc_matrix[row[0]], dtype=np.float32)
            else:
                cached[d] = f"{d}@{key}"
        if cached:
            found = self.cache.get_many(self.version, list(cached.values()))
            missing = [d for d, k in cached.items() if k not in found]
            if missing:
                fresh = encode(self.model, [text(d) for d in missing])
                self.cache.put_many(self.version, {cached[d]: v for d, v in zip(missing, fresh)})
                found.update({cached[d]: v for d, v in zip(missing, fresh)})
            out.update({d: found[k] for d, k in cached.items()})
        return np.stack([out[d] for d in doc_ids])

    def embed_query(self, query: str) -> np.ndarray:
        """The query as this version embeds it (what `features` compares documents with); remembered,
        since tuning and the gate ask for the same queries many times."""
        key = normalise_query(query)
        found = self.query_vectors.get(key)
        return found if found is not None else self.embed_queries([key])[0]

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        """`embed_query` of many queries, the ones not remembered encoded in batches (a training asks
        for thousands: one at a time they took half of a 45k-label run)."""
        keys = [normalise_query(q) for q in queries]
        known: dict[str, np.ndarray] = {}  # a local view: another thread may clear the cache meanwhile
        for k in keys:
            found = self.query_vectors.get(k)
            if found is not None:
                known[k] = found
        missing = list(dict.fromkeys(k for k in keys if k not in known))
        if missing:
            fresh = dict(zip(missing, encode(self.model, missing)))
            if len(self.query_vectors) + len(missing) > QUERY_VECTORS:
                self.query_vectors.clear()  # bounded: a serving worker meets unbounded distinct queries
            self.query_vectors.update(fresh)
            known.update(fresh)
        return np.stack([known[k] for k in keys]) if keys else np.zeros((0, 0), dtype=np.float32)

    def features(
        self,
        query: str,
        candidates: list[Candidate],
        text: Callable[[str], str],
        query_embedding: np.ndarray | None = None,
        unseen: bool = False,
        leave_out: bool = False,
        documents: list[str] | None = None,
    ) -> Features:
        """`query_embedding`, when given, is `embed_query(query)` computed already (serving computes it
        while the first stage retrieves). `unseen`: as if the memory knew nothing within `FAMILIAR_AT` of
        the query (how tuning asks what a held-out query would get were it new). `leave_out`: as if the
        memory did not hold this very query (how the combiner learns from train queries). `documents`:
        the document features to read from the corpus (None: those this version's combiner reads, so a
        version without them costs no lookup)."""
        q = query_embedding if query_embedding is not None else self.embed_query(query)
        doc_ids = [c.doc_id for c in candidates]
        sims = self.doc_embeddings(doc_ids, text) @ q if doc_ids else np.zeros(0, dtype=np.float32)
        first = minmax(np.array([c.fused for c in candidates], dtype=np.float32))
        dense = np.array([c.dense for c in candidates], dtype=np.float32)
        prior = np.array([self.document_prior.get(d, 0.0) for d in doc_ids], dtype=np.float32)
        # `unseen` looks further, then drops the familiar ones (a tuning probe may have many near twins)
        near, pos = self.memory.nearest(q, MEMORY_NEIGHBOURS * (5 if unseen else 1) + int(leave_out))
        if unseen:
            near, pos = near[near < FAMILIAR_AT], pos[near < FAMILIAR_AT]
        if leave_out:
            key = normalise_query(query)
            own = self.prior.get(key, {})
            keep = np.array([self.memory_queries[i] != key for i in pos], dtype=bool)
            near, pos = near[keep], pos[keep]
            prior = prior - np.array([own.get(d, 0.0) for d in doc_ids], dtype=np.float32)
        neighbours, evidence = near[:MEMORY_NEIGHBOURS], [self.memory.evidence[i] for i in pos[:MEMORY_NEIGHBOURS]]
        bm25 = minmax(np.array([c.bm25 for c in candidates], dtype=np.float32))
        wanted = documents if documents is not None else (self.combiner.document_features if self.combiner else [])
        numbers = self.index.document_numbers(doc_ids, wanted) if wanted and self.index is not None else {}
        return Features(doc_ids, minmax(sims), first, neighbours, evidence, bm25, minmax(dense), dense, prior, numbers)

    @staticmethod
    def combine(f: Features, mix: Mix) -> np.ndarray:
        scores = mix.alpha * f.similarity + (1 - mix.alpha) * f.first_stage
        if mix.beta:
            scores = scores + mix.beta * np.tanh(memory_scores(f, mix.tau))
        return scores


def document_prior(prior: Mapping[str, Evidence]) -> dict[str, float]:
    """Each document's summed feedback over every remembered query (the combiner's click-through prior)."""
    out: dict[str, float] = {}
    for said in prior.values():
        for d, v in said.items():
            out[d] = out.get(d, 0.0) + v
    return out


def memory_embeddings(model: SentenceTransformer, folder: Path, queries: list[str]) -> np.ndarray:
    """The feedback memory's queries as this version embeds them: saved with the version, so loading
    one to swap in costs a file read, not hundreds of encodings beside live requests."""
    path = folder / MEMORY_FILE
    if path.exists():
        stored = np.load(path)
        if len(stored) == len(queries):
            return stored
    return encode(model, queries)


def doc_matrix_file(corpus_id: str) -> str:
    """The file holding a version's embeddings of the documents of one corpus."""
    return f"doc_embeddings-{corpus_id}.npy"


def save_model_folder(
    model: SentenceTransformer,
    folder: Path,
    mix: Mix,
    prior: Mapping[str, Evidence] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """A version folder; `extra` goes to `rankloop.json` (`document_tower: frozen` marks a model that
    encodes queries only, scored against the index's own document vectors)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save(str(folder), safe_serialization=True)
    save_memory(model, folder, prior or {})
    return write_meta(folder, mix, extra)


def save_memory(model: SentenceTransformer, folder: Path, prior: Mapping[str, Evidence]) -> np.ndarray:
    """A version's feedback memory: what was said per query, those queries as the version embeds them
    (returned), and their ANN index (replacing any the folder held)."""
    prior = dict(prior)
    (folder / PRIOR_FILE).write_text(json.dumps(prior))
    embedded = encode(model, list(prior))
    np.save(folder / MEMORY_FILE, embedded)
    faiss.write_index(build_index(embedded), str(folder / INDEX_FILE))
    return embedded


def mix_from(values: Mapping[str, Any]) -> Mix:
    fusion = values.get("bm25_weight")
    return Mix(
        float(values["alpha"]),
        float(values.get("beta", 0.0)),
        float(values.get("tau", 0.5)),
        None if fusion is None else float(fusion),
    )


def write_meta(folder: Path, mix: Mix, extra: Mapping[str, Any] | None = None, unfamiliar: Mix | None = None) -> Path:
    """The version's mixes and lineage (tuned mixes are written after the weights were saved)."""
    meta = {"kind": "bi-encoder", "scorer": "mix", **mix.as_dict(), **(extra or {})}
    if unfamiliar is not None:
        meta["unfamiliar"] = unfamiliar.as_dict()
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))
    return folder
