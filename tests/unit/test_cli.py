"""The CLI through typer's runner: help, config, and the one error path."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from services.cli import app
from tests.conftest import free_port

runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each command runs in its own folder; the logging it configures (on the runner's stream, closed
    after the command) is undone, so a later test's background thread never logs to a closed file."""
    import logging

    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "stream", "schedule", "promote", "rollback", "demo", "bench", "config"):
        assert command in result.output


def test_config_prints_the_groups_and_what_they_resolve_to(monkeypatch):
    monkeypatch.setenv("RANKLOOP_DEPLOYMENT", "shop")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["serving"]["rerank_depth"] == 50 and data["kafka"]["partitions"] == 2
    assert data["effective"]["model_name"] == "shop-reranker" and "shop.impressions" in data["effective"]["topics"]


def test_an_invalid_setting_is_one_error_line(monkeypatch):
    monkeypatch.setenv("RANKLOOP_TRAIN__DEBIAS", "sometimes")
    result = runner.invoke(app, ["config"])
    assert result.exit_code == 1
    assert "invalid configuration: train.debias" in result.output and "Traceback" not in result.output


def test_a_dependency_that_is_down_is_named_not_a_traceback(monkeypatch):
    monkeypatch.setenv("RANKLOOP_KAFKA__LOCAL_PORT", str(free_port()))
    monkeypatch.setenv("RANKLOOP_REDIS__LOCAL_PORT", str(free_port()))
    result = runner.invoke(app, ["status"])
    assert result.exit_code == 1 and "down" in result.output
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1 and "error:" in result.output and "--once" in result.output


@pytest.mark.parametrize(
    "command", [["dead-letters"], ["promote", "1"], ["rollback"], ["schedule", "status"], ["schedule", "pause"], ["models"]]
)
def test_a_command_whose_dependency_is_down_says_so_in_one_line_within_seconds(command, monkeypatch):
    """The operator's commands as a real process with the broker and Redis stopped: exit 1 within 10 s,
    one line naming what is down and how to start it, no traceback."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "RANKLOOP_KAFKA__LOCAL_PORT": str(free_port()), "RANKLOOP_REDIS__LOCAL_PORT": str(free_port())}
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"  # an MLflow server that is not there
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "services", *command], env=env, capture_output=True, text=True, timeout=60)
    took = time.time() - started
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and took < 10, (took, done.stderr[-1500:])
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert "not reachable" in lines[0] and ("rankloop up" in lines[0] or "RANKLOOP_" in lines[0] or "MLFLOW" in lines[0])


def test_bench_refuses_to_evaluate_on_its_training_split():
    result = runner.invoke(app, ["bench", "loop", "--train-split", "test", "--eval-split", "test"])
    assert result.exit_code == 1 and "must never feed training" in result.output


def test_serve_with_workers_runs_one_process_per_worker_from_the_same_settings(monkeypatch):
    import os

    import uvicorn

    calls = {}
    for name in ("RANKLOOP_CONFIG", "RANKLOOP_TORCH_THREADS"):  # the command sets them: undo after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("RANKLOOP_DEPLOYMENT", "shop")
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    result = runner.invoke(app, ["serve", "--workers", "2", "--port", "9100"])
    assert result.exit_code == 0, result.output
    assert calls["app"] == "services.serve.app:app_from_environment" and calls["factory"] and calls["workers"] == 2
    assert os.environ["RANKLOOP_TORCH_THREADS"] == "1"  # one torch thread per worker unless configured
    from services.config import Settings

    assert Settings().deployment == "shop" and Settings().torch_threads == 1  # what each worker will read


def test_sigterm_ends_a_command_through_its_finally_blocks(tmp_path):
    """A killed benchmark or demo still stops the workers, broker and Redis it started."""
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "cleaned-up"
    script = (
        "import time\n"
        "from services.cli.base import stop_cleanly_on_sigterm\n"
        "stop_cleanly_on_sigterm()\n"
        "try:\n"
        "    print('started', flush=True)\n"
        "    time.sleep(60)\n"
        "finally:\n"
        f"    open({str(marker)!r}, 'w').write('yes')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    started = time.time()
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM and time.time() - started < 30
    assert marker.read_text() == "yes"


def test_index_reads_a_file_with_a_field_mapping_and_corpus_shows_the_audited_load(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKLOOP_STATE_DIR", str(tmp_path / "state"))
    rows = [
        {"sku": "p1", "name": "Trail shoe", "body": "A waterproof trail running shoe.", "lang": "en", "year": 2022},
        {"sku": "p2", "name": "Broken", "body": "", "lang": "en", "year": 2020},
    ]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["index", "--input", str(tmp_path / "docs.jsonl"), "--id", "sku", "--text", "body", "--title", "name"]
    result = runner.invoke(app, [*args, "--field", "lang", "--field", "year:number"])
    assert result.exit_code == 0, result.output
    assert "stored 1, refused 1" in result.output and "row 2 (p2): text" in result.output
    assert "vectors: 1 in an exact snapshot" in result.output
    as_names = runner.invoke(app, [*args[:3], "--id", "sku", "--text", "name"])  # the names as texts: both stored
    assert as_names.exit_code == 0 and "stored 2, refused 0" in as_names.output
    shown = runner.invoke(app, ["corpus"])
    assert shown.exit_code == 0, shown.output
    assert "2 documents" in shown.output and "lang (keyword)" in shown.output and "upsert" in shown.output
    assert "vectors: 2 in an exact snapshot" in shown.output
    refused = runner.invoke(app, ["index", "--input", str(tmp_path / "docs.jsonl"), "--id", "nope"])
    assert refused.exit_code == 1 and "refused 2" in refused.output


def test_bench_replay_names_a_run_it_cannot_replay_instead_of_a_traceback(tmp_path):
    (tmp_path / "state" / "labels").mkdir(parents=True)
    summary = tmp_path / "repeat.json"
    summary.write_text(json.dumps({"seeds": [0, 1, 2], "runs": []}))  # a --repeat summary, not one seed's run
    result = runner.invoke(app, ["bench", "replay", str(summary), str(tmp_path / "state")])
    assert result.exit_code == 1 and "not a `bench loop` result of one seed" in result.output, result.output
    result = runner.invoke(app, ["bench", "replay", str(summary), str(tmp_path / "elsewhere")])
    assert result.exit_code == 1 and "elsewhere/labels does not exist" in result.output, result.output
