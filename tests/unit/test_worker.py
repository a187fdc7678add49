"""The serving worker on in-memory storage: ranking, intake and hot swap, without any infrastructure."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from schemas import FIRST_STAGE, DependencyUnavailable, ImpressionEvent, RankRequest
from services.config import ServingSettings, Settings
from services.serve.worker import Worker
from services.storage.memory import MemoryPublisher, memory_caches
from tests.factories import promotions_on
from training.ranking.rank import rank
from training.registry import MemoryRegistry

QUERY = "does vitamin D prevent fractures"


@pytest.fixture()
def worker(tiny_first_stage):
    s = Settings(serving=ServingSettings(explore_rate=0.0, rerank_depth=5, candidates_k=8))
    return Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))


def test_rank_serves_the_first_stage_and_records_the_impression(worker):
    res = worker.rank(RankRequest(query=QUERY, k=3))
    assert res.model_version == FIRST_STAGE and res.items[0].doc_id == "d1"
    assert [it.position for it in res.items] == [1, 2, 3]
    [payload] = worker.publisher.on(worker.keys.impressions)
    imp = ImpressionEvent.model_validate_json(payload)
    assert imp.request_id == res.request_id and [it.doc_id for it in imp.items] == [it.doc_id for it in res.items]


def test_second_identical_query_is_a_cache_hit(worker):
    worker.rank(RankRequest(query=QUERY, k=3))
    worker.rank(RankRequest(query="Does  VITAMIN d prevent fractures", k=3))
    assert worker.metrics.requests.labels("hit")._value.get() == 1


def test_ingest_accepts_rejects_and_deduplicates(worker):
    res = worker.rank(RankRequest(query=QUERY, k=3))
    good = {"event_id": "e1", "request_id": res.request_id, "doc_id": "d1", "type": "click"}
    accepted, rejected = worker.ingest([good, {"event_id": "e2", "type": "teleport"}, good])
    assert accepted == ["e1"]
    assert [(r.index, r.code.value) for r in rejected] == [(1, "invalid_event"), (2, "duplicate_event")]
    assert worker.metrics.events_rejected.labels("duplicate_event")._value.get() == 1
    assert json.loads(worker.publisher.on(worker.keys.interactions)[0])["event_id"] == "e1"


def test_an_event_the_broker_did_not_take_is_refused_and_can_be_retried(worker):
    worker.publisher.fail = True
    ev = {"event_id": "e9", "request_id": "r", "doc_id": "d1", "type": "click"}
    with pytest.raises(DependencyUnavailable, match="Kafka unavailable"):
        worker.ingest([ev])
    worker.publisher.fail = False
    assert worker.ingest([ev])[0] == ["e9"]  # de-duplication forgot the unrecorded event


def test_check_champion_swaps_to_the_promoted_version_and_ranks_with_it(worker, tiny_model, tiny_first_stage):
    registry = worker.registry
    assert not worker.check_champion()  # no champion yet: nothing to do
    version = registry.add(tiny_model)
    promotions_on(registry).promote(version, "test", "test")
    assert worker.check_champion() and worker.serving.version == version
    res = worker.rank(RankRequest(query=QUERY, k=8))
    assert res.model_version == version
    assert res.items[0].doc_id == "d7"  # the model's feedback memory lifted it over the first stage
    # serving shows exactly what the shared ranking function (used by training and evaluation) gives
    expected = rank(QUERY, tiny_first_stage.search(QUERY, 8), worker.serving.reranker, tiny_first_stage.text, 5)
    assert [it.doc_id for it in res.items] == [d for d, _ in expected]
    assert not worker.check_champion()  # already serving it


def test_a_version_that_fails_to_load_keeps_the_old_one_serving(worker, tmp_path):
    registry = worker.registry
    promotions_on(registry).promote(registry.add(tmp_path / "missing"), "broken", "test")
    assert not worker.check_champion()
    assert worker.serving.version == FIRST_STAGE and "version 1" in (worker.last_swap_error or "")
    assert worker.rank(RankRequest(query=QUERY, k=2)).model_version == FIRST_STAGE


def test_a_swap_is_warm_the_first_request_after_it_encodes_only_the_query(worker, tiny_model, monkeypatch):
    import training.ranking.reranker as reranker_module

    registry = worker.registry
    promotions_on(registry).promote(registry.add(tiny_model), "test", "test")
    assert worker.check_champion()
    assert worker.serving.reranker.doc_matrix is not None  # computed before the swap
    assert (tiny_model / reranker_module.doc_matrix_file(worker.first_stage.corpus_id)).exists()
    encoded: list[int] = []
    real = reranker_module.encode
    monkeypatch.setattr(
        reranker_module, "encode", lambda model, texts, *a, **k: (encoded.append(len(texts)), real(model, texts))[1]
    )
    worker.rank(RankRequest(query="coffee and the liver", k=5))
    assert encoded == [1]  # the query; every candidate document was a row of the matrix


def test_a_champion_the_workers_keep_failing_to_load_is_rolled_back_by_the_control_plane(worker, tiny_model, tmp_path):
    """The worker only reports its failed loads; the control plane's watch tags the version broken and
    moves the alias back (serving never moves an alias)."""
    from services.control.watch import ChampionWatch

    registry = worker.registry
    promotions = promotions_on(registry)
    watch = ChampionWatch(promotions, worker.caches.fleet, worker.s.serving.max_load_failures, report_age_s=60)
    good = registry.add(tiny_model)
    promotions.promote(good, "good", "test")
    assert worker.check_champion()
    broken = registry.add(tmp_path / "missing")
    promotions.promote(broken, "bad", "test")
    for attempt in range(worker.s.serving.max_load_failures):
        assert not worker.check_champion()
        worker.caches.fleet.report(worker.report())
        assert (watch.check() is None) == (attempt + 1 < worker.s.serving.max_load_failures)
    assert registry.champion().version == good and "failed to load 3 times" in registry.tags[broken]["broken"]
    assert worker.report().load_failures == {broken: 3} and registry.tags[broken]["rolled_back_by"] == "control"
    event = json.loads(promotions.publisher.on(worker.keys.model_events)[-1])
    assert event["action"] == "rolled_back" and event["version"] == good and "automatic" in event["reason"]
    assert worker.publisher.on(worker.keys.model_events) == []  # the worker itself announced nothing
    worker.champion_checked = True
    assert not worker.check_champion() and worker.readiness() == (True, None)  # serving the champion again


def test_a_broken_champion_with_nothing_to_roll_back_to_is_retried_with_back_off(worker, tiny_model, tmp_path, monkeypatch):
    registry = worker.registry
    missing = tmp_path / "missing"
    promotions_on(registry).promote(registry.add(missing), "broken, and nothing to roll back to", "test")
    attempts = []
    load = worker.load_model
    monkeypatch.setattr(worker, "load_model", lambda *a: attempts.append(1) or load(*a))
    for _ in range(worker.s.serving.max_load_failures + 5):
        assert not worker.check_champion()
    assert len(attempts) == worker.s.serving.max_load_failures  # then it waits, instead of failing every poll
    shutil.copytree(tiny_model, missing)  # someone fixes the files: picked up once the back-off has passed
    monkeypatch.setattr(worker, "retry_after", {})
    assert worker.check_champion() and worker.serving.version == "1"


def test_readiness_says_no_while_serving_is_behind_the_champion_beyond_the_grace(worker, tmp_path, monkeypatch):
    registry = worker.registry
    promotions_on(registry).promote(registry.add(tmp_path / "missing"), "broken, and nothing to roll back to", "test")
    worker.champion_checked = True
    assert not worker.check_champion()
    assert worker.readiness() == (True, None)  # a swap may take a moment
    monkeypatch.setattr(worker, "behind_since", worker.behind_since - worker.s.serving.swap_grace_s - 1)
    ready, why = worker.readiness()
    assert not ready and "not the registry's champion" in why and "version 1" in why


def test_intake_stamps_the_server_time_over_whatever_the_client_said(worker):
    import time

    before = time.time()
    accepted, _ = worker.ingest([{"event_id": "t1", "request_id": "r", "doc_id": "d1", "type": "click", "received_at": 1.0}])
    [payload] = worker.publisher.on(worker.keys.interactions)
    assert accepted == ["t1"] and json.loads(payload)["received_at"] >= before


def test_a_failed_download_is_retried_and_never_counts_toward_broken(worker, tiny_model, monkeypatch):
    """The registry's store being away is not the version's fault: no tag, no automatic rollback."""
    registry = worker.registry
    good, newer = registry.add(tiny_model), registry.add(tiny_model)
    promotions_on(registry).promote(good, "good", "test")
    assert worker.check_champion()
    promotions_on(registry).promote(newer, "newer", "test")
    fetch = registry.fetch
    monkeypatch.setattr(registry, "fetch", lambda v: (_ for _ in ()).throw(ConnectionError("artifact store down")))
    for _ in range(worker.s.serving.max_load_failures + 1):
        assert not worker.check_champion()
    assert registry.champion().version == newer and "broken" not in registry.tags.get(newer, {})
    assert "download failed" in worker.last_swap_error
    monkeypatch.setattr(registry, "fetch", fetch)
    assert worker.check_champion() and worker.serving.version == newer


def test_a_worker_on_a_broken_index_never_says_ready(worker, monkeypatch):
    monkeypatch.setattr(worker, "index_problem", "first-stage self-check failed: ...")
    worker.champion_checked = True
    assert worker.readiness() == (False, "first-stage self-check failed: ...")


def test_a_seeded_worker_explores_the_same_requests_the_same_way_whatever_their_order(tiny_first_stage):
    """Concurrent simulated users reach the server in any order: with `explore_seed` the shuffles must
    not depend on it, or a benchmark's labels differ run to run."""
    s = Settings(serving=ServingSettings(explore_rate=0.5, explore_depth=3, rerank_depth=5, candidates_k=8, explore_seed=7))
    requests = [RankRequest(query=QUERY, k=3, user=f"u{i}", session=f"s{i}") for i in range(30)]

    def orders(reqs):
        w = Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry())
        return {r.user: [it.doc_id for it in w.rank(r).items] for r in reqs}

    forward, backward = orders(requests), orders(list(reversed(requests)))
    assert forward == backward
    assert len({tuple(v) for v in forward.values()}) > 1  # some requests were explored


def test_a_challenger_nominated_for_interleaving_is_shown_interleaved_with_the_champion(tiny_first_stage, tiny_model):
    """The first stage is champion, the tiny model (its memory lifts d7) the challenger: with share 1
    every ranking mixes both, and the impression says what a like on each document earns whom."""
    from training.config import InterleaveConfig
    from training.interleave import INTERLEAVING, STAGE_TAG

    serving = ServingSettings(explore_rate=0.0, rerank_depth=8, candidates_k=8)
    s = Settings(serving=serving, interleave=InterleaveConfig(share=1.0))
    worker = Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))
    version = worker.registry.add(tiny_model)
    promotions_on(worker.registry).nominate(version, "passed the gate", "test")
    worker.check_challenger()
    assert worker.challenger is None  # nominated for a person's approval only: not interleaved
    worker.registry.tag(version, STAGE_TAG, INTERLEAVING)
    worker.check_challenger()
    assert worker.challenger is not None and worker.challenger.version == version
    teams_seen = set()
    for n in range(6):
        res = worker.rank(RankRequest(query=QUERY, k=4, session=f"s{n}"))
        assert res.model_version == FIRST_STAGE
        imp = ImpressionEvent.model_validate_json(worker.publisher.on(worker.keys.impressions)[-1])
        assert imp.challenger_version == version and not imp.explored
        teams = [it.team for it in imp.items]
        assert set(teams) <= {"champion", "challenger", None}  # None: a document both rank alike
        for it in imp.items:
            assert it.credit is not None and (it.team is None) == (it.credit == 0)
        teams_seen.add(teams[0])
        if "d7" in [it.doc_id for it in imp.items[:1]]:
            assert teams[0] == "challenger"  # only the challenger ranks d7 first
    assert teams_seen == {"champion", "challenger"}  # either model's first pick may lead: the plan draws
    promotions_on(worker.registry).withdraw(version, "no better", "test")
    worker.check_challenger()
    assert worker.challenger is None
    res = worker.rank(RankRequest(query=QUERY, k=4))
    assert ImpressionEvent.model_validate_json(worker.publisher.on(worker.keys.impressions)[-1]).challenger_version is None


def test_model_info_shows_a_served_versions_mix_with_its_fusion(tiny_first_stage, tiny_model, tmp_path):
    """A mix with the index's own fusion has bm25_weight null: /model must still answer (it was a 500)."""
    from fastapi.testclient import TestClient

    from services.serve.app import create_app

    s = Settings(state_dir=tmp_path, serving=ServingSettings(explore_rate=0.0))
    worker = Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))
    promotions_on(worker.registry).promote(worker.registry.add(tiny_model), "test", "test")
    assert worker.check_champion()
    with TestClient(create_app(s, worker, watch_events=False)) as client:
        r = client.get("/model")
    assert r.status_code == 200 and r.json()["mix"] == {"alpha": 0.5, "beta": 2.0, "tau": 0.5, "bm25_weight": None}


def test_an_interleaved_row_only_the_challenger_returns_keeps_the_challengers_score():
    """Rankings too different for a full optimized plan are filled below it with no credit, from the
    champion's list and then the challenger's: such a row has no champion score (it was a KeyError)."""
    from services.serve.worker import interleaved

    challenger = [["d3", 0.9], ["d1", 0.8], ["d2", 0.7], ["d0", 0.6], ["d5", 0.5], ["d4", 0.4]]
    for method in ("optimized", "team_draft"):
        rows, _ = interleaved([["d2", 1.0]], challenger, 3, random.Random(0), method)
        scores = dict(map(tuple, challenger)) | {"d2": 1.0}
        assert [s for _, s in rows] == [scores[d] for d, _ in rows] and len(rows) == 3
