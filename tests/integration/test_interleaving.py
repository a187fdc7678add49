"""The online stage on the real broker, stream, label table and MLflow registry: a nominated
challenger is interleaved with the champion, users' clicks become labels carrying their credit, and the
scheduler's check promotes it on the verdict, logged on its run."""

from __future__ import annotations

import mlflow
import pytest

from services.control.interleaving import check_experiment
from services.control.promotion import MlflowAliases, Promotions
from services.local.simulate import app_client
from services.storage import open_labels, open_registry
from tests.integration.conftest import wait_for
from training.config import InterleaveConfig
from training.interleave import INTERLEAVING, STAGE_TAG
from training.ranking.encoder import load_encoder
from training.ranking.reranker import Mix, save_model_folder
from training.registry import MlflowRegistry

pytestmark = pytest.mark.integration
QUERY = "vitamin D and bone density"


def test_users_clicks_on_the_challengers_documents_promote_it(stack, tmp_path):
    s, worker = stack["settings"], stack["worker"]
    client = app_client(s)  # signs its users: their clicks are people's, not an anomaly to hold
    saved, saved_registry = worker.s, worker.registry
    try:
        # no exploration: a shuffled first ranking would make `liked` any of the top 10, perhaps the
        # champion's first, and then both models rank alike and no request earns credit
        worker.s = saved.model_copy(update={"serving": saved.serving.model_copy(update={"explore_rate": 0.0})})
        first = client.rank(QUERY, k=10)
        liked = first.items[-1].doc_id  # what the champion ranks 10th: the challenger's memory puts it first
        folder = save_model_folder(
            load_encoder(), tmp_path / "model", Mix(alpha=0.5, beta=2.0, tau=0.5), {QUERY.lower(): {liked: 3.0}}
        )
        main = open_registry(s)  # a registered model of its own: the stack's versions stay as other tests expect
        registry = MlflowRegistry(main.client, f"{main.name}-interleaving-test", s.versions_dir / "interleaving-test")
        with mlflow.start_run(run_name="interleaving test") as run:
            mlflow.log_artifacts(str(folder), "model")
        version = registry.register(run.info.run_id)
        promotions = Promotions(registry, MlflowAliases(registry), stack["control"].promotions.publisher, s.keys.model_events)
        promotions.nominate(version, "passed the gate (test)", actor="scheduler", stage=INTERLEAVING)
        assert registry.get(version).tags[STAGE_TAG] == INTERLEAVING
        champion_before = registry.champion()

        # the registry first: the worker's own poll, which may run between the two, does nothing while
        # the share is 0, and sees the test's registry once the share is 1
        worker.registry = registry
        worker.s = worker.s.model_copy(update={"interleave": InterleaveConfig(share=1.0)})
        worker.check_challenger()
        assert worker.challenger is not None and worker.challenger.version == version
        requests = []
        for n in range(12):
            ranked = client.rank(QUERY, k=10, user=f"interleave-{n}")
            assert liked in [it.doc_id for it in ranked.items]  # the challenger's first pick is always shown
            client.emit([client.event(ranked.request_id, liked, "click")])
            requests.append(ranked.request_id)
    finally:  # the share back to 0 first, then the stack's registry: its poll never mixes the two
        worker.s, worker.registry = saved, saved_registry
        worker.challenger = None

    labels = open_labels(s.label_store_url)

    def team_labels():
        df, _ = labels.read()
        rows = df[df["request_id"].isin(requests) & (df["doc_id"] == liked)]
        return [rows] if len(rows) == len(requests) else None

    (rows,) = wait_for(team_labels, what="labels of the interleaved requests")
    assert set(rows["team"]) == {"challenger"} and set(rows["challenger_version"]) == {version}
    assert (rows["credit"] > 0).all()  # the challenger ranks it first, the champion 10th

    experiment = check_experiment(promotions, labels, InterleaveConfig(min_sessions=10, max_sessions=20), registry.client)
    assert experiment is not None and experiment.judgement.verdict == "challenger"
    assert experiment.judgement.tally.challenger == 10 and experiment.event is not None
    champion = registry.champion()
    assert champion is not None and champion.version == version and registry.challenger() is None
    assert champion_before is None and experiment.champion == "first-stage"
    logged = registry.client.get_run(run.info.run_id).data
    assert logged.tags["interleave_verdict"] == "challenger" and logged.metrics["interleave_wins"] == 10
    assert logged.metrics["interleave_mean_credit"] > 0
    assert registry.get(version).tags["promoted_by"] == "interleaving"
