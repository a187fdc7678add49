"""The stream processor's per-message logic, without a broker."""

import json

from services.stream.join import ClickBursts, step, sweep
from tests.factories import impression, interaction
from training.labels.rules import LabelRules

RULES, WINDOW = LabelRules(), 1800.0


def raw(ev):
    return ev.model_dump_json().encode()


def feed(messages, state=None, now=1020.0):
    labels, dead = [], []
    for kind, payload in messages:
        r = step(state, "topic", kind, payload, RULES, WINDOW, now)
        if r.state is not None:
            state = r.state
        labels += r.labels
        dead += r.dead
    return state, labels, dead


def test_impression_then_click_makes_labels():
    _state, labels, dead = feed([("impression", raw(impression())), ("interaction", raw(interaction("d2", "click")))])
    assert sorted((lab.doc_id, lab.grade) for lab in labels) == [("d1", -1), ("d2", 1)]
    assert dead == []


def test_interaction_before_its_impression_waits_then_is_labelled():
    _state, labels, _dead = feed([("interaction", raw(interaction("d1", "click"))), ("impression", raw(impression()))])
    assert [(lab.doc_id, lab.grade) for lab in labels] == [("d1", 1)]


def test_a_revision_names_one_content_whichever_order_the_two_topics_were_read_in():
    """A replay after a crash may interleave impressions and interactions unlike the first pass: a
    (label_id, revision) stored by one pass and emitted by the other must be the same label."""
    shown = ("impression", raw(impression()))
    clicks = [("interaction", raw(interaction(doc, "click", event_id=f"e{doc}"))) for doc in ("d3", "d1")]

    def contents(messages):
        _state, labels, _dead = feed(messages)
        return {(lab.label_id, lab.revision): (lab.grade, lab.signals) for lab in labels}

    first_pass, replay = contents([shown, *clicks]), contents([*clicks, shown])
    assert ("r1:d1", 1) in first_pass and first_pass[("r1:d1", 1)][0] == -1  # a skip above the first click, then
    assert replay and all(first_pass.get(key, content) == content for key, content in replay.items())


def test_a_redelivered_message_is_recognised_not_dead_lettered_as_a_duplicate():
    """After a stream restart the broker redelivers what was applied but not committed."""
    shown, click = raw(impression()), raw(interaction("d1", "click", event_id="same"))
    _state, labels, dead = feed([("impression", shown), ("interaction", click), ("interaction", click), ("impression", shown)])
    assert len(labels) == 1 and dead == []


def test_a_different_event_under_a_used_id_is_dead_lettered():
    first, other = interaction("d1", "click", event_id="same"), interaction("d2", "click", event_id="same")
    _state, labels, dead = feed([("impression", raw(impression())), ("interaction", raw(first)), ("interaction", raw(other))])
    assert [(d.code, d.reason) for d in dead] == [("duplicate_event", "duplicate event_id")]
    assert {lab.doc_id for lab in labels} == {"d1"}


def test_malformed_and_unknown_type_go_to_dead_letters_with_reason():
    _, labels, dead = feed(
        [
            ("impression", raw(impression())),
            ("interaction", b"{not json"),
            ("interaction", json.dumps({"event_id": "x", "request_id": "r1", "doc_id": "d1", "type": "teleport"}).encode()),
        ]
    )
    assert labels == []
    assert dead[0].reason.startswith("invalid event") and dead[0].payload == "{not json"
    assert "type" in dead[1].reason


def test_hostile_payloads_are_dead_lettered_not_raised():
    """The SDK's Kafka path reaches the join unchecked: a payload that raised here (JSON nested past
    Python's recursion limit did, with json.loads) would stop the worker on the same message forever."""
    hostile = [b"[" * 100_000, b"\xff\xfe not utf-8", b"null", b"[1, 2]"]
    _, labels, dead = feed([("impression", raw(impression())), *(("interaction", h) for h in hostile)])
    assert labels == []
    assert [d.code for d in dead] == ["invalid_event"] * len(hostile)


def test_late_event_and_unshown_doc_are_dead_lettered():
    late = interaction("d1", "click", timestamp=1000.0 + WINDOW + 1, received_at=1000.0 + WINDOW + 1)
    _, labels, dead = feed(
        [("impression", raw(impression())), ("interaction", raw(late)), ("interaction", raw(interaction("nope", "click")))]
    )
    assert labels == []
    assert dead[0].code == "late_event" and dead[0].reason.startswith("late event")
    assert dead[1].code == "doc_not_shown" and "was not shown" in dead[1].reason


def test_sweep_dead_letters_interactions_whose_impression_never_came():
    state, _, _ = feed([("interaction", raw(interaction("d1", "click", request_id="ghost")))], now=1000.0)
    forget, dead = sweep(state, now=1000.0 + WINDOW / 2, window_s=WINDOW, source="t", rules=RULES)
    assert not forget and dead == []
    forget, dead = sweep(state, now=1000.0 + WINDOW + 1, window_s=WINDOW, source="t", rules=RULES)
    assert forget and len(dead) == 1 and dead[0].code == "unknown_request"
    assert dead[0].reason.startswith("unknown request_id")


def test_sweep_forgets_joined_requests_after_two_windows():
    state, _, _ = feed([("impression", raw(impression(timestamp=1000.0)))])
    assert sweep(state, 1000.0 + WINDOW, WINDOW, "t", RULES) == (False, [])
    assert sweep(state, 1000.0 + 2 * WINDOW + 1, WINDOW, "t", RULES) == (True, [])


def test_an_event_no_label_used_is_dead_lettered_when_its_request_is_forgotten():
    dwell = interaction("d5", "dwell", value=90.0, timestamp=1001.0, received_at=1001.0)  # below the click: no label
    click = interaction("d3", "click", timestamp=1001.0, received_at=1001.0)
    state, labels, dead = feed(
        [("impression", raw(impression(timestamp=1000.0))), ("interaction", raw(dwell)), ("interaction", raw(click))]
    )
    assert dead == [] and dwell.event_id not in {e for lab in labels for e in lab.event_ids}
    forget, dead = sweep(state, 1000.0 + 2 * WINDOW + 1, WINDOW, "t", RULES)
    assert forget and [(d.code, json.loads(d.payload)["event_id"]) for d in dead] == [("no_label", dwell.event_id)]


def test_lateness_goes_by_the_server_clock_not_the_clients():
    backdated = interaction("d1", "click", timestamp=1010.0, received_at=1000.0 + WINDOW + 60)
    _, labels, dead = feed([("impression", raw(impression())), ("interaction", raw(backdated))])
    assert labels == [] and dead[0].code == "late_event"


def test_a_timestamp_before_the_impression_or_in_the_future_is_refused():
    shown = impression(timestamp=100_000.0)
    before = interaction("d1", "click", timestamp=100_000.0 - 3600)  # backdated into an older training slice
    future = interaction("d2", "click", timestamp=100_020.0 + 3600)
    messages = [("impression", raw(shown)), ("interaction", raw(before)), ("interaction", raw(future))]
    _, labels, dead = feed(messages, now=100_020.0)
    assert labels == [] and [d.code for d in dead] == ["bad_timestamp", "bad_timestamp"]
    assert "before the impression" in dead[0].reason and "in the future" in dead[1].reason


def test_labels_carry_the_server_time_training_slices_by():
    click = interaction("d2", "click", timestamp=1015.0)  # sent straight to the broker: received by the stream
    _, labels, _ = feed([("impression", raw(impression())), ("interaction", raw(click))], now=1500.0)
    assert [lab.timestamp for lab in labels if lab.doc_id == "d2"] == [1500.0]


def burst_run(bursts, user, clicks, doc="d5", query="q", start=0, now=1020.0, spacing=1.0):
    """`clicks` requests by `user`, each clicking `doc`: (labels, dead letters, reported bursts)."""
    labels, dead, reported = [], [], []
    for i in range(start, start + clicks):
        rid, t = f"{user}-{i}", now + i * spacing
        state = step(
            None, "t", "impression", raw(impression(rid, user=user, query=query, timestamp=t)), RULES, WINDOW, t, bursts
        ).state
        r = step(state, "t", "interaction", raw(interaction(doc, "click", request_id=rid, timestamp=t)), RULES, WINDOW, t, bursts)
        labels += r.labels
        dead += r.dead
        reported += r.bursts
    return labels, dead, reported


def test_a_click_burst_is_dead_lettered_with_its_reason_and_reported_once():
    bursts = ClickBursts(limit=3, window_s=600)
    labels, dead, reported = burst_run(bursts, "mallory", 10)
    assert [d.code for d in dead] == ["click_burst"] * 7
    assert "user:mallory sent 4 positive events for doc 'd5' on query 'q' within 600s (limit 3)" in dead[0].reason
    assert [b.identity for b in reported] == ["user:mallory"]  # quarantined once, not per click
    assert sum(1 for lab in labels if lab.doc_id == "d5" and lab.grade > 0) == 3


def test_bursts_count_per_identity_query_and_doc_and_forget_after_the_window():
    bursts = ClickBursts(limit=3, window_s=600)
    for user in ("alice", "bob", "carol"):  # many people clicking the same document is no burst
        assert burst_run(bursts, user, 3)[1] == []
    assert burst_run(bursts, "alice", 3, query="another query")[1] == []
    assert burst_run(bursts, "alice", 3, start=1000)[1] == []  # 1,000 s later: the window has moved on


def test_skips_and_anonymous_requests_never_count_as_a_burst():
    bursts = ClickBursts(limit=1, window_s=600)
    for i in range(3):
        state = step(None, "t", "impression", raw(impression(f"r{i}")), RULES, WINDOW, 1020.0, bursts).state
        r = step(state, "t", "interaction", raw(interaction("d5", "click", request_id=f"r{i}")), RULES, WINDOW, 1020.0, bursts)
        assert r.dead == []
    state = step(None, "t", "impression", raw(impression("s0", user="u")), RULES, WINDOW, 1020.0, bursts).state
    for _ in range(3):
        assert (
            step(state, "t", "interaction", raw(interaction("d1", "skip", request_id="s0")), RULES, WINDOW, 1020.0, bursts).dead
            == []
        )
