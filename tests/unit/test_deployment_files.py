"""The compose and Kubernetes files: pinned to the client's MLflow, every process health-checked and bounded."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parents[2] / "infra"


def test_compose_pins_mlflow_to_the_client_and_health_checks_every_service():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert services["mlflow"]["image"].endswith(f":v{version('mlflow')}")
    missing = [name for name, svc in services.items() if name != "init" and "healthcheck" not in svc]
    assert missing == []
    assert all(c == {"condition": "service_healthy"} for c in services["init"]["depends_on"].values())
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    assert all(p.startswith("127.0.0.1:") for p in published)  # nothing on 0.0.0.0 by default


def test_every_kubernetes_container_has_probes_and_limits():
    docs = [d for d in yaml.safe_load_all((INFRA / "k8s" / "rankloop.yaml").read_text()) if d and d["kind"] == "Deployment"]
    containers = {c["name"]: c for d in docs for c in d["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"serve", "stream", "schedule"}
    for name, c in containers.items():
        assert "livenessProbe" in c and "startupProbe" in c, name
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]), name


def test_the_image_holds_only_what_runs():
    """A production image installs the `server` extra and leaves the laptop stack and the benchmarks out."""
    dockerfile = (INFRA / "Dockerfile").read_text()
    ignored = {line.strip() for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines() if line and line[0] != "#"}
    assert 'pip install --no-cache-dir ".[server]"' in dockerfile
    assert {"services/local", "services/bench", "tests"} <= ignored


def test_the_control_process_is_probed_on_its_admin_port_and_not_published():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    assert "8001/health" in " ".join(compose["schedule"]["healthcheck"]["test"]) and "ports" not in compose["schedule"]
    docs = [d for d in yaml.safe_load_all((INFRA / "k8s" / "rankloop.yaml").read_text()) if d]
    control = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "rankloop-control")
    assert control["spec"].get("type", "ClusterIP") == "ClusterIP" and control["spec"]["ports"][0]["port"] == 8001
