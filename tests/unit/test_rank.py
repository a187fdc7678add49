"""The one ranking function: the reranked head, then the first-stage tail; mixes never mutate a model."""

from __future__ import annotations

from training.beir import load
from training.evaluate import evaluate_designs
from training.ranking.rank import first_stage_order, rank
from training.ranking.reranker import Mix, Reranker

QUERY = "does vitamin D prevent fractures"


def test_rank_reorders_only_the_head_and_keeps_the_tail(tiny_first_stage, tiny_model):
    cands = tiny_first_stage.search(QUERY, 8)
    reranker = Reranker(tiny_model, "1")
    ranking = rank(QUERY, cands, reranker, tiny_first_stage.text, depth=3)
    assert sorted(d for d, _ in ranking[:3]) == sorted(c.doc_id for c in cands[:3])
    assert ranking[3:] == first_stage_order(cands[3:])
    assert rank(QUERY, cands, None, tiny_first_stage.text, depth=3) == first_stage_order(cands)


def test_a_mix_override_changes_the_order_without_touching_the_model(tiny_first_stage, tiny_model):
    cands = tiny_first_stage.search(QUERY, 8)
    reranker = Reranker(tiny_model, "1")
    served = reranker.mix
    with_memory = rank(QUERY, cands, reranker, tiny_first_stage.text, depth=8)
    without = rank(QUERY, cands, reranker, tiny_first_stage.text, depth=8, mix=Mix(alpha=0.5, beta=0.0))
    assert with_memory[0][0] == "d7" and without[0][0] != "d7"
    assert reranker.mix == served
    assert reranker.with_mix(Mix(0.0)).mix == Mix(0.0) and reranker.mix == served


def test_design_comparison_leaves_the_served_mix_alone(tiny_first_stage, tiny_model, tmp_path):
    from tests.unit.conftest import write_beir

    ds = load(write_beir(tmp_path / "beir"))
    reranker = Reranker(tiny_model, "1")
    cands = {QUERY: tiny_first_stage.search(QUERY, 8)}
    designs = evaluate_designs(ds, "test", cands, reranker, tiny_first_stage.text, 8)
    assert reranker.mix == Mix(0.5, 2.0, 0.5)
    assert designs["bi-encoder + first stage (no memory)"]["weights"]["beta"] == 0.0
    # the memory points at d7, which is not relevant: the design without it ranks d1 first
    assert (
        designs["bi-encoder + first stage (no memory)"]["ndcg@10"]
        > designs["bi-encoder + first stage + feedback memory (tuned mix)"]["ndcg@10"]
    )


def test_each_part_design_is_rated_at_the_mixes_tuned_for_it(tiny_first_stage, tiny_model, tmp_path):
    """Switching a part off in the served mix understates a design: its own best mix in the tune grid
    is what the version records and the comparison rates."""
    import json
    import shutil

    from tests.unit.conftest import write_beir
    from training.tuning import FUSION_ONLY, NO_BI_ENCODER, NO_MEMORY, SAFE_MIX, Tuned, TunedMixes

    served = Mix(0.25, 0.25, 0.5)
    grid = {served: 0.9, Mix(1.0, 0.0, 0.3): 0.8, Mix(0.25, 0.0, 0.3): 0.7, Mix(0.0, 0.5, 0.5): 0.85, Mix(0.0, 0.0, 0.3): 0.6}
    mixes = TunedMixes(Tuned(served, grid), SAFE_MIX, {}, 40, 2)
    designs = mixes.designs()
    assert (designs[NO_MEMORY]["alpha"], designs[NO_MEMORY]["beta"]) == (1.0, 0.0)
    assert (designs[NO_BI_ENCODER]["alpha"], designs[NO_BI_ENCODER]["beta"]) == (0.0, 0.5)
    assert (designs[FUSION_ONLY]["alpha"], designs[FUSION_ONLY]["beta"]) == (0.0, 0.0)
    assert all(d["unfamiliar"] == SAFE_MIX.as_dict() for d in designs.values())  # too few unfamiliar queries to tune

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    meta = json.loads((folder / "rankloop.json").read_text())
    (folder / "rankloop.json").write_text(json.dumps({**meta, "designs": designs}))
    ds = load(write_beir(tmp_path / "beir"))
    cands = {QUERY: tiny_first_stage.search(QUERY, 8)}
    rated = evaluate_designs(ds, "test", cands, Reranker(folder, "1"), tiny_first_stage.text, 8)
    assert rated[NO_MEMORY]["weights"]["alpha"] == 1.0 and rated[NO_MEMORY]["weights"]["unfamiliar"]["alpha"] == 0.0
    assert rated[NO_BI_ENCODER]["weights"]["beta"] == 0.5


def test_a_version_loads_its_query_memory_from_its_folder_without_encoding(tiny_model, monkeypatch):
    """A swap must not encode the feedback memory beside live requests: the version carries it."""
    import numpy as np

    from training.ranking import reranker as module
    from training.ranking.encoder import encode

    loaded = module.Reranker(tiny_model, "1")
    expected = encode(loaded.model, loaded.memory_queries)
    calls = []
    monkeypatch.setattr(module, "encode", lambda *a, **k: calls.append(a) or encode(*a, **k))
    again = module.Reranker(tiny_model, "1")
    assert calls == []
    assert np.allclose(again.memory.embeddings, expected, atol=1e-5)


def test_a_learned_fusion_reorders_the_candidates_and_picks_the_head(tiny_first_stage, tiny_model):
    """bm25_weight 1: BM25 alone decides which candidates the reranker sees and the tail's order."""
    from training.ranking.first_stage import fuse

    cands = tiny_first_stage.search(QUERY, 8)
    bm25_only = fuse(cands, 1.0)
    assert [c.bm25 for c in bm25_only] == sorted((c.bm25 for c in cands), reverse=True)
    assert [c.dense for c in fuse(cands, 0.0)] == sorted((c.dense for c in cands), reverse=True)
    reranker = Reranker(tiny_model, "1")
    ranking = rank(QUERY, cands, reranker, tiny_first_stage.text, depth=3, mix=Mix(0.0, 0.0, 0.5, 1.0))
    assert [d for d, _ in ranking] == [c.doc_id for c in bm25_only]


def test_tuning_learns_the_fusion_when_one_part_is_better(tiny_first_stage, tiny_model):
    """Feedback that only BM25's order satisfies makes tuning choose a BM25-heavy fusion over the index's."""
    from training.labels.feedback import QueryFeedback
    from training.ranking.first_stage import Candidate
    from training.tuning import tune_mix

    # the index's fusion puts d2 (dense) first; BM25 alone puts d3 first, and users want d3
    parts = {"d2": (0.0, 1.0), "d4": (1.0, 0.8), "d3": (10.0, 0.0), "d5": (6.0, 0.1), "d6": (0.0, 0.5)}
    cands = [Candidate(d, b, v, 0.5 * b / 10 + 0.5 * v) for d, (b, v) in parts.items()]
    cands.sort(key=lambda c: -c.fused)
    assert cands[0].doc_id == "d2"
    feedback = [QueryFeedback(QUERY, {"d3": 2.0, "d2": -1.0, "d4": -1.0, "d6": -1.0})]
    tuned = tune_mix(Reranker(tiny_model, "1"), feedback, {QUERY: cands}, tiny_first_stage.text, 8)
    assert tuned.mix.bm25_weight in (0.75, 1.0)
    assert tuned.grid[tuned.mix] == 1.0
    assert max(v for m, v in tuned.grid.items() if m.bm25_weight is None) < 1.0


def test_a_query_unlike_any_with_feedback_is_served_with_the_unfamiliar_mix(tiny_first_stage, tiny_model):
    """The memory knows one query; a paraphrase-close query gets the familiar mix (the memory lifts d7),
    an unrelated one the unfamiliar mix (here the first stage as indexed)."""
    from training.ranking.rank import first_stage_order
    from training.tuning import SAFE_MIX

    reranker = Reranker(tiny_model, "1").with_mix(Mix(0.5, 2.0, 0.5), SAFE_MIX)
    near, far = QUERY, "how do antibiotics change gut bacteria"
    assert reranker.familiarity(reranker.embed_query(near)) > 0.95 > reranker.familiarity(reranker.embed_query(far))
    assert rank(near, tiny_first_stage.search(near, 8), reranker, tiny_first_stage.text, 8)[0][0] == "d7"
    far_cands = tiny_first_stage.search(far, 8)
    assert [d for d, _ in rank(far, far_cands, reranker, tiny_first_stage.text, 8)] == [
        d for d, _ in first_stage_order(far_cands)
    ]


def test_too_few_unfamiliar_tune_queries_leave_them_the_safe_mix(tiny_first_stage, tiny_model):
    from training.labels.feedback import QueryFeedback
    from training.tuning import SAFE_MIX, tune_mixes

    reranker = Reranker(tiny_model, "1")
    far = "how do antibiotics change gut bacteria"
    feedback = [QueryFeedback(QUERY, {"d1": 1.0}), QueryFeedback(far, {"d5": 1.0})]
    cands = {q: tiny_first_stage.search(q, 8) for q in (QUERY, far)}
    mixes = tune_mixes(reranker, feedback, cands, tiny_first_stage.text, 8, min_queries=2)
    assert (mixes.familiar_queries, mixes.unfamiliar_queries) == (1, 1)
    assert (mixes.unfamiliar.alpha, mixes.unfamiliar.beta) == (SAFE_MIX.alpha, SAFE_MIX.beta) and mixes.unfamiliar_grid == {}
    tuned = tune_mixes(reranker, feedback, cands, tiny_first_stage.text, 8, min_queries=1)
    assert tuned.unfamiliar_grid  # enough of them: tuned on them


def test_the_fusion_is_learned_on_the_first_stage_alone_and_both_mixes_use_it(tiny_first_stage, tiny_model):
    """The memory of a repeated query answers it under any fusion; the first stage alone still tells
    which fusion ranks users' choices first, and both mixes (and the safe one) carry it, unless too few
    queries taught it: then queries unlike them keep the index's fusion."""
    from training.labels.feedback import QueryFeedback
    from training.ranking.first_stage import Candidate
    from training.tuning import tune_fusion, tune_mixes

    parts = {"d2": (0.0, 1.0), "d4": (1.0, 0.8), "d3": (10.0, 0.0), "d5": (6.0, 0.1), "d6": (0.0, 0.5)}
    cands = sorted((Candidate(d, b, v, 0.5 * b / 10 + 0.5 * v) for d, (b, v) in parts.items()), key=lambda c: -c.fused)
    feedback = [QueryFeedback(QUERY, {"d3": 2.0, "d2": -1.0, "d4": -1.0, "d6": -1.0})]
    reranker = Reranker(tiny_model, "1")
    assert tune_fusion(reranker, feedback, {QUERY: cands}, tiny_first_stage.text, 8) in (0.75, 1.0)
    mixes = tune_mixes(reranker, feedback, {QUERY: cands}, tiny_first_stage.text, 8, min_queries=1)
    assert mixes.familiar.mix.bm25_weight == mixes.unfamiliar.bm25_weight in (0.75, 1.0)
    few = tune_mixes(reranker, feedback, {QUERY: cands}, tiny_first_stage.text, 8, min_queries=30)
    assert few.familiar.mix.bm25_weight in (0.75, 1.0) and few.unfamiliar.bm25_weight is None


def test_probe_queries_are_kept_out_of_training_only_when_the_tune_slice_needs_them():
    """Users repeating their queries leave the tune slice no query training never saw; a share of the
    train queries is then held out of fine-tuning so the unfamiliar mix is measured, not guessed."""
    from training.labels.feedback import QueryFeedback
    from training.slices import probe_queries

    train = [QueryFeedback(f"q{i}", {"d1": 1.0}) for i in range(400)]
    repeated = train[:50]
    probes = probe_queries(train, repeated, 0.1, 30, 13)
    assert 30 <= len(probes) <= 55 and {fb.query for fb in probes} <= {fb.query for fb in train}
    later = probe_queries(train + [QueryFeedback(f"n{i}", {"d1": 1.0}) for i in range(100)], repeated, 0.1, 30, 13)
    assert {fb.query for fb in probes} <= {fb.query for fb in later}  # the same ones next round: never trained on
    assert probes != probe_queries(train, repeated, 0.1, 30, 14)  # another seed, others
    fresh = [QueryFeedback(f"new{i}", {"d1": 1.0}) for i in range(30)]
    assert probe_queries(train, repeated + fresh, 0.1, 30, 13) == []  # the tune slice has its own
    assert probe_queries(train[:200], repeated, 0.1, 30, 13) == []  # about 20 < 30: head traffic, too few
    assert probe_queries(train, repeated, 0.0, 30, 13) == []  # switched off


def test_probe_queries_tune_the_unfamiliar_mix_as_if_unseen(tiny_first_stage, tiny_model):
    from training.labels.feedback import QueryFeedback
    from training.tuning import tune_mixes

    reranker = Reranker(tiny_model, "1")
    known = reranker.features(QUERY, tiny_first_stage.search(QUERY, 8), tiny_first_stage.text)
    unseen = reranker.features(QUERY, tiny_first_stage.search(QUERY, 8), tiny_first_stage.text, unseen=True)
    assert known.neighbours.max() > 0.95 and (unseen.neighbours < 0.7).all()  # its own feedback is not borrowed

    far = "how do antibiotics change gut bacteria"
    feedback = [QueryFeedback(QUERY, {"d1": 1.0}), QueryFeedback(far, {"d5": 1.0})]
    cands = {q: tiny_first_stage.search(q, 8) for q in (QUERY, far)}
    probe = [QueryFeedback(QUERY, {"d7": 1.0})]
    mixes = tune_mixes(reranker, feedback, cands, tiny_first_stage.text, 8, min_queries=2, probe=probe)
    assert (mixes.unfamiliar_queries, mixes.probe_queries) == (1, 1) and mixes.unfamiliar_grid  # 1 + 1 reach 2


def test_a_version_encodes_a_query_once_and_forgets_past_its_bound(tiny_model, monkeypatch):
    """Tuning and the gate ask for the same queries many times: encoded one by one every time, they
    took half of a 45k-label training."""
    from training.ranking import reranker as module
    from training.ranking.encoder import encode

    version = module.Reranker(tiny_model, "1")
    calls: list[int] = []
    monkeypatch.setattr(module, "encode", lambda model, texts: calls.append(len(texts)) or encode(model, texts))
    first = version.embed_query("Statins and  muscle pain")
    assert (version.embed_query("statins and muscle pain") == first).all() and calls == [1]
    version.with_mix(Mix(0.0)).embed_queries(["statins and muscle pain", "coffee and the liver", "coffee and the liver"])
    assert calls == [1, 1]  # the copy shares what the version remembers; only the new query, once
    monkeypatch.setattr(module, "QUERY_VECTORS", 2)
    version.embed_queries(["sleep and memory"])
    assert len(version.query_vectors) <= 2 and calls == [1, 1, 1]


def test_a_probe_with_a_fine_tuned_twin_does_not_tune_the_models_weight_for_unfamiliar_queries(tiny_first_stage, tmp_path):
    """A paraphrase the model was fine-tuned on makes a probe familiar to the model, whatever the memory
    pretends: only probes without such a twin say how the model does on a new query. Without enough of
    them the unfamiliar mix is tuned on every probe, but without the model (alpha 0)."""
    from training.labels.feedback import QueryFeedback
    from training.ranking.encoder import load_encoder
    from training.ranking.reranker import save_model_folder
    from training.tuning import ALPHAS, tune_mixes, without_twins

    twin, trained = "does vitamin d prevent bone fractures", "does vitamin d prevent fractures"
    alone = "which enzymes break down dietary starch"
    memory = {twin: {"d7": 1.0}, trained: {"d7": 1.0}, alone: {"d2": 1.0}, "is coffee linked to heart attacks": {"d3": 1.0}}
    folder = save_model_folder(load_encoder(), tmp_path / "model", Mix(0.5, 0.5, 0.5), memory)
    reranker = Reranker(folder, "1").warm(tiny_first_stage)
    assert reranker.familiarity(reranker.embed_query(twin)) >= 0.7  # the premise: the two are twins
    probes = [QueryFeedback(twin, {"d7": 1.0}), QueryFeedback(alone, {"d2": 1.0})]
    assert [fb.query for fb in without_twins(reranker, probes)] == [alone]
    # two probes that are twins of each other are both unseen by the model: both kept
    both = [QueryFeedback(twin, {"d7": 1.0}), QueryFeedback(trained, {"d7": 1.0})]
    assert len(without_twins(reranker, both)) == 2

    tune = [QueryFeedback(trained, {"d7": 2.0})]  # familiar: in the memory
    cands = {q: tiny_first_stage.search(q, 8) for q in (twin, trained, alone)}
    twinned = tune_mixes(reranker, tune, cands, tiny_first_stage.text, 8, 1, probes[:1])
    assert (twinned.probe_queries, twinned.twinless_probes) == (1, 0)
    assert {m.alpha for m in twinned.unfamiliar_grid} == {0.0} and twinned.unfamiliar.alpha == 0.0
    measured = tune_mixes(reranker, tune, cands, tiny_first_stage.text, 8, 1, probes[1:])
    assert (measured.probe_queries, measured.twinless_probes) == (1, 1)
    assert {m.alpha for m in measured.unfamiliar_grid} == set(ALPHAS)


def test_the_familiar_mix_is_scored_on_each_remembered_query_as_its_own_paraphrase_too(tiny_first_stage, tmp_path):
    """A familiar query is a repeat or a paraphrase. Scored on repeats alone, the query's own feedback
    answers at similarity 1 whatever the memory's radius; hidden (`leave_out`), what its remembered
    twins said is what a paraphrase would get."""
    from training.labels.feedback import QueryFeedback
    from training.ranking.encoder import load_encoder
    from training.ranking.reranker import save_model_folder
    from training.tuning import paraphrase_features, tune_mix

    trained, twin = "does vitamin d prevent fractures", "does vitamin d prevent bone fractures"
    alone, unknown = "which enzymes break down dietary starch", "is coffee linked to heart attacks"
    memory = {trained: {"d7": 1.0}, twin: {"d3": 1.0}, alone: {"d2": 1.0}}  # the twin's users chose d3
    folder = save_model_folder(load_encoder(), tmp_path / "model", Mix(0.5, 0.5, 0.5), memory)
    reranker = Reranker(folder, "1").warm(tiny_first_stage)
    tune = [QueryFeedback(trained, {"d7": 2.0}), QueryFeedback(alone, {"d2": 1.0}), QueryFeedback(unknown, {"d3": 1.0})]
    cands = {q: tiny_first_stage.search(q, 8) for q in (trained, alone, unknown)}
    assert "d7" in {c.doc_id for c in cands[trained]}

    again = paraphrase_features(reranker, tune, cands, tiny_first_stage.text, 8)
    assert list(again) == [trained]  # `alone` has no twin left, `unknown` is not remembered
    reworded = again[trained]
    assert 0.7 <= reworded.neighbours[0] < 0.99 and {"d3": 1.0} in reworded.evidence and {"d7": 1.0} not in reworded.evidence

    bold = Mix(0.0, 2.0, 0.3)
    as_asked = tune_mix(reranker, tune[:1], cands, tiny_first_stage.text, 8, [None])
    pooled = tune_mix(reranker, tune[:1], cands, tiny_first_stage.text, 8, [None], paraphrases=True)
    assert as_asked.grid[bold] == 1.0  # its own feedback puts d7 first
    assert pooled.grid[bold] < 1.0  # as a paraphrase, the twin's d3 comes first


def test_a_version_serves_every_labels_memory_and_a_gate_measures_it_with_its_train_slices(tiny_first_stage, tmp_path):
    """The served memory holds the held-out slices' feedback too; `as_measured` gives back the one
    the version was tuned and gated with, so a later gate compares like with like."""
    from training.ranking.encoder import load_encoder
    from training.ranking.model_files import MEASURED_PRIOR_FILE, PRIOR_FILE
    from training.ranking.reranker import save_memory, save_model_folder

    trained, held_out = "does vitamin d prevent fractures", "is coffee linked to heart attacks"
    model = load_encoder()
    folder = save_model_folder(model, tmp_path / "model", Mix(0.0, 1.0, 0.5), {trained: {"d7": 1.0}})
    (folder / PRIOR_FILE).replace(folder / MEASURED_PRIOR_FILE)
    save_memory(model, folder, {trained: {"d7": 2.0}, held_out: {"d3": 1.0}})
    served = Reranker(folder, "1").warm(tiny_first_stage)
    measured = served.as_measured()
    assert served.memory_queries == [trained, held_out] and measured.memory_queries == [trained]
    assert served.document_prior == {"d7": 2.0, "d3": 1.0} and measured.document_prior == {"d7": 1.0}
    q = served.embed_query(held_out)
    assert served.familiarity(q) > 0.99 and measured.familiarity(q) < 0.7  # only the served one remembers it
    near, _ = measured.memory.nearest(served.embed_query(trained), 1)
    assert near[0] > 0.99  # its rows are the served memory's own embeddings of the same queries
    assert Reranker(save_model_folder(model, tmp_path / "old", Mix(0.0), {}), "0").as_measured().folder == tmp_path / "old"
