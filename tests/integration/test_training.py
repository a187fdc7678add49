"""Training from real labels, MLflow logging, promotion, hot swap under load, rollback."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import mlflow
import pytest

from schemas import InvalidState
from services.auth import UserSecret
from services.local.simulate import UserModel, app_client, examination_curve, simulate
from services.local.workers import settle_labels
from services.sdk import RankloopClient
from services.storage import open_labels, open_registry
from tests.integration.conftest import wait_for
from training import beir
from training.config import TrainConfig
from training.pipeline import TrainingJob, train_once
from training.ranking.first_stage import FirstStage

pytestmark = pytest.mark.integration


def served_version(s) -> str:
    return httpx.get(f"{s.base_url}/model").json()["model_version"]


@pytest.fixture(scope="module")
def trained(stack):
    """Simulated users -> events -> stream -> labels -> one real (small) training run."""
    s = stack["settings"]
    ds = beir.load(stack["dataset"])
    labels = open_labels(s.label_store_url)
    user = UserModel(examination_curve(s.clicklog))
    stats = simulate(app_client(s), ds, "train", 60, user, seed=3, progress=False)
    assert stats.accepted == stats.events > 0
    settle_labels(s, labels, timeout=120)  # every event sent has its labels stored: the same labels each run
    registry = open_registry(s)
    cfg = TrainConfig(epochs=1, batch_size=8, max_seq_length=64, hard_negatives=1)
    job = TrainingJob(work_dir=s.state_dir, depth=20, train=cfg, gate=s.gate, rules=s.stream.rules)
    outcome = train_once(registry, labels, FirstStage.current(s.state_dir), job)
    return registry, outcome


def test_training_run_is_logged_and_registered_but_not_promoted_without_evidence(stack, trained):
    stack["settings"]
    registry, outcome = trained
    client = registry.client
    assert outcome.version == "1" and outcome.run_id
    # a handful of held-out requests: too few for a verdict, per query or per request
    assert outcome.status == "rejected" and "held-out requests" in outcome.message
    assert registry.champion() is None
    run = client.get_run(outcome.run_id)
    for key in ("gate_champion_ndcg10", "gate_challenger_ndcg10", "gate_p_value", "train_loss_last", "labels"):
        assert key in run.data.metrics
    assert run.data.params["warm_start"] == "all-MiniLM-L6-v2"
    # train.debias=auto (the default): the naive and the debiased learner both fitted, one kept on held-out clicks
    held_out = {m: run.data.metrics[f"tune_clicks_ndcg10_{m}"] for m in ("naive", "ips")}
    assert run.data.params["debias_chosen"] == max(held_out, key=lambda m: (held_out[m], m == "naive"))
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"model", "lineage.json", "gate.png", "gate_per_query.json"} <= artifacts
    lineage = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/lineage.json")
    assert lineage["labels"] > 0 and "click" in lineage["by_signal"] and lineage["table_version"] >= 0
    assert run.data.tags["label_table"].endswith(f"@v{lineage['table_version']}")  # the exact labels, by time travel
    model_files = {a.path for a in client.list_artifacts(outcome.run_id, "model")}
    assert "model/model.safetensors" in model_files and "model/rankloop.json" in model_files
    # measured with the train slice's feedback memory, it serves with every label's: the held-out queries' too
    served = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/model/feedback_prior.json")
    measured = int(run.data.params["memory_queries"])
    assert len(served) == int(run.data.params["served_memory_queries"]) > measured > 0


def test_a_version_is_reviewable_in_mlflow(stack, trained):
    """What an ML engineer opens: a pyfunc model with a signature, the model card as the version's
    description and README, a run name with the outcome, the loss per step, the labels as a dataset."""
    import pandas as pd

    s = stack["settings"]
    registry, outcome = trained
    client = registry.client
    version = client.get_model_version(registry.name, outcome.version)
    assert "held-out requests" in version.description and "## Biggest wins" in version.description
    assert "Learner chosen on the tune slice's clicks" in version.description
    run = client.get_run(outcome.run_id)
    assert run.info.run_name == f"v{outcome.version} · rejected · {outcome.gate.mean_gain:+.3f} NDCG@10"
    assert run.data.tags["mlflow.note.content"] == version.description
    losses = client.get_metric_history(outcome.run_id, "train_loss")
    assert len(losses) > 2 and [m.step for m in losses] == list(range(len(losses)))
    (logged,) = run.outputs.model_outputs  # listed under the run's "Logged models"
    assert mlflow.get_logged_model(logged.model_id).source_run_id == outcome.run_id
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "labels" and dataset.tags[0].value == "training"
    experiment = client.get_experiment_by_name(s.keys.experiment)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    folder = registry.fetch(registry.get(outcome.version))
    assert (folder / "README.md").read_text().startswith(f"# {registry.name}: rejected by the gate")
    model = mlflow.pyfunc.load_model(str(folder))
    assert model.metadata.get_input_schema().input_names() == ["query", "document"]
    scores = model.predict(pd.DataFrame({"query": ["vitamin d", "vitamin d"], "document": ["vitamin d levels", "stock prices"]}))
    assert scores[0] > scores[1]


def test_the_schedulers_counters_are_rebuilt_from_mlflow_when_redis_lost_them(stack, trained):
    from redis import Redis

    s = stack["settings"]
    registry, outcome = trained
    scheduler = stack["control"].scheduler
    Redis.from_url(s.redis_url).delete(s.keys.train_state)  # as after a restart of a Redis without persistence
    scheduler.restore_counters(time.time())
    run = registry.client.get_run(outcome.run_id)
    counters = scheduler.state.read()
    assert float(counters["last_labels"]) == run.data.metrics["label_contributions"] > 0  # what count() counts
    assert abs(float(counters["last_time"]) - run.info.end_time / 1000) < 1


def test_online_metrics_of_a_version_reach_its_mlflow_tags(stack, trained):
    """What the stream counted in Redis for a version goes onto the model version at the next check."""
    registry, outcome = trained
    scheduler = stack["control"].scheduler
    scheduler.online_written = 0.0
    scheduler.activity.count_online({outcome.version: {"requests": 4, "clicked_top_k": 3, "first_click_rr": 2.5, "abandoned": 1}})
    scheduler.record_online_metrics(time.time())
    tags = registry.client.get_model_version(registry.name, outcome.version).tags
    assert float(tags["online_requests"]) >= 4 and tags["online_ctr_at_10"] and tags["online_abandonment"]


def test_the_status_page_renders_in_headless_chromium(stack, trained, tmp_path):
    """The page an operator opens, in a real browser: the served version, the trainings, charts."""
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.fail("no headless browser: `make test` installs Debian's chromium (or: apt-get install chromium)")
    s = stack["settings"]
    _, outcome = trained
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1100,1600", f"--user-data-dir={tmp_path}"]
    page = f"{s.control.url}/status"  # the control process's page
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, timeout=120).stdout.decode()
    assert f"rankloop · {s.deployment}" in dom and 'id="served"' in dom and stack["worker"].name in dom
    assert f"v{outcome.version} · rejected" in dom  # the training run, under its new name
    assert 'id="activity"' in dom and "<rect" in dom  # events per minute drawn
    shot = tmp_path / "status.png"
    subprocess.run([*flags, f"--screenshot={shot}", page], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000


def test_the_training_lock_is_renewed_while_a_training_runs(stack):
    """A training longer than the lock's expiry must not let a second scheduler start one."""
    from redis import Redis

    from services.keys import Keys
    from services.storage.redis import RedisScheduleState

    redis = Redis.from_url(stack["settings"].redis_url)
    one, other = (RedisScheduleState(redis, Keys("lock-renewal-test")) for _ in range(2))  # two control replicas
    lock = one.try_lock(1.5)
    assert lock is not None
    with lock:
        expired_at = time.time() + 4  # more than twice the expiry
        while time.time() < expired_at:
            assert other.try_lock(1.5) is None and one.locked()
            time.sleep(0.5)
    assert not one.locked() and other.try_lock(1.5) is not None


def test_an_operator_pauses_the_schedule_and_sees_it_in_status_and_metrics(stack, trained):
    """Pause is an MLflow experiment tag: a paused scheduler does not train though labels are due;
    `rankloop schedule status` (a real process) and the control process's /metrics say so."""
    import json
    import os
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry

    from services.control import schedule as control
    from services.control.scheduler import Scheduler

    s = stack["settings"]
    registry, _ = trained
    running = stack["control"].scheduler
    eager = s.model_copy(update={"retrain": s.retrain.model_copy(update={"min_new_labels": 1})})
    scheduler = Scheduler(
        eager, running.promotions, running.registry, running.labels, running.state, running.activity, CollectorRegistry()
    )
    scheduler.state.write(last_labels=0)  # so labels are due
    control.pause(registry.client, s.keys.experiment, by="cli:ops", reason="index rebuild")
    try:
        assert scheduler.tick() is None
        st = scheduler.status()
        assert st.paused and st.paused.reason == "index rebuild" and st.next.startswith("paused by cli:ops")
        paused_metric = "rankloop_schedule_paused 1.0"  # the control process's own loop sees it at its next check
        wait_for(lambda: paused_metric in httpx.get(f"{s.control.url}/metrics").text, 60, what="paused on /metrics")
        status_cmd = [sys.executable, "-m", "services", "schedule", "status", "--json"]
        cli = subprocess.run(status_cmd, env={**os.environ}, capture_output=True, timeout=120)
        assert cli.returncode == 0, cli.stderr.decode()
        shown = json.loads(cli.stdout)
        assert shown["paused"]["by"] == "cli:ops" and shown["labels"] == st.labels > 0
    finally:
        assert control.resume(registry.client, s.keys.experiment) is not None
    assert control.paused(registry.client, s.keys.experiment) is None
    assert "labels" in scheduler.status().next  # no longer paused: the label rule speaks again


def test_promotion_hot_swaps_without_a_failed_request_and_rollback_restores(stack, trained):
    s = stack["settings"]
    registry, outcome = trained
    assert served_version(s) == "first-stage"
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def hammer():
        queries = ["blood pressure", "gene expression in tumours", "vaccine efficacy", "insulin resistance"]
        i = 0
        with httpx.Client(base_url=s.base_url, timeout=30) as http:
            while not stop.is_set():
                r = http.post("/rank", json={"query": f"{queries[i % 4]} {i}", "k": 5})
                results.append((r.status_code, r.json().get("model_version") if r.status_code == 200 else r.text))
                i += 1

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) >= 10, what="requests before the promotion")
    promotions = stack["control"].promotions
    assert promotions.promote(outcome.version, "test", actor="test").announced  # the model event is on the broker
    wait_for(lambda: served_version(s) == outcome.version, what="hot swap")
    swapped = len(results)
    wait_for(lambda: len(results) >= swapped + 10, what="requests after the swap")
    stop.set()
    for t in threads:
        t.join(timeout=60)

    assert results and all(code == 200 for code, _ in results), [r for r in results if r[0] != 200][:3]
    versions = [v for _, v in results]
    assert "first-stage" in versions and outcome.version in versions
    swapped_at = versions.index(outcome.version)
    assert set(versions[swapped_at:]) <= {outcome.version, "first-stage"}  # in-flight requests may finish on the old one
    assert versions[-1] == outcome.version

    with pytest.raises(InvalidState, match="no `previous`"):
        promotions.rollback("test", actor="test")
    second = registry.register(outcome.run_id)
    promotions.promote(second, "test", actor="test")
    stack["worker"].check_champion()
    assert served_version(s) == second
    event = promotions.rollback("test rollback", actor="test").event
    assert (event.version, event.previous_version) == (outcome.version, second)
    stack["worker"].check_champion()
    assert served_version(s) == outcome.version


def test_a_champion_no_worker_can_load_makes_health_not_ready_then_is_tagged_broken_and_rolled_back(
    stack, trained, tmp_path, monkeypatch
):
    """A truncated version promoted in MLflow: serving keeps the old model, says it is behind and
    reports its failed loads; after `serving.max_load_failures` of them the control process tags it
    broken and moves the alias back to the version serving has."""
    s = stack["settings"]
    registry, outcome = trained
    good = served_version(s)
    assert good != "first-stage" and registry.champion().version == good
    model = tmp_path / "model"
    shutil.copytree(registry.fetch(registry.get(good)), model)
    for weights in model.rglob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:1000])
    with mlflow.start_run(experiment_id=registry.client.get_run(outcome.run_id).info.experiment_id) as run:
        mlflow.log_artifacts(str(model), "model")
    broken = registry.register(run.info.run_id)

    watch = stack["control"].watch
    monkeypatch.setattr(watch, "max_failures", 10**6)  # hold the rollback back to look at health first
    monkeypatch.setattr(s.serving, "swap_grace_s", 0.0)
    stack["control"].promotions.promote(broken, "test: a truncated model", actor="test")

    def health() -> dict:
        return httpx.get(f"{s.base_url}/health/ready").json()

    wait_for(lambda: f"version {broken}:" in (health()["detail"] or ""), what="not ready, with the load error")
    assert health()["status"] == "behind"
    assert served_version(s) == good  # still serving, and serving the old model

    monkeypatch.setattr(watch, "max_failures", 3)
    wait_for(lambda: registry.champion().version == good, what="automatic rollback")
    # the alias moves first, then the rollback's audit tags are written
    wait_for(lambda: "rolled_back_by" in registry.client.get_model_version(registry.name, broken).tags, what="audit tags")
    tags = registry.client.get_model_version(registry.name, broken).tags
    assert "failed to load" in tags["broken"] and tags["rolled_back_by"] == "control"
    wait_for(lambda: httpx.get(f"{s.base_url}/health/ready").status_code == 200, what="ready again")
    assert served_version(s) == good


class RerankingApp(RankloopClient):
    """An application with a search engine of its own (played here by rankloop's first stage, read
    in-process): it sends its top 20 to /rerank and its users react to the /rerank answer."""

    def __init__(self, base_url: str, engine: FirstStage, user_secret: str):
        super().__init__(base_url, user_secret=user_secret)  # signs its users, as a backend that authenticated them
        self.engine = engine
        self.request_ids: list[str] = []

    def rank(self, query: str, k: int = 10, user: str | None = None, session: str | None = None, **_: object):
        answer = self.rerank(query, [c.doc_id for c in self.engine.search(query, 20)], top_n=k, user=user, session=session)
        self.request_ids.append(answer.request_id)
        return answer


def test_rerank_traffic_trains_a_version_that_the_gate_judges(stack, tmp_path):
    """Last in this module: its traffic adds labels the tests above must not see. Its versions go to
    a registry of its own, so what the stack serves is untouched."""
    from services.config import MlflowSettings
    from training.variants import subset

    s = stack["settings"]
    full = beir.load(stack["dataset"])
    ds = beir.load(subset(full, tmp_path / "head", {"train": 20}, len(full.corpus)))  # users ask 20 questions, often
    engine = FirstStage.current(s.state_dir)
    app = RerankingApp(s.base_url, engine, UserSecret(s.user_secret_file).ensure())
    stats = simulate(app, ds, "train", 400, UserModel(examination_curve(s.clicklog)), seed=11, progress=False)
    assert stats.accepted == stats.events > 0
    labels = open_labels(s.label_store_url)
    settle_labels(s, labels, timeout=180)
    df = labels.read()[0]
    assert df["request_id"].isin(app.request_ids).sum() >= stats.clicks  # every click on a /rerank answer is a label
    own = s.model_copy(update={"mlflow": MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")})
    registry = open_registry(own)
    cfg = TrainConfig(epochs=1, batch_size=8, max_seq_length=64, hard_negatives=1)
    gate = s.gate.model_copy(update={"min_requests": 50})  # 20 queries: a per-request verdict
    job = TrainingJob(work_dir=tmp_path, depth=20, train=cfg, gate=gate, rules=s.stream.rules)
    outcome = train_once(registry, labels, engine, job)
    # trained and judged on them; the verdict is not asserted: with this setup the gate passed in 2 of 4
    # runs (p 0.13 and 0.15 in the others). Head-query lift is the issue "Learning that earns its keep".
    assert outcome.version and outcome.run_id and outcome.status in ("passed", "rejected")
    run = registry.client.get_run(outcome.run_id)
    assert run.data.metrics["labels"] >= df["request_id"].isin(app.request_ids).sum()
    assert run.data.metrics["gate_requests"] + run.data.metrics["gate_queries"] > 0
