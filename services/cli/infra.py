"""Local infrastructure and configuration: config, up, status, down, ui."""

from __future__ import annotations

import json
import subprocess
import sys

import typer
from rich.table import Table

from services.cli.base import app, console, settings


@app.command()
def config() -> None:
    """Print the effective configuration (RANKLOOP_* env vars, MLFLOW_TRACKING_URI, RANKLOOP_CONFIG file)."""
    s = settings()
    console.print_json(json.dumps({**json.loads(s.model_dump_json()), "effective": s.effective()}))


@app.command()
def up() -> None:
    """Start the local broker (Tansu), Redis and MLflow store on 127.0.0.1 (what is not configured by URL)."""
    from services.local import infra

    _print_status(infra.up(settings()))


@app.command()
def status() -> None:
    """Check the broker, Redis and MLflow; exit 1 when one is down."""
    from services.storage.health import status as check

    comps = check(settings())
    _print_status(comps)
    if not all(c.up for c in comps):
        raise typer.Exit(1)


LOCAL_NOTES = {
    "kafka": "Tansu, MEMORY storage: a restart forgets every event (production: Apache Kafka)",
    "redis": "redis-server, append-only file under the state dir",
    "mlflow": "sqlite under the state dir, no server, no auth (single user)",
}


def _print_status(comps: list) -> None:
    t = Table("component", "address", "state", "managed here", "note")
    for c in comps:
        state = "[green]up[/]" if c.up else "[red]down[/]"
        t.add_row(
            c.name, c.address, state, "yes" if c.managed else "no (configured)", LOCAL_NOTES.get(c.name, "") if c.managed else ""
        )
    console.print(t)


@app.command()
def down() -> None:
    """Stop what `rankloop up` (and `rankloop demo`) started."""
    from services.local import infra

    stopped = infra.down(settings())
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@app.command()
def ui(port: int = 5000) -> None:
    """Start the MLflow UI on the tracking store."""
    s = settings()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        s.tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if s.mlflow.local:
        cmd += ["--default-artifact-root", s.artifact_dir.resolve().as_uri()]
    console.print(f"MLflow UI on http://127.0.0.1:{port}")
    raise typer.Exit(subprocess.call(cmd))
