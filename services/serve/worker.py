"""The serving worker's logic: rank, take in events, swap models. No HTTP here (see `app.py`) and no
storage of its own: caches, the publisher and the registry are handed in, so all of it runs in unit
tests on in-memory storage.

Hot swap: a background thread watches model events on Kafka and polls the registry's `champion`
alias; a new version is downloaded, loaded and warmed off the request path, then swapped in with one
reference assignment. A request takes its own reference at the start, so requests in flight finish
on the model they began with and no request ever fails because of a swap.

A worker only reads the registry. At every poll it reports what it serves and how often it failed to
load a version (`Fleet`); the control plane decides what to do about a champion nobody can load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ValidationError

from schemas import (
    FIRST_STAGE,
    MAX_ID_CHARS,
    DependencyUnavailable,
    ImpressionEvent,
    InteractionEvent,
    InvalidInput,
    RankedItem,
    RankRequest,
    RankResponse,
    RejectCode,
    Rejection,
    ShownItem,
    TooManyRequests,
    encodable,
)
from schemas.api import InlineCandidate, RerankRequest
from schemas.documents import Condition, DeletedResponse, DocumentRefusal, DocumentsResponse, check_document, parse_filters
from schemas.trust import BadToken, verify_user
from services.auth import UserSecret
from services.config import Settings
from services.serve.documents_feed import DocumentFeed
from services.serve.metrics import ServingMetrics
from services.storage import Caches, Publisher, WorkerReport
from training.config import InterleaveMethod
from training.corpus.bm25 import Lease
from training.corpus.indexer import Indexer
from training.corpus.store import DIM
from training.indexing import LEASE_FILE
from training.interleave import INTERLEAVING, STAGE_TAG, Interleaved, interleave
from training.labels.rules import identity_of
from training.ranking.embedding_cache import EmbeddingCache
from training.ranking.encoder import encode
from training.ranking.first_stage import Candidate, FirstStage
from training.ranking.query import query_key
from training.ranking.rank import rank
from training.ranking.reranker import Reranker
from training.registry import ModelRegistry

log = logging.getLogger("rankloop.serve")
ModelLoader = Callable[..., Reranker]


@dataclass(frozen=True)
class Serving:
    """What one request ranks with; replaced whole on a swap."""

    version: str
    reranker: Reranker | None
    loaded_at: float


def is_printable_id(value: object) -> bool:
    """Whether a rejected event's id can be echoed back (a string that encodes, of an id's size)."""
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
        return False
    try:
        encodable(value)
    except ValueError:
        return False
    return True


def validation_detail(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'event'}: {err['msg']}" for err in e.errors())


@dataclass(frozen=True)
class Origin:
    """Who a ranking was for, as the server vouches for it (`Worker.origin`): on its impression."""

    api_key: str | None
    user: str | None
    session: str | None
    verified: bool  # `user` came with a valid user token
    client: str | None  # the network prefix of the caller


class Worker:
    def __init__(
        self,
        s: Settings,
        first_stage: FirstStage,
        caches: Caches,
        publisher: Publisher,
        registry: ModelRegistry,
        load_model: Callable[[Any, str, EmbeddingCache], Reranker] = Reranker,
        rng: random.Random | None = None,
    ):
        self.s, self.keys = s, s.keys
        self.first_stage = first_stage
        self.caches = caches
        self.publisher = publisher
        self.registry = registry
        self.load_model = load_model
        self.metrics = ServingMetrics()
        self.metrics.watch(publisher)
        self.champion_checked = False  # ready only once the registry was asked what to serve
        self.index_problem: str | None = None  # set when the start-up self-check of the first stage failed
        self._cache_down = False
        self.rng = rng or random.Random()
        self.serving = Serving(FIRST_STAGE, None, time.time())
        self.challenger: Serving | None = None  # interleaved with the champion on `interleave.share` of requests
        self.metrics.serving(FIRST_STAGE)
        self.last_swap_error: str | None = None
        self.load_failures: dict[str, int] = {}
        self.retry_after: dict[str, float] = {}  # version -> when a version found broken is tried again
        self.behind_since: float | None = None  # when the registry's champion began to differ from what is served
        self.name = f"{socket.gethostname()}:{os.getpid()}"  # how its reports name it
        self.user_secret = UserSecret(s.user_secret_file)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._swap_lock = threading.Lock()
        self.corpus_changed = threading.Event()  # a write came in through this worker: catch up now
        self.documents_feed: DocumentFeed | None = None  # the `documents` topic, read while this worker indexes
        self._query_encoder = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="query-encoder")

    # ---- ranking -------------------------------------------------------------------------
    def candidates(self, query: str, conditions: list[Condition] | None = None) -> list[Candidate]:
        k = self.s.serving.candidates_k
        key = self.keys.candidates(self.first_stage.version, k, request_key(query, conditions))
        cached = self._cache_get(key)
        if cached is not None:
            return [Candidate(*row) for row in cached]
        cands = self.first_stage.search(query, k, conditions)
        self._cache_set(key, [[c.doc_id, c.bm25, c.dense, c.fused] for c in cands])
        return cands

    def conditions(self, filters: dict | None) -> list[Condition] | None:
        """A request's filters as conditions; InvalidInput (a 422) names an undeclared field or a bad value."""
        if not filters:
            return None
        try:
            return parse_filters(filters, self.first_stage.store.declared())
        except ValueError as e:
            raise InvalidInput(str(e)) from None

    def _rng_for(self, req: RankRequest) -> random.Random:
        """With `serving.explore_seed` set, a request's exploration follows from the seed and the request
        alone, whatever order concurrent requests arrive in: a replayed simulation explores the same
        requests the same way. Unset (production), one random generator for the process."""
        seed = self.s.serving.explore_seed
        return self.rng if seed is None else random.Random(f"{seed}|{req.query}|{req.user}|{req.session}")

    def origin(self, req: RankRequest | RerankRequest, api_key: str | None, client: str | None) -> Origin:
        """Who asks, as far as the server can vouch: a `user_token` must verify (else 422), and an
        unsigned user/session id never seen from this key (or network) takes a token of
        `auth.new_identities_per_min` (else 429). With Redis down the limit is not enforced."""
        user, verified = req.user, False
        if req.user_token is not None:
            secret = self.user_secret.get()
            if secret is None:
                raise InvalidInput(
                    "user_token given, but this deployment has no user-signing secret (`rankloop keys user-secret`)"
                )
            try:
                signed = verify_user(secret, req.user_token)
            except BadToken as e:
                raise InvalidInput(str(e)) from None
            if user is not None and user != signed:
                raise InvalidInput("user_token vouches for another user than `user`")
            user, verified = signed, True
        per_s = self.s.auth.new_identities_per_min / 60
        identity = identity_of(user, req.session)
        if per_s > 0 and not verified and identity is not None:
            scope = f"key:{api_key}" if api_key else f"net:{client}"
            try:
                wait = self.caches.limits.admit_identity(scope, identity, per_s, max(1.0, per_s * 60), 86400)
            except DependencyUnavailable:
                wait = 0.0
            if wait > 0:
                self.metrics.rate_limited.labels("new-identity").inc()
                raise TooManyRequests(
                    f"more than {self.s.auth.new_identities_per_min:g} new unsigned user/session ids per minute from "
                    f"{scope}; sign your users' ids (user_token, docs/security.md) or retry in {wait:.0f}s",
                    wait,
                )
        return Origin(api_key, user, req.session, verified, client)

    def rank(self, req: RankRequest, api_key: str | None = None, client: str | None = None) -> RankResponse:
        started = time.perf_counter()
        origin = self.origin(req, api_key, client)
        serving = self.serving  # one reference for the whole request: a swap cannot change it midway
        challenger = self.challenger
        rng = self._rng_for(req)
        conditions = self.conditions(req.filters)
        items, hit = self._ranked(serving, req, conditions)
        mixed: Interleaved | None = None
        if challenger is not None and rng.random() < self.s.interleave.share:
            theirs, hit_too = self._ranked(challenger, req, conditions)
            items, mixed = interleaved(items, theirs, req.k, rng, self.s.interleave.method)
            hit, explored = hit and hit_too, False
            self.metrics.interleaved.inc()
        else:
            items, explored = explore(items, rng, self.s.serving.explore_rate, self.s.serving.explore_depth)
        response = self._respond(serving, items, req.k, req.fields)
        self._record(req.query, origin, response, serving, explored, mixed, challenger, started, hit)
        return response

    def _respond(self, serving: Serving, items: list[list], k: int, fields: bool, inline: dict | None = None) -> RankResponse:
        """The answer: the first `k` rows whose documents are live *now* in the store, with their
        current titles and fields. A document deleted after the ranking was computed or cached (its
        delete acknowledged, this worker's index not caught up yet) is never shown."""
        inline = inline or {}
        live = self.first_stage.live([d for d, _ in items if d not in inline])
        shown = [(d, sc) for d, sc in items if d in live or d in inline][:k]
        out = []
        for i, (d, sc) in enumerate(shown):
            doc = live.get(d)
            title, doc_fields = (doc.title, doc.fields) if doc else (inline[d].title, inline[d].fields or {})
            out.append(
                RankedItem(doc_id=d, score=round(sc, 6), position=i + 1, title=title, fields=doc_fields if fields else None)
            )
        return RankResponse(request_id=uuid.uuid4().hex, model_version=serving.version, items=out)

    def _record(
        self,
        query: str,
        origin: Origin,
        response: RankResponse,
        serving: Serving,
        explored: bool,
        mixed: Interleaved | None,
        challenger: Serving | None,
        started: float,
        hit: bool,
    ) -> None:
        """The impression of an answer (buffered to the broker) and the request's metrics."""
        impression = ImpressionEvent(
            request_id=response.request_id,
            query=query,
            user=origin.user,
            session=origin.session,
            user_verified=origin.verified,
            client=origin.client,
            items=[
                ShownItem(doc_id=it.doc_id, position=it.position, score=it.score, **_credited(mixed, i))
                for i, it in enumerate(response.items)
            ],
            model_version=serving.version,
            index_version=self.first_stage.version,
            explored=explored,
            challenger_version=challenger.version if mixed and challenger else None,
            api_key=origin.api_key,
        )
        if self.publisher.publish_later(self.keys.impressions, response.request_id, impression):
            self.metrics.impressions.inc()  # handed to the buffer; it reaches the broker when the broker is there
        label = "hit" if hit else "miss"
        self.metrics.explored.inc(explored)
        self.metrics.requests.labels(label).inc()
        self.metrics.latency.labels(label).observe(time.perf_counter() - started)

    LIVE_MARGIN = 10
    """Rows ranked beyond `k`, so an answer still has `k` when a few were deleted since the ranking."""

    def _ranked(self, serving: Serving, req: RankRequest, conditions: list[Condition] | None) -> tuple[list[list], bool]:
        """One model's top `req.k` (and a margin) as [doc, score] rows, from the results cache when it has them."""
        key = self.keys.results(self.first_stage.version, serving.version, req.k, request_key(req.query, conditions))
        items = self._cache_get(key)
        if items is not None:
            return items, True
        # the reranker embeds the query on another core while the first stage retrieves: a miss
        # costs about one query encoding more than a first-stage miss's wall time, not two
        embedding = self._query_encoder.submit(serving.reranker.embed_query, req.query) if serving.reranker else None
        candidates = self.candidates(req.query, conditions)
        ranking = rank(
            req.query,
            candidates,
            serving.reranker,
            self.first_stage.text,
            self.s.serving.rerank_depth,
            query_embedding=embedding.result() if embedding else None,
        )
        items = [[doc, score] for doc, score in ranking[: req.k + self.LIVE_MARGIN]]
        self._cache_set(key, items)
        return items, False

    # ---- the application's own candidates -------------------------------------------------
    def rerank(self, req: RerankRequest, api_key: str | None = None, client: str | None = None) -> RankResponse:
        """The application's candidates in the served model's order, recorded as an impression like
        a /rank answer. Inline candidates' texts are kept in the document store (not indexed), so
        the training that learns from this answer's clicks reads them. Unknown ids are a 422."""
        started = time.perf_counter()
        origin = self.origin(req, api_key, client)
        serving = self.serving
        inline = {c.id: c for c in req.candidates if isinstance(c, InlineCandidate)}
        ids = list(dict.fromkeys(c if isinstance(c, str) else c.id for c in req.candidates))
        indexed = [d for d in ids if d not in inline]
        live = self.first_stage.live(ids)  # one read for both checks
        clash = set(inline) & set(live)
        if clash:
            raise InvalidInput(f"inline candidates with ids of indexed documents (send the id alone): {_some(clash)}")
        unknown = set(indexed) - set(live)
        if unknown:
            raise InvalidInput(f"candidates not in the index (send them inline with their text): {_some(unknown)}")
        if inline:
            self.first_stage.store.keep_inline([(c.id, c.title, _content(c)) for c in inline.values()])
        text = self.first_stage.text
        embedding = self._query_encoder.submit(serving.reranker.embed_query, req.query) if serving.reranker else None
        candidates = self.first_stage.score(req.query, ids, text, self.caches.embeddings)
        ranking = rank(
            req.query,
            candidates,
            serving.reranker,
            text,
            len(candidates),
            query_embedding=embedding.result() if embedding else None,
        )
        items = [[d, sc] for d, sc in ranking]
        response = self._respond(serving, items, req.top_n or len(items), req.fields, inline)
        self._record(req.query, origin, response, serving, False, None, None, started, False)
        return response

    # ---- documents -----------------------------------------------------------------------
    def upsert_documents(self, raw: list, actor: str) -> DocumentsResponse:
        """Validates each document on its own and stores the valid ones in one transaction, on disk
        before the answer (so "stored" survives a kill -9); the indexer makes them searchable."""
        store = self.first_stage.store
        declared, refused, valid = store.declared(), [], []
        for i, doc in enumerate(raw):
            try:
                valid.append((i, check_document(doc, declared, DIM)))
            except ValueError as e:
                doc_id = doc.get("id") if isinstance(doc, dict) and is_printable_id(doc.get("id")) else None
                refused.append(DocumentRefusal(index=i, id=doc_id, detail=str(e)))
        stored, older, seq = store.upsert([d for _, d in valid], actor) if valid else ([], [], store.head())
        refused += [DocumentRefusal(index=valid[j][0], id=valid[j][1].id, detail=reason) for j, reason in older]
        self.corpus_changed.set()
        return DocumentsResponse(stored=stored, refused=sorted(refused, key=lambda r: r.index), generation=seq)

    def delete_documents(self, ids: list[str], actor: str) -> DeletedResponse:
        """Tombstones the documents in one transaction, on disk before the answer: from then on no
        answer of any worker shows them (`_respond` checks the store)."""
        deleted, missing, seq = self.first_stage.store.delete(ids, actor)
        self.corpus_changed.set()
        return DeletedResponse(deleted=deleted, missing=missing, generation=seq)

    def _encode_documents(self, texts: list[str]) -> np.ndarray:
        return encode(self.first_stage.encoder, texts)

    def watch_corpus(self) -> None:
        """Catches this worker up with the store every `corpus.refresh_s`; the worker holding the
        indexer's lease (one per machine, taken over when its holder dies) also applies changes to
        BM25 and encodes documents that came without a vector."""
        lease = Lease(self.first_stage.folder / LEASE_FILE)
        indexer: Indexer | None = None
        while not self._stop.is_set():
            try:
                if indexer is None and lease.acquire():
                    indexer = Indexer(
                        self.first_stage.store, self.first_stage.bm25, self._encode_documents, ann=self.s.corpus.ann()
                    )
                    log.info("this worker indexes document changes (pid %s)", os.getpid())
                if indexer is not None:
                    if self.documents_feed is not None:
                        self.documents_feed.poll()
                    indexer.catch_up()
                    indexer.snapshot_in_background()
                self.first_stage.refresh()
            except Exception:  # the store or the index is unreadable for a moment: tried again next round
                log.exception("catching up with document changes failed")
            self.corpus_changed.wait(self.s.corpus.refresh_s)
            self.corpus_changed.clear()
        lease.release()
        if self.documents_feed is not None:
            self.documents_feed.close()

    def _cache_get(self, key: str) -> Any | None:
        try:
            value = self.caches.ranking.get(key)
        except DependencyUnavailable as e:
            self._cache_failed(e)
            return None
        self._cache_ok()
        return value

    def _cache_set(self, key: str, value: Any) -> None:
        try:
            self.caches.ranking.set(key, value)
        except DependencyUnavailable as e:
            self._cache_failed(e)

    def _cache_failed(self, e: Exception) -> None:
        """Counted every time, logged once per outage."""
        self.metrics.cache_errors.inc()
        if not self._cache_down:
            self._cache_down = True
            log.warning("rank cache unavailable, serving without it: %s", e)

    def _cache_ok(self) -> None:
        if self._cache_down:
            self._cache_down = False
            log.info("rank cache is back")

    def _publish(self, topic: str, key: str, event: BaseModel) -> Future | None:
        future = self.publisher.publish(topic, key, event)
        if future is None:
            self.metrics.publish_failures.labels(topic).inc()
        else:
            future.add_done_callback(lambda f: self.metrics.publish_failures.labels(topic).inc() if f.exception() else None)
        return future

    # ---- event intake --------------------------------------------------------------------
    def ingest(self, events: list, api_key: str | None = None, client: str | None = None) -> tuple[list[str], list[Rejection]]:
        """Validates each event on its own; valid ones are written to the broker (acks=all) before
        the answer, so "accepted" means durable. Duplicates (in the batch or seen before) are rejected;
        an event that was not recorded is forgotten by de-duplication, so a retry is accepted.

        Raises DependencyUnavailable, with the reason, when nothing valid can be recorded (the broker
        is down, or Redis is and de-duplication cannot run): the app answers 503 and the client retries."""
        if not self.publisher.healthy:
            raise DependencyUnavailable(f"events cannot be recorded now: Kafka unavailable ({self.publisher.last_error})")
        rejected: list[Rejection] = []
        valid: list[tuple[int, InteractionEvent]] = []
        received = time.time()  # the server's clock: what windows and training slices go by
        for i, raw in enumerate(events):
            try:
                event = InteractionEvent.model_validate(raw).model_copy(
                    update={"received_at": received, "api_key": api_key, "client": client}
                )
                if ahead := event.future_dated():
                    rejected.append(Rejection(index=i, event_id=event.event_id, code=RejectCode.bad_timestamp, detail=ahead))
                    continue
                valid.append((i, event))
            except ValidationError as e:
                event_id = raw.get("event_id") if isinstance(raw, dict) else None
                rejected.append(
                    Rejection(
                        index=i,
                        event_id=event_id if is_printable_id(event_id) else None,
                        code=RejectCode.invalid_event,
                        detail=f"invalid event: {validation_detail(e)}",
                    )
                )
        fresh = self._first_sightings(valid, rejected)
        pending = [(i, ev, self._publish(self.keys.interactions, ev.request_id, ev)) for i, ev in fresh]
        deadline = time.time() + self.RECORD_TIMEOUT_S
        self.publisher.flush(timeout=self.RECORD_TIMEOUT_S)
        accepted, failed = [], []
        for i, ev, future in pending:
            try:
                if future is None:
                    raise RuntimeError("the producer refused the event")
                future.result(timeout=max(0.05, deadline - time.time()))
                accepted.append(ev.event_id)
            except Exception as e:  # any broker failure: this event was not recorded
                failed.append((i, ev, e))
        self._forget([ev for _, ev, _ in failed])
        self.metrics.events_accepted.inc(len(accepted))
        self.caches.activity.count({"events": len(accepted)})
        if failed and not accepted:
            self.metrics.events_rejected.labels(RejectCode.not_recorded.value).inc(len(failed))
            raise DependencyUnavailable(f"events cannot be recorded now: Kafka unavailable ({failed[0][2]})")
        rejected += [
            Rejection(
                index=i,
                event_id=ev.event_id,
                code=RejectCode.not_recorded,
                detail=f"not recorded: Kafka unavailable ({e}); retry it",
            )
            for i, ev, e in failed
        ]
        for r in rejected:
            self.metrics.events_rejected.labels(r.code.value).inc()
        rejected.sort(key=lambda r: r.index)
        return accepted, rejected

    RECORD_TIMEOUT_S = 5.0  # a healthy broker acknowledges in milliseconds

    def _first_sightings(
        self, valid: list[tuple[int, InteractionEvent]], rejected: list[Rejection]
    ) -> list[tuple[int, InteractionEvent]]:
        """The events not seen before (in this batch or earlier); the others are rejected as duplicates.
        All or nothing: if de-duplication fails midway, the ids marked so far are released again."""
        fresh: list[tuple[int, InteractionEvent]] = []
        batch: set[str] = set()
        try:
            for i, ev in valid:
                if ev.event_id in batch or not self.caches.seen.first_sighting(ev.event_id):
                    rejected.append(
                        Rejection(index=i, event_id=ev.event_id, code=RejectCode.duplicate_event, detail="duplicate event_id")
                    )
                    continue
                batch.add(ev.event_id)
                fresh.append((i, ev))
        except DependencyUnavailable:
            self._forget([ev for _, ev in fresh])
            raise
        return fresh

    def _forget(self, events: list[InteractionEvent]) -> None:
        for ev in events:
            try:
                self.caches.seen.forget(ev.event_id)
            except DependencyUnavailable as e:  # its marker expires with the TTL; a retry within it is refused
                log.error("could not release event id %s after a failed write: %s", ev.event_id, e)

    # ---- hot swap ------------------------------------------------------------------------
    def check_champion(self) -> bool:
        """Loads and swaps in the registry's champion if it differs from what is served."""
        with self._swap_lock:
            current = self.registry.champion()
            if current is None or current.version == self.serving.version:
                self.behind_since = None
                return False
            self.behind_since = self.behind_since or time.time()
            if time.time() < self.retry_after.get(current.version, 0.0):
                return False  # broken and nowhere to roll back to: tried again later, not every poll
            try:
                folder = self.registry.fetch(current)
            except Exception as e:  # the registry or its store is away: not the version's fault, retried next poll
                self.last_swap_error = f"version {current.version}: download failed: {e}"
                log.warning("could not download model version %s: %s", current.version, e)
                return False
            try:
                reranker = self.load_model(folder, current.version, self.caches.embeddings)
                started = time.time()
                reranker.warm(self.first_stage)  # computed here, before the swap, if the version has none
                rank("warm up", self.candidates("warm up")[:8], reranker, self.first_stage.text, 8)
                log.info("version %s warmed in %.1fs", current.version, time.time() - started)
            except Exception as e:  # a bad version must not take serving down
                self.metrics.swap_failures.inc()
                self.last_swap_error = f"version {current.version}: {e}"
                log.exception("failed to load model version %s; still serving %s", current.version, self.serving.version)
                self.load_failures[current.version] = self.load_failures.get(current.version, 0) + 1
                failures, limit = self.load_failures[current.version], self.s.serving.max_load_failures
                if failures >= limit:  # reported: the control plane rolls it back; meanwhile back off,
                    # doubling up to ten minutes (a fixed file is picked up)
                    backoff = min(600.0, self.s.serving.champion_poll_s * 2 ** (failures - limit + 1))
                    self.retry_after[current.version] = time.time() + backoff
                return False
            self.serving = Serving(current.version, reranker, time.time())
            self.behind_since = None
            self._prune(current.version)
            self.metrics.swaps.inc()
            self.metrics.serving(current.version)
            log.info("hot-swapped to model version %s", current.version)
            return True

    def check_challenger(self) -> None:
        """Loads the challenger nominated for interleaving (off the request path, warmed like a
        champion), and lets it go once the scheduler promoted or withdrew it."""
        if self.s.interleave.share <= 0:
            return
        version = self.registry.challenger()
        mv = self.registry.get(version) if version else None
        if mv is None or mv.tags.get(STAGE_TAG) != INTERLEAVING or mv.version == self.serving.version:
            if self.challenger is not None:
                log.info("interleaving with version %s ended", self.challenger.version)
            self.challenger = None
            return
        if self.challenger is not None and self.challenger.version == mv.version:
            return
        try:
            reranker = self.load_model(self.registry.fetch(mv), mv.version, self.caches.embeddings)
            reranker.warm(self.first_stage)
            rank("warm up", self.candidates("warm up")[:8], reranker, self.first_stage.text, 8)
        except Exception:  # a challenger that cannot load is not interleaved; the champion serves on
            self.metrics.swap_failures.inc()
            log.exception("failed to load challenger version %s; not interleaving", mv.version)
            return
        self.challenger = Serving(mv.version, reranker, time.time())
        log.info(
            "interleaving version %s with %s on %.0f%% of requests",
            mv.version,
            self.serving.version,
            100 * self.s.interleave.share,
        )

    def readiness(self) -> tuple[bool, str | None]:
        """Ready once the registry was asked what to serve and the served version is the champion, or
        has differed from it for less than `serving.swap_grace_s` (a swap takes seconds)."""
        if self.index_problem:
            return False, self.index_problem
        if not self.champion_checked:
            return False, "starting: the registry was not asked yet which model to serve"
        if self.behind_since is not None and time.time() - self.behind_since > self.s.serving.swap_grace_s:
            behind = time.time() - self.behind_since
            return (
                False,
                f"serving {self.serving.version}, not the registry's champion, for {behind:.0f}s: "
                f"{self.last_swap_error or 'the champion is still loading'}",
            )
        return True, None

    def _prune(self, serving: str) -> None:
        """Keeps the local copies of the served version and the one a rollback would bring back."""
        try:
            keep = {serving, self.registry.previous(), self.registry.challenger()}
            removed = self.registry.prune({v for v in keep if v})
        except Exception as e:  # housekeeping must never fail a swap
            log.warning("could not prune old model versions: %s", e)
            return
        if removed:
            log.info("removed local copies of model versions %s", ", ".join(removed))

    def status(self) -> str:
        """ready, broken (the index failed its self-check), starting or behind (as /health/ready says)."""
        if self.readiness()[0]:
            return "ready"
        return "broken" if self.index_problem else "starting" if not self.champion_checked else "behind"

    def report(self) -> WorkerReport:
        """What this worker tells the control plane at every poll."""
        return WorkerReport(
            worker=self.name,
            model_version=self.serving.version,
            index_version=self.first_stage.version,
            status=self.status(),
            detail=self.readiness()[1],
            last_swap_error=self.last_swap_error,
            load_failures=dict(self.load_failures),
            at=time.time(),
        )

    def watch_registry(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_champion()
                self.check_challenger()
            except Exception:  # MLflow away: keep serving what is loaded, swap when it is back
                log.exception("champion check failed")
            self.champion_checked = True
            self.caches.fleet.report(self.report())
            self._wake.wait(self.s.serving.champion_poll_s)
            self._wake.clear()

    def wake(self) -> None:
        """Check the registry now (a model event arrived)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._query_encoder.shutdown(wait=False)
        self.publisher.close(timeout=5)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


def interleaved(
    champion: list[list], challenger: list[list], k: int, rng: random.Random, method: InterleaveMethod
) -> tuple[list[list], Interleaved]:
    """Interleaving of two [doc, score] lists: the rows shown, and what a like on each earns whom. A row
    keeps the score of the model its credit goes to (scores of two models are not comparable); a row
    that earns nothing the champion's."""
    mixed = interleave([d for d, _ in champion], [d for d, _ in challenger], k, rng, method)
    score = {"challenger": dict(map(tuple, challenger)), "champion": dict(map(tuple, champion))}
    either = {**score["challenger"], **score["champion"]}  # no credit: the champion's score where it has one
    return [[d, score[t][d] if t else either[d]] for d, t in zip(mixed.doc_ids, mixed.teams)], mixed


def request_key(query: str, conditions: list[Condition] | None) -> str:
    """What a cached ranking is keyed by: the query's normal form and the filters it was cut by."""
    if not conditions:
        return query_key(query)
    filters = json.dumps([c.model_dump(exclude_none=True) for c in conditions], sort_keys=True)
    return f"{query_key(query)}:{hashlib.sha1(filters.encode()).hexdigest()[:12]}"


def _some(ids: set[str]) -> str:
    return ", ".join(sorted(ids)[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def _content(c: InlineCandidate) -> str:
    title, text = c.title.strip(), c.text.strip()
    return f"{title}. {text}" if title else text


def _credited(mixed: Interleaved | None, i: int) -> dict:
    """An impression row's interleaving fields (none when the request was not interleaved)."""
    return {} if mixed is None else {"credit": mixed.credits[i], "team": mixed.teams[i]}


def explore(items: list, rng: random.Random, rate: float, depth: int) -> tuple[list, bool]:
    """With probability `rate`, the top `depth` items in a uniformly random order (RandTop-n,
    Joachims et al. 2017): the same documents at many positions is what lets the examination curve be
    estimated from our own clicks. The rest of the list, and every item's score, is unchanged."""
    if rate <= 0 or len(items) < 2 or rng.random() >= rate:
        return items, False
    head = items[:depth]
    rng.shuffle(head)
    return head + items[depth:], True
