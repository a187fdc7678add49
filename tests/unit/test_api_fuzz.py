"""Schemathesis fuzzes the served OpenAPI document: whatever it sends, no answer is a 5xx, every 4xx
says why, and every answer matches the status codes, content types and schemas documented."""

from __future__ import annotations

import random

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from services.config import ServingSettings, Settings
from services.serve.app import create_app
from services.serve.worker import Worker
from services.storage.memory import MemoryDeadLetterLog, MemoryPublisher, memory_caches
from training.registry import MemoryRegistry


@pytest.fixture(scope="module")
def api(tiny_first_stage, tmp_path_factory):
    import shutil

    from training.ranking.first_stage import FirstStage

    state = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(tiny_first_stage.folder, state / "index", ignore=shutil.ignore_patterns("indexer.lock"))
    s = Settings(state_dir=state, serving=ServingSettings(max_body_bytes=100_000))
    worker = Worker(s, FirstStage(state / "index"), memory_caches(), MemoryPublisher(), MemoryRegistry(), rng=random.Random(0))
    app = create_app(s, worker, watch_events=False, dead_letters=MemoryDeadLetterLog(MemoryPublisher(), "dead"))
    with TestClient(app):  # runs the lifespan: the worker is in place for every fuzzed call
        yield schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_input_gets_a_server_error_and_every_refusal_says_why(api):
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/rank", "/rerank", "/documents", "/events", "/model", "/health/ready"}
    runs = [(op, GenerationMode.POSITIVE) for op in operations]
    writes = ("POST", "PUT", "DELETE")  # GETs take no input
    runs += [(op, GenerationMode.NEGATIVE) for op in operations if op.method.upper() in writes]
    for operation, mode in runs:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
        def fuzz(case) -> None:
            response = case.call()
            case.validate_response(response, checks=checks)
            if 400 <= response.status_code < 500:
                body = response.json()
                refused = body.get("rejected", body.get("refused", []))
                reasons = [body.get("detail")] if "detail" in body else [r["detail"] for r in refused]
                assert reasons and all(reasons), f"{response.status_code} without a reason: {response.text}"

        fuzz()
