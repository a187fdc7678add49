"""API keys: hashed at rest, scoped per route, revocable without a restart; open only when no key exists."""

from __future__ import annotations

import random

import pytest
from fastapi.testclient import TestClient

from schemas import DeadLetter
from services.auth import KeyStore, Scope
from services.config import AuthSettings, ServingSettings, Settings
from services.serve.app import create_app
from services.serve.worker import Worker
from services.storage.memory import MemoryDeadLetterLog, MemoryPublisher, memory_caches
from tests.factories import control_plane, promotions_on
from training.registry import MemoryRegistry

EVENT = {"event_id": "e1", "request_id": "r1", "doc_id": "d1", "type": "click"}


def make_client(tiny_first_stage, tmp_path, **auth) -> TestClient:
    s = Settings(state_dir=tmp_path, serving=ServingSettings(explore_rate=0.0), auth=AuthSettings(**auth))
    worker = Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))
    return TestClient(create_app(s, worker, watch_events=False))


@pytest.fixture()
def store(tmp_path) -> KeyStore:
    return KeyStore(tmp_path / "api_keys.json")


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_without_keys_the_server_is_open_and_says_so(tiny_first_stage, tmp_path):
    with make_client(tiny_first_stage, tmp_path) as client:
        assert client.post("/rank", json={"query": "vitamin d"}).status_code == 200
        assert client.get("/health/ready").json()["auth"] == "open"


def test_required_auth_refuses_everything_while_no_key_exists(tiny_first_stage, tmp_path):
    with make_client(tiny_first_stage, tmp_path, required=True) as client:
        r = client.post("/rank", json={"query": "vitamin d"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert client.get("/health/live").status_code == 200  # probes stay open


def test_each_route_needs_its_scope(tiny_first_stage, tmp_path, store):
    _, ranker = store.create("web", [Scope.rank])
    _, emitter = store.create("events", [Scope.events_write])
    _, admin = store.create("ops", [Scope.admin])
    with make_client(tiny_first_stage, tmp_path) as client:
        assert client.get("/health/ready").json()["auth"] == "keys"
        assert client.post("/rank", json={"query": "vitamin d"}).status_code == 401
        assert client.post("/rank", json={"query": "vitamin d"}, headers=bearer("rk_guessed")).status_code == 401
        r = client.post("/rank", json={"query": "vitamin d"}, headers=bearer(emitter))
        assert r.status_code == 403 and "'rank'" in r.json()["detail"]
        assert client.post("/rank", json={"query": "vitamin d"}, headers=bearer(ranker)).status_code == 200
        assert client.post("/events", json=[EVENT], headers=bearer(ranker)).status_code == 403
        assert client.post("/events", json=[EVENT], headers=bearer(emitter)).status_code != 403
        assert client.get("/model", headers=bearer(admin)).status_code == 200


def test_a_revoked_key_is_refused_without_a_restart(tiny_first_stage, tmp_path, store):
    _, secret = store.create("web", [Scope.rank])
    with make_client(tiny_first_stage, tmp_path) as client:
        assert client.post("/rank", json={"query": "vitamin d"}, headers=bearer(secret)).status_code == 200
        store.revoke("web")
        assert client.post("/rank", json={"query": "vitamin d"}, headers=bearer(secret)).status_code == 401


def test_secrets_are_stored_only_as_hashes(store):
    _, secret = store.create("web", [Scope.rank])
    text = store.path.read_text()
    assert secret not in text and secret[3:] not in text
    assert store.verify(secret).name == "web" and store.verify(secret + "x") is None


def test_metrics_can_require_the_admin_scope(tiny_first_stage, tmp_path, store):
    _, ranker = store.create("web", [Scope.rank])
    with make_client(tiny_first_stage, tmp_path, metrics_public=False) as client:
        assert client.get("/metrics", headers=bearer(ranker)).status_code == 403
    with make_client(tiny_first_stage, tmp_path) as client:
        assert client.get("/metrics").status_code == 200


def test_revoking_the_last_key_does_not_open_the_server(tiny_first_stage, tmp_path, store):
    store.create("web", [Scope.rank])
    store.revoke("web")
    with make_client(tiny_first_stage, tmp_path) as client:
        assert client.post("/rank", json={"query": "vitamin d"}).status_code == 401


def control_client(tmp_path, registry: MemoryRegistry, publisher: MemoryPublisher | None = None) -> TestClient:
    """The control process's app (admin routes) on memory, its loops not started."""
    from services.control.app import create_app as create_control_app

    s = Settings(state_dir=tmp_path)
    return TestClient(create_control_app(s, control_plane(s, registry, publisher), run_loops=False))


def test_moving_the_model_needs_an_admin_key_even_on_an_open_process(tmp_path):
    with control_client(tmp_path, MemoryRegistry()) as client:
        r = client.post("/admin/rollback", json={"reason": "because"})
        assert r.status_code == 401 and "admin key" in r.json()["detail"]


def test_serving_replicas_have_no_admin_route_and_no_status_page(tiny_first_stage, tmp_path):
    with make_client(tiny_first_stage, tmp_path) as client:
        for path in ("/admin/promote", "/admin/rollback", "/admin/approve"):
            assert client.post(path, json={"version": "1", "reason": "x"}).status_code == 404
        assert client.get("/status").status_code == 404


def test_admin_moves_are_audited_and_announced(tiny_model, tmp_path, store):
    import json

    _, ranker = store.create("web", [Scope.rank])
    _, admin = store.create("ops", [Scope.admin])
    registry, publisher = MemoryRegistry(), MemoryPublisher()
    first, second = registry.add(tiny_model), registry.add(tiny_model)
    with control_client(tmp_path, registry, publisher) as client:
        body = {"version": first, "reason": "reviewed"}
        assert client.post("/admin/promote", json=body, headers=bearer(ranker)).status_code == 403
        r = client.post("/admin/promote", json=body, headers=bearer(admin))
        assert r.status_code == 200 and r.json()["actor"] == "key:ops"
        assert client.post("/admin/promote", json=body, headers=bearer(admin)).status_code == 409  # already champion
        assert client.post("/admin/promote", json={"version": "99", "reason": "x"}, headers=bearer(admin)).status_code == 404
        client.post("/admin/promote", json={"version": second, "reason": "newer"}, headers=bearer(admin))
        r = client.post("/admin/rollback", json={"reason": "complaints"}, headers=bearer(admin))
        assert r.status_code == 200 and r.json()["version"] == first
        assert client.post("/admin/rollback", json={"reason": "again"}, headers=bearer(admin)).status_code == 409
    assert registry.champion().version == first
    assert registry.tags[first]["promoted_by"] == "key:ops" and registry.tags[second]["rolled_back_by"] == "key:ops"
    events = [json.loads(p) for p in publisher.on(Settings().keys.model_events)]
    assert [e["action"] for e in events] == ["promoted", "promoted", "rolled_back"]


def test_approve_promotes_only_the_challenger_awaiting_approval(tiny_model, tmp_path, store):
    _, admin = store.create("ops", [Scope.admin])
    registry = MemoryRegistry()
    first, second = registry.add(tiny_model), registry.add(tiny_model)
    promotions_on(registry).nominate(second, "gate passed", actor="scheduler")
    with control_client(tmp_path, registry) as client:
        r = client.post("/admin/approve", json={"version": first, "reason": "looks fine"}, headers=bearer(admin))
        assert r.status_code == 409 and "not awaiting approval (the challenger is 2)" in r.json()["detail"]
        r = client.post("/admin/approve", json={"version": second, "reason": "looks fine"}, headers=bearer(admin))
        assert r.status_code == 200 and r.json()["reason"] == "approved: looks fine"
        assert client.post("/admin/approve", json={"version": second, "reason": "x"}, headers=bearer(admin)).status_code == 409
    assert registry.champion().version == second and registry.challenger() is None


def test_a_caller_over_its_rate_gets_429_with_retry_after_and_others_are_not_affected(tiny_first_stage, tmp_path, store):
    _, greedy = store.create("greedy", [Scope.rank])
    _, polite = store.create("polite", [Scope.rank])
    # a bucket of 4 that refills one every 20 s: a slow machine cannot refill it between the requests
    with make_client(tiny_first_stage, tmp_path, rank_per_s=0.05, burst_s=80.0) as client:
        codes = [client.post("/rank", json={"query": "vitamin d"}, headers=bearer(greedy)).status_code for _ in range(6)]
        assert codes[:4] == [200] * 4 and codes[4] == 429
        r = client.post("/rank", json={"query": "vitamin d"}, headers=bearer(greedy))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "rate limit" in r.json()["detail"]
        assert client.post("/rank", json={"query": "vitamin d"}, headers=bearer(polite)).status_code == 200


def test_impressions_and_events_carry_the_name_of_the_key_that_sent_them(tiny_first_stage, tmp_path, store):
    import json

    _, app_key = store.create("shop-web", [Scope.rank, Scope.events_write])
    s = Settings(state_dir=tmp_path, serving=ServingSettings(explore_rate=0.0))
    worker = Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))
    with TestClient(create_app(s, worker, watch_events=False)) as client:
        ranked = client.post("/rank", json={"query": "vitamin d"}, headers=bearer(app_key)).json()
        forged = {
            "event_id": "e1",
            "request_id": ranked["request_id"],
            "doc_id": "d1",
            "type": "click",
            "api_key": "someone-else",
        }
        assert client.post("/events", json=[forged], headers=bearer(app_key)).status_code == 200
    [shown] = worker.publisher.on(worker.keys.impressions)
    [event] = worker.publisher.on(worker.keys.interactions)
    assert json.loads(shown)["api_key"] == "shop-web" and json.loads(event)["api_key"] == "shop-web"


def test_an_emitter_reads_its_own_dead_letters_and_an_admin_reads_all(tiny_first_stage, tmp_path, store):
    import json

    _, web = store.create("web", [Scope.events_write])
    _, other = store.create("other", [Scope.events_write])
    _, admin = store.create("ops", [Scope.admin])
    s = Settings(state_dir=tmp_path, serving=ServingSettings(explore_rate=0.0))
    worker = Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))
    stream = MemoryPublisher()  # what the stream wrote to the dead-letter topic
    for i, (key, rid) in enumerate((("web", "r1"), ("web", "r2"), ("other", "r1"))):
        payload = json.dumps({"event_id": f"e{i}", "request_id": rid, "doc_id": "d", "type": "click", "api_key": key})
        dead = DeadLetter(source="rankloop.interactions", code="doc_not_shown", reason="x", payload=payload, timestamp=100.0 + i)
        stream.publish(s.keys.dead_letters, dead.source, dead)
    log = MemoryDeadLetterLog(stream, s.keys.dead_letters)
    with TestClient(create_app(s, worker, watch_events=False, dead_letters=log)) as client:
        mine = client.get("/dead-letters", headers=bearer(web)).json()
        assert [json.loads(d["payload"])["event_id"] for d in mine] == ["e1", "e0"]  # newest first, its own only
        assert len(client.get("/dead-letters", params={"request_id": "r1"}, headers=bearer(web)).json()) == 1
        assert len(client.get("/dead-letters", params={"request_id": "r1"}, headers=bearer(admin)).json()) == 2
        assert len(client.get("/dead-letters", params={"since": 101.5}, headers=bearer(admin)).json()) == 1
        assert client.get("/dead-letters", headers=bearer(other)).json()[0]["reason"] == "x"
        assert client.get("/dead-letters").status_code == 401


def test_schemas_are_served_and_cors_answers_only_configured_origins(tiny_first_stage, tmp_path):
    s = Settings(state_dir=tmp_path, serving=ServingSettings(explore_rate=0.0, cors_origins=["https://app.example.com"]))
    worker = Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))
    with TestClient(create_app(s, worker, watch_events=False)) as client:
        assert client.get("/schemas").json()["interaction"] == "/schemas/interaction"
        schema = client.get("/schemas/interaction").json()
        assert "event_id" in schema["required"] and schema["additionalProperties"] is False
        assert client.get("/schemas/nope").status_code == 404
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        ok = client.options("/events", headers={"Origin": "https://app.example.com", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example.com"
        other = client.options("/events", headers={"Origin": "https://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
