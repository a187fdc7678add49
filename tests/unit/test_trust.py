"""Feedback many cheap identities cannot steer: signed users, sources that saturate, new-identity limits,
holds on anomalous (query, doc) pairs, and a gate that does not believe what nobody vouches for."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from schemas import ImpressionEvent, InteractionEvent, LabelledExample, ShownItem
from schemas.trust import BadToken, network_prefix, sign_user, verify_user
from services.auth import UserSecret
from services.config import AuthSettings, ServingSettings, Settings
from services.serve.app import create_app
from services.serve.worker import Worker
from services.storage.memory import MemoryLabelStore, MemoryPublisher, memory_caches
from services.stream.anomaly import PositiveRates
from training.config import GateConfig, TrainConfig
from training.gate import carried_by_one, decide, unsupported_rises
from training.labels.feedback import aggregate, sources_of_query, trusted_sources
from training.labels.rules import DEFAULT_EXAMINATION, LabelRules, label_request, source_of
from training.labels.store import Hold, hold_id
from training.registry import MemoryRegistry
from training.slices import make_slices

SECRET = "s3cret"


# ---- signed user tokens and networks ---------------------------------------------------------
def test_a_user_token_verifies_only_with_its_secret_and_before_it_expires():
    token = sign_user(SECRET, "u-42.with.dots", ttl_s=60, now=1000.0)
    assert verify_user(SECRET, token, now=1030.0) == "u-42.with.dots"
    with pytest.raises(BadToken, match="signature"):
        verify_user("another secret", token, now=1030.0)
    with pytest.raises(BadToken, match="expired"):
        verify_user(SECRET, token, now=2000.0)
    forged = token.replace(token.split(".")[1], sign_user(SECRET, "admin").split(".")[1])
    with pytest.raises(BadToken, match="signature"):
        verify_user(SECRET, forged, now=1030.0)
    with pytest.raises(BadToken, match="rl1"):
        verify_user(SECRET, "u-42", now=1030.0)


def test_addresses_of_one_network_are_one_source():
    assert network_prefix("203.0.113.7") == network_prefix("203.0.113.250") == "203.0.113.0/24"
    assert network_prefix("203.0.114.7") != network_prefix("203.0.113.7")
    assert network_prefix("2001:db8:1:2::7") == "2001:db8:1::/48"
    assert network_prefix("::ffff:203.0.113.9") == "203.0.113.0/24"
    assert network_prefix("testclient") is None and network_prefix(None) is None


def serving(tmp_path, tiny_first_stage, **auth) -> tuple[Worker, TestClient]:
    s = Settings(state_dir=tmp_path, serving=ServingSettings(explore_rate=0.0), auth=AuthSettings(**auth))
    worker = Worker(s, tiny_first_stage, memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))
    return worker, TestClient(create_app(s, worker, watch_events=False))


def test_rank_records_a_signed_user_as_verified_and_refuses_a_bad_token(tiny_first_stage, tmp_path):
    worker, client = serving(tmp_path, tiny_first_stage)
    secret = UserSecret(tmp_path / "user_secret").ensure()
    with client:
        signed = client.post("/rank", json={"query": "vitamin d", "user_token": sign_user(secret, "u-1")})
        assert signed.status_code == 200
        assert client.post("/rank", json={"query": "vitamin d", "user": "u-2"}).status_code == 200
        bad = client.post("/rank", json={"query": "vitamin d", "user": "u-1", "user_token": sign_user("guess", "u-1")})
        other = client.post("/rank", json={"query": "vitamin d", "user": "u-3", "user_token": sign_user(secret, "u-1")})
    assert bad.status_code == 422 and "signature" in bad.json()["detail"]
    assert other.status_code == 422 and "another user" in other.json()["detail"]
    shown = [json.loads(m) for m in worker.publisher.on(worker.keys.impressions)]
    assert [(m["user"], m["user_verified"]) for m in shown] == [("u-1", True), ("u-2", False)]


def test_new_unsigned_identities_are_limited_per_minute_and_signed_users_are_not(tiny_first_stage, tmp_path):
    _, client = serving(tmp_path, tiny_first_stage, new_identities_per_min=2)
    secret = UserSecret(tmp_path / "user_secret").ensure()
    with client:
        codes = [client.post("/rank", json={"query": "vitamin d", "user": f"bot-{i}"}).status_code for i in range(3)]
        again = client.post("/rank", json={"query": "vitamin d", "user": "bot-0"})  # known: not new
        refused = client.post("/rank", json={"query": "vitamin d", "session": "fresh"})
        signed = [
            client.post("/rank", json={"query": "q", "user_token": sign_user(secret, f"p-{i}")}).status_code for i in range(5)
        ]
    assert codes == [200, 200, 429] and again.status_code == 200
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1 and "sign" in refused.json()["detail"]
    assert signed == [200] * 5


# ---- sources on labels, and what they add up to ---------------------------------------------------
def shown(request_id: str, user: str, verified: bool = False, client: str | None = "198.51.100.0/24", query: str = "q"):
    items = [ShownItem(doc_id=f"d{i}", position=i, score=1.0 / i) for i in range(1, 21)]
    return ImpressionEvent(
        request_id=request_id,
        query=query,
        user=user,
        items=items,
        model_version="first-stage",
        index_version="v1",
        user_verified=verified,
        client=client,
        timestamp=1000.0,
    )


def click(request_id: str, doc: str, n: int = 0) -> InteractionEvent:
    return InteractionEvent(event_id=f"{request_id}-{n}", request_id=request_id, doc_id=doc, type="click", timestamp=1001.0)


def labels_of(imp: ImpressionEvent, doc: str) -> list[LabelledExample]:
    return list(label_request(imp, [click(imp.request_id, doc)], LabelRules(infer_skips_above_click=False)).values())


def test_a_signed_user_is_its_own_source_and_anyone_else_is_their_network():
    assert source_of(shown("r1", "u-1", verified=True), []) == ("user:u-1", True)
    assert source_of(shown("r2", "u-1"), []) == ("net:198.51.100.0/24", False)
    ev = click("r2", "d3").model_copy(update={"client": "192.0.2.0/24"})
    assert source_of(shown("r2", "u-1"), [ev]) == ("net:192.0.2.0/24", False)  # where the click came from
    assert source_of(shown("r3", "u-1", client=None), []) == (None, None)  # not assessed: counts as before


def frame_of(labels: list[LabelledExample]) -> pd.DataFrame:
    return pd.DataFrame([lab.model_dump() for lab in labels])


def test_many_ids_from_one_network_saturate_at_one_sources_say_and_signed_users_add_up():
    minted = [lab for i in range(500) for lab in labels_of(shown(f"a{i}", f"bot-{i}"), "d15")]
    people = [lab for i in range(3) for lab in labels_of(shown(f"p{i}", f"u-{i}", verified=True), "d2")]
    evidence = aggregate(frame_of(minted + people), unverified_weight=0.5)["q"].evidence
    assert evidence["d15"] == pytest.approx(2.0 * 0.5 * 1.0 / 1.0)  # 500 ids, one network: one capped, discounted say
    assert evidence["d2"] == pytest.approx(3 * 1.0)  # three signed users: three says
    support = trusted_sources(frame_of(minted + people))
    assert len(support["q"]["d2"]) == 3 and "d15" not in support["q"]
    assert sources_of_query(support, "Q") == 3


def test_labels_from_before_sources_count_per_identity_as_they_did():
    old = [
        lab.model_copy(update={"source": None, "trusted": None})
        for i in range(3)
        for lab in labels_of(shown(f"o{i}", f"u-{i}"), "d4")
    ]
    assert aggregate(frame_of(old), unverified_weight=0.1)["q"].evidence["d4"] == pytest.approx(3.0)
    assert len(trusted_sources(frame_of(old))["q"]["d4"]) == 3


# ---- anomalous (query, doc) pairs are held -------------------------------------------------------
def rates() -> PositiveRates:
    return PositiveRates(window_s=3600, ratio=5.0, min_positives=20, min_identities=5, examination=DEFAULT_EXAMINATION)


def test_a_burst_of_clicks_on_a_low_document_from_many_new_ids_is_held():
    watch, holds = rates(), []
    for i in range(200):  # real traffic: top results clicked now and then
        imp = shown(f"u{i}", f"user-{i}", verified=True)
        watch.shown(imp, 1000.0 + i)
        if i % 3 == 0:
            assert watch.positive(imp, click(imp.request_id, "d1"), 1000.0 + i) is None
    for i in range(100):  # 100 ids, one click each, on the 15th result
        imp = shown(f"a{i}", f"bot-{i}")
        watch.shown(imp, 1300.0 + i)
        if hold := watch.positive(imp, click(imp.request_id, "d15"), 1300.0 + i):
            holds.append(hold)
    [hold] = holds
    assert (hold.query, hold.doc_id) == ("q", "d15") and "unsigned identities" in hold.reason
    assert hold.since <= 1300.0


def test_the_same_clicks_from_signed_users_or_at_the_top_are_not_held():
    signed, top = rates(), rates()
    for i in range(60):
        imp = shown(f"s{i}", f"user-{i}", verified=True)
        signed.shown(imp, 1000.0 + i)
        assert signed.positive(imp, click(imp.request_id, "d15"), 1000.0 + i) is None
        anon = shown(f"t{i}", f"anon-{i}")
        top.shown(anon, 1000.0 + i)
        if i % 2 == 0:  # half of all users click the first result: what a first result gets
            assert top.positive(anon, click(anon.request_id, "d1"), 1000.0 + i) is None


def test_held_labels_leave_training_until_released_and_a_purged_hold_stays_out():
    rules = LabelRules()  # a click at 15th implies skips of the 14 documents above it
    fake = [lab for i in range(5) for lab in label_request(shown(f"a{i}", f"bot-{i}"), [click(f"a{i}", "d15")], rules).values()]
    person = list(label_request(shown("p1", "u-1", verified=True), [click("p1", "d2")], rules).values())
    store = MemoryLabelStore(fake + person)
    hold = Hold(hold_id=hold_id("q", "d15", 900.0), query="q", doc_id="d15", since=900.0, reason="test", actor="stream", at=1.0)
    store.hold(hold)
    df, lineage = store.read()
    assert set(df["request_id"]) == {"p1"} and lineage["held"] == len(fake)  # the signed user's labels train on
    store.hold(hold.model_copy(update={"status": "released", "decided_by": "cli:ops", "decided_at": 2.0}))
    assert len(store.read()[0]) == len(fake) + len(person)
    store.purge(hold.as_purge("cli:ops", "fake", 2.0), count=False)
    assert "d15" not in set(store.read()[0]["doc_id"])


# ---- a gate the attacker cannot grade -------------------------------------------------------------
def test_a_gain_carried_by_one_query_is_refused():
    champion = {f"q{i}": 0.5 for i in range(40)}
    lifted = {**champion, "q0": 1.0, "q1": 0.52}
    result = decide(champion, lifted, margin=0.005, p_max=1.0, min_queries=30, max_query_share=0.5)
    assert not result.passed and "rests on one query" in result.reason and "'q0'" in result.reason
    assert carried_by_one(["a", "b"], pd.Series([0.1, 0.1]).to_numpy(), 0.5) is None


def test_held_out_queries_without_signed_users_do_not_count_in_the_verdict():
    minted = [lab for i in range(300) for lab in labels_of(shown(f"a{i}", f"bot-{i}", query=f"attacked {i % 5}"), "d15")]
    people = [
        lab for i in range(300) for lab in labels_of(shown(f"p{i}", f"u-{i}", verified=True, query=f"asked {i % 40}"), "d2")
    ]
    df = frame_of(people + minted)  # the attack's requests are the newest: most of the gate's slice
    slices = make_slices(df, {}, TrainConfig(), GateConfig(fraction=0.6, min_trusted_sources=1), LabelRules())
    assert slices.gate and all(fb.query.startswith("asked") for fb in slices.gate)
    assert all(fb.query.startswith("asked") for _, fb in slices.gate_requests)
    assert slices.untrusted_gate_queries == 5


def test_the_served_memory_holds_the_held_out_slices_the_measured_one_does_not():
    """Tuning and the gate measure a challenger with the train slice's memory; once measured it serves
    with every label's, so the newest feedback (the tune and gate slices) reaches users at promotion."""
    people = [
        lab.model_copy(update={"timestamp": 1000.0 + i})
        for i in range(200)
        for lab in labels_of(shown(f"p{i}", f"u-{i}", verified=True, query=f"asked {i // 10}"), "d2")
    ]  # queries asked in turn: the last ones only in the newest labels, the held-out slices
    slices = make_slices(frame_of(people), {}, TrainConfig(), GateConfig(fraction=0.2, tune_fraction=0.1), LabelRules())
    held_out = {fb.query for fb in slices.tune + slices.gate}
    assert held_out and not held_out & set(slices.memory())
    assert set(slices.served_memory()) == set(slices.memory()) | held_out
    assert all(slices.served_memory()[q]["d2"] > 0 for q in held_out)


def test_a_document_lifted_by_feedback_nobody_vouches_for_is_refused_and_one_signed_user_is_enough(tiny_first_stage, tiny_model):
    from training.ranking.rank import candidates_for, rank
    from training.ranking.reranker import Reranker

    query = "does vitamin d prevent fractures"  # the tiny model's memory lifts d7 on it
    cands = candidates_for(tiny_first_stage, [query])
    before = [d for d, _ in rank(query, cands[query], None, tiny_first_stage.text, 50)]
    challenger = Reranker(tiny_model, "2").warm(tiny_first_stage)
    after = [d for d, _ in rank(query, cands[query], challenger, tiny_first_stage.text, 50)]
    rise = before.index("d7") - after.index("d7")
    assert rise >= 2, (before, after)
    gate = GateConfig(max_unsupported_rise=rise - 1, rise_sources=1)

    def slices_of(verified: bool):
        imp = shown("r1", "u-1", verified=verified, query=query).model_copy(
            update={"items": [ShownItem(doc_id=d, position=i + 1, score=0.0) for i, d in enumerate(before)]}
        )
        return make_slices(frame_of(labels_of(imp, "d7")), {}, TrainConfig(), gate, LabelRules())

    [found] = unsupported_rises(None, challenger, slices_of(False), cands, tiny_first_stage.text, 50, gate)
    assert (found.doc_id, found.signed_sources) == ("d7", 0) and "rose from" in str(found)
    assert unsupported_rises(None, challenger, slices_of(True), cands, tiny_first_stage.text, 50, gate) == []
