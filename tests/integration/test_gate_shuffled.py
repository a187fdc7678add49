"""The promotion gate on a real model and real candidates: a challenger built from shuffled labels is
rejected, the same challenger built from the true labels passes."""

import random

import pytest

from tests.conftest import SCIFACT, make_small_beir, require_scifact
from training import beir
from training.config import GateConfig
from training.gate import compare_on_feedback
from training.indexing import build_index
from training.labels.feedback import QueryFeedback
from training.ranking.encoder import load_encoder
from training.ranking.first_stage import FirstStage
from training.ranking.query import normalise_query
from training.ranking.rank import candidates_for
from training.ranking.reranker import Mix, Reranker, save_model_folder

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """150 judged queries over 1,500 SciFact documents: hard enough that the first stage leaves room."""
    require_scifact()
    state = tmp_path_factory.mktemp("gate")
    ds = beir.load(make_small_beir(SCIFACT, state / "beir", queries=150, extra_docs=1500))
    fs = FirstStage(build_index(ds, state))
    qrels = ds.qrels("train")
    candidates = candidates_for(fs, [normalise_query(ds.queries[q]) for q in qrels])
    feedback = []
    for q, docs in qrels.items():  # users clicked the relevant docs and skipped the others they were shown
        query = normalise_query(ds.queries[q])
        skipped = {c.doc_id: -0.25 for c in candidates[query][:10] if c.doc_id not in docs}
        feedback.append(QueryFeedback(query, {**skipped, **{d: 1.0 for d in docs}}))
    return state, fs, feedback, candidates


def challenger(folder, prior):
    save_model_folder(load_encoder(), folder, Mix(alpha=0.5, beta=1.0), prior)
    return Reranker(folder, "challenger")


def test_shuffled_label_challenger_is_rejected_and_true_label_one_passes(setup):
    state, fs, feedback, candidates = setup
    gate = GateConfig(min_queries=30)
    true_prior = {f.query: dict(f.evidence) for f in feedback}
    rng = random.Random(0)
    all_docs = [d for c in candidates.values() for d in (x.doc_id for x in c[:10])]
    shuffled_prior = {q: {rng.choice(all_docs): 1.0 for _ in ev} for q, ev in true_prior.items()}
    # the prior is what earlier users said; the gate compares on later feedback for the same queries
    bad = compare_on_feedback(None, challenger(state / "bad", shuffled_prior), feedback, candidates, fs.text, 10, gate).result
    good = compare_on_feedback(None, challenger(state / "good", true_prior), feedback, candidates, fs.text, 10, gate).result
    assert not bad.passed and bad.mean_gain < 0.005, bad
    assert good.passed and good.mean_gain > 0.05, good
