"""The learned combiner: kept when it beats the tuned mixes on tune queries it did not learn from,
saved with the version, served by `rank`, and set aside by any mix override."""

from __future__ import annotations

import json
import shutil

import numpy as np

from training.labels.feedback import QueryFeedback
from training.ranking.combiner import COMBINER_FILE, FEATURES, WITHOUT_MEMORY_FILE, Combiner, feature_matrix, train_combiner
from training.ranking.first_stage import Candidate
from training.ranking.rank import first_stage_order, rank
from training.ranking.reranker import Mix, Reranker
from training.tuning import learn_combiner

WORDS = ["tax", "rail", "opera", "chess", "glacier", "violin", "harbour", "tariff", "satellite", "pottery"]


def popular_answer_tune_slice() -> tuple[list[QueryFeedback], dict[str, list[Candidate]]]:
    """40 queries unlike the one the memory knows, each answered by d7 (the document users chose there
    too), which the first stage ranks 6th: only the document's click-through prior points at it."""
    feedback, cands = [], {}
    for i in range(40):
        query = f"{WORDS[i % 10]} {WORDS[(i * 3 + 1) % 10]} schedule {i}"
        order = ["d1", "d2", "d3", "d4", "d5", "d7", "d6", "d8"]
        order = order[i % 3 :] + order[: i % 3] if i % 3 != 2 else order  # d7 in 3rd..6th place
        cands[query] = [Candidate(d, 8.0 - r, 0.8 - r / 20, 1.0 - r / 10) for r, d in enumerate(order)]
        feedback.append(QueryFeedback(query, {"d7": 2.0}))
    return feedback, cands


def test_a_combiner_that_finds_what_the_mix_cannot_express_is_kept(tiny_first_stage, tiny_model):
    feedback, cands = popular_answer_tune_slice()
    reranker = Reranker(tiny_model, "1").with_mix(Mix(0.0, 2.0, 0.5))
    choice = learn_combiner(reranker, feedback, [], cands, tiny_first_stage.text, 8, min_queries=30, seed=1)
    assert choice.held_out_ndcg is not None and choice.held_out_ndcg > 0.95 > choice.mix_ndcg
    assert choice.kept and choice.combiner is not None
    assert max(choice.combiner.importance(), key=lambda n: choice.combiner.importance()[n]) == "document_prior"
    assert choice.without_memory is not None and "document_prior" not in choice.without_memory.names


def test_too_few_tune_queries_train_no_combiner(tiny_first_stage, tiny_model):
    feedback, cands = popular_answer_tune_slice()
    choice = learn_combiner(Reranker(tiny_model, "1"), feedback[:5], [], cands, tiny_first_stage.text, 8, min_queries=30, seed=1)
    assert choice.combiner is None and not choice.kept and choice.held_out_ndcg is None


def test_a_version_that_kept_its_combiner_is_served_by_it_and_a_mix_sets_it_aside(tiny_first_stage, tiny_model, tmp_path):
    feedback, cands = popular_answer_tune_slice()
    choice = learn_combiner(Reranker(tiny_model, "1"), feedback, [], cands, tiny_first_stage.text, 8, min_queries=30, seed=1)
    assert choice.combiner is not None and choice.without_memory is not None
    folder = shutil.copytree(tiny_model, tmp_path / "version")
    choice.combiner.save(folder / COMBINER_FILE)
    choice.without_memory.save(folder / WITHOUT_MEMORY_FILE)
    meta = json.loads((folder / "rankloop.json").read_text())
    (folder / "rankloop.json").write_text(json.dumps({**meta, "scorer": "combiner"}))

    version = Reranker(folder, "2")
    assert version.combiner is not None and version.combiner.names == list(FEATURES)
    query = "glacier opera timetable"  # a new query: d7 is 6th in the first stage
    served = rank(query, cands[feedback[0].query], version, tiny_first_stage.text, 8)
    assert served[0][0] == "d7"
    as_mix = rank(query, cands[feedback[0].query], version, tiny_first_stage.text, 8, mix=Mix(0.0))
    assert [d for d, _ in as_mix] == [d for d, _ in first_stage_order(cands[feedback[0].query])]
    assert version.with_mix(Mix(0.0)).combiner is None and version.combiner is not None
    assert Reranker(tiny_model, "1").combiner is None  # a version that kept its mixes


def test_a_train_query_teaches_the_combiner_as_if_the_memory_did_not_hold_it(tiny_first_stage, tiny_model):
    """Otherwise every train query would find its own answer in the memory and its prior, and the
    combiner would learn to trust both more than a new query can."""
    query = "does vitamin D prevent fractures"  # the query the memory holds (d7)
    reranker = Reranker(tiny_model, "1")
    cands = tiny_first_stage.search(query, 8)
    seen = reranker.features(query, cands, tiny_first_stage.text)
    left_out = reranker.features(query, cands, tiny_first_stage.text, leave_out=True)
    d7 = seen.doc_ids.index("d7")
    assert seen.neighbours[0] > 0.99 and seen.document_prior[d7] == 3.0
    assert len(left_out.neighbours) == 0 and left_out.document_prior[d7] == 0.0


def test_the_gate_scores_the_judged_documents_in_the_order_serving_shows_them(tiny_first_stage, tiny_model):
    """A combiner's features are scaled over the whole head: ranked alone, the few judged documents
    would be scored on inputs serving never gives it. The gate restricts the served order instead."""
    from training.config import GateConfig
    from training.gate import compare_on_feedback, compare_on_requests

    feedback, cands = popular_answer_tune_slice()
    choice = learn_combiner(Reranker(tiny_model, "1"), feedback, [], cands, tiny_first_stage.text, 8, min_queries=30, seed=1)
    assert choice.combiner is not None
    challenger = Reranker(tiny_model, "1").with_combiner(choice.combiner.with_similarity(0.5))
    skipped = [("d1", "d5"), ("d2", "d8"), ("d3", "d6"), ("d4", "d8")]  # what users skipped beside d7
    held_out = [QueryFeedback(fb.query, {"d7": 2.0, a: -1.0, b: -1.0}) for fb, (a, b) in zip(feedback, skipped * 10)]
    report = compare_on_feedback(None, challenger, held_out, cands, tiny_first_stage.text, 8, GateConfig(min_queries=1))
    by_request = compare_on_requests(
        None, challenger, [(f"r{i}", fb) for i, fb in enumerate(held_out)], cands, tiny_first_stage.text, 8, GateConfig()
    )
    for fb in held_out:
        served = [d for d, _ in rank(fb.query, cands[fb.query], challenger, tiny_first_stage.text, 8) if d in fb.evidence]
        assert report.challenger_order[fb.query] == served
    assert by_request.challenger_order == report.challenger_order
    assert report.result.challenger_mean == 1.0  # d7 first wherever it is served first


def test_a_combiner_learns_from_the_number_fields_and_ages_the_corpus_gives(living_index, tiny_model, tmp_path):
    """Users choose d5, the best-rated document, whatever they ask; nothing but its `rating` field says
    so (the memory points at d7). A version that learned it reads the field when it serves."""
    from schemas.documents import Document, FieldType
    from tests.unit.conftest import DOCS

    living_index.store.declare({"rating": FieldType.number})
    ratings = {"d5": 5.0, "d7": 2.0, "d1": 3.0}
    living_index.store.upsert(
        [
            Document(id=d, title=t, text=x, fields={"rating": ratings[d]} if d in ratings else {}, updated_at=1.7e9)
            for d, (t, x) in DOCS.items()
        ]
    )
    assert living_index.document_features() == ["field_rating", "age_days"]
    columns = living_index.document_numbers(["d5", "d2"], ["field_rating", "age_days"])
    assert columns["field_rating"][0] == 5.0 and np.isnan(columns["field_rating"][1]) and columns["age_days"][0] > 300

    feedback, cands = popular_answer_tune_slice()
    feedback = [QueryFeedback(fb.query, {"d5": 2.0}) for fb in feedback]
    folder = shutil.copytree(tiny_model, tmp_path / "version")
    reranker = Reranker(folder, "1").warm(living_index).with_mix(Mix(0.0, 2.0, 0.5))
    choice = learn_combiner(reranker, feedback, [], cands, living_index.text, 8, min_queries=30, seed=1)
    assert choice.kept and choice.combiner is not None and choice.without_memory is not None
    assert choice.combiner.document_features == ["field_rating", "age_days"]
    importance = choice.combiner.importance()
    assert max(importance, key=lambda n: importance[n]) == "field_rating"
    assert "field_rating" in choice.without_memory.names

    choice.combiner.save(folder / COMBINER_FILE)
    meta = json.loads((folder / "rankloop.json").read_text())
    (folder / "rankloop.json").write_text(json.dumps({**meta, "scorer": "combiner"}))
    version = Reranker(folder, "2").warm(living_index)
    served = rank("glacier opera timetable", cands[feedback[0].query], version, living_index.text, 8)
    assert served[0][0] == "d5"


def test_a_new_combiner_does_not_learn_where_users_were_shown_a_document(tiny_first_stage, tiny_model):
    """The first-stage rank is where clicks were shown: learned from clicks it explains position bias."""
    feedback, cands = popular_answer_tune_slice()
    choice = learn_combiner(Reranker(tiny_model, "1"), feedback, [], cands, tiny_first_stage.text, 8, min_queries=30, seed=1)
    assert choice.combiner is not None and choice.without_memory is not None
    assert "first_stage_rank" not in choice.combiner.names + choice.without_memory.names
    assert "first_stage_rank" not in FEATURES


def test_a_combiner_saved_with_the_retired_rank_feature_still_scores_by_it(tiny_first_stage, tiny_model, tmp_path):
    """A champion trained before the rank was retired keeps serving as it was trained: the rank is
    computed for it, not looked up in the corpus as a document feature."""
    feedback, cands = popular_answer_tune_slice()
    reranker = Reranker(tiny_model, "1")
    names = ["first_stage", "first_stage_rank"]
    groups = [(reranker.features(fb.query, cands[fb.query], tiny_first_stage.text), {"d7": 2}) for fb in feedback]
    path = tmp_path / COMBINER_FILE
    train_combiner(groups, names, seed=1).save(path)
    old = Combiner.load(path)
    assert old.names == names and old.document_features == []
    head = groups[0][0]
    assert np.allclose(feature_matrix(head, names)[:, 1], np.arange(len(head.doc_ids)) / len(head.doc_ids))
    assert np.isfinite(old.score(head)).all()
