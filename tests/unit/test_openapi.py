"""Every endpoint is in the OpenAPI document with its request and response models and an example."""

from __future__ import annotations

from unittest.mock import MagicMock

import pytest

from services.config import Settings
from services.serve.app import create_app


def test_openapi_documents_every_endpoint_with_models():
    spec = create_app(Settings(), worker=MagicMock()).openapi()
    paths = spec["paths"]
    assert set(paths) == {
        "/rank",
        "/rerank",
        "/documents",
        "/documents/{doc_id}",
        "/documents/delete",
        "/events",
        "/model",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/schemas",
        "/schemas/{name}",
        "/dead-letters",
        "/sdk/rankloop.js",
    }
    ok = lambda path, method: paths[path][method]["responses"]["200"]["content"]  # noqa: E731
    assert ok("/rank", "post")["application/json"]["schema"]["$ref"].endswith("/RankResponse")
    assert ok("/events", "post")["application/json"]["schema"]["$ref"].endswith("/EventsResponse")
    assert ok("/model", "get")["application/json"]["schema"]["$ref"].endswith("/ModelInfo")
    assert ok("/health/ready", "get")["application/json"]["schema"]["$ref"].endswith("/Health")
    assert "503" in paths["/events"]["post"]["responses"]
    body = paths["/events"]["post"]["requestBody"]["content"]["application/json"]
    assert body["example"][0]["type"] == "click"
    schemas = spec["components"]["schemas"]
    assert {"InteractionEvent", "InteractionType", "Rejection", "RejectCode"} <= set(schemas)
    assert paths["/documents"]["put"]["requestBody"]["content"]["application/json"]["example"][0]["id"] == "p-4983"
    for name in ("RankRequest", "RerankRequest", "RankResponse", "EventsResponse", "ModelInfo", "Health", "Document"):
        assert schemas[name].get("examples"), name
    for name in ("DocumentsResponse", "DeletedResponse", "DeleteDocuments"):
        assert schemas[name].get("examples"), name


def test_the_control_processs_openapi_documents_the_admin_routes():
    from services.control.app import create_app as create_control_app

    spec = create_control_app(Settings(), plane=MagicMock(), run_loops=False).openapi()
    assert set(spec["paths"]) == {
        "/admin/promote",
        "/admin/approve",
        "/admin/rollback",
        "/schedule",
        "/status",
        "/metrics",
        "/health/live",
        "/health/ready",
    }
    schemas = spec["components"]["schemas"]
    for name in ("PromoteRequest", "RollbackRequest", "ModelEvent", "ScheduleStatus"):
        assert name in schemas, name
    for name in ("PromoteRequest", "RollbackRequest", "ModelEvent"):
        assert schemas[name].get("examples"), name


@pytest.mark.parametrize("process", ["serve", "control"])
def test_every_endpoint_documents_an_example_of_its_answer_and_body(process):
    """What an emitter in another language reads first: each request and 200 answer has an example."""
    from services.control.app import create_app as create_control_app

    app = create_app(Settings(), worker=MagicMock()) if process == "serve" else create_control_app(Settings(), MagicMock())
    spec = app.openapi()
    components = spec["components"]["schemas"]

    def example_in(media: dict) -> bool:
        if "example" in media or "examples" in media:
            return True
        schema = media.get("schema", {})
        ref = schema.get("$ref") or schema.get("items", {}).get("$ref")
        return bool(ref) and "examples" in components[ref.split("/")[-1]]

    missing = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {})
            ok = op["responses"]["200"].get("content", {})
            if any(not example_in(m) for m in body.values()) or any(not example_in(m) for m in ok.values()):
                missing.append(f"{method} {path}")
    assert missing == []
