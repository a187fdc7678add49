"""Online metrics per model version: counted from a forgotten request's impression and events."""

from services.online import OnlineMetrics, request_counts
from services.storage.memory import MemoryActivity
from tests.factories import impression, interaction
from tests.unit.test_stream_join import feed, raw


def test_a_request_counts_its_first_click_cites_and_take_backs():
    state, _, _ = feed(
        [
            ("impression", raw(impression(docs=("d1", "d2", "d3")))),
            ("interaction", raw(interaction("d3", "click"))),
            ("interaction", raw(interaction("d2", "click"))),
            ("interaction", raw(interaction("d2", "cite"))),
            ("interaction", raw(interaction("d2", "citation_deleted"))),
        ]
    )
    version, counts = request_counts(state)
    assert version == "first-stage"
    assert counts["first_click_rr"] == 0.5 and counts["clicked_top_k"] == 1.0 and counts["abandoned"] == 0.0
    assert counts["cites"] == 1 and counts["citations_deleted"] == 1


def test_rates_per_version_from_summed_counts_and_interleaved_requests_left_out():
    activity = MemoryActivity()
    clicked, _, _ = feed([("impression", raw(impression("r1"))), ("interaction", raw(interaction("d1", "click", "r1")))])
    abandoned, _, _ = feed([("impression", raw(impression("r2")))])
    mixed = impression("r3").model_copy(update={"challenger_version": "2"})
    assert request_counts(feed([("impression", raw(mixed))])[0]) is None
    for state in (clicked, abandoned):
        version, counts = request_counts(state)
        activity.count_online({version: counts})
    m = OnlineMetrics.of(activity.online("first-stage"))
    assert (m.requests, m.ctr_at_10, m.mrr_of_clicks, m.abandonment) == (2, 0.5, 0.5, 0.5)
    assert m.citation_deletion_rate is None and m.return_rate is None  # nothing cited or bought: no rate to show
