"""Two of the three deployed processes: serve and stream (the control process, `rankloop schedule`, is
in `schedule.py`)."""

from __future__ import annotations

import os
import sys

import typer

from services.cli.base import app, settings, setup_process


@app.command()
def serve(
    host: str = typer.Option(None, help="default: serving.host"),
    port: int = typer.Option(None, help="default: serving.port"),
    workers: int = typer.Option(1, min=1, help="processes sharing the port (and Redis): one per core"),
    threads: int = typer.Option(None, min=1, help="torch threads per worker (default: torch_threads, else 1)"),
) -> None:
    """Run the serving worker (FastAPI): /rank, /events, /model, /health/ready, /health/live, /metrics."""
    import uvicorn

    from services import logs
    from services.http import NoDelayProtocol

    s = settings()
    logs.configure(s.log_format)
    threads = threads or s.torch_threads or 1  # two threads on two busy cores: 102 ms p50 per encoding, one: 16 ms
    host, port = host or s.serving.host, port or s.serving.port
    s.serving = s.serving.model_copy(update={"host": host, "port": port})  # what each worker says it listens on
    if workers == 1:
        from services.serve.app import build_worker, create_app

        setup_process(s, threads)
        uvicorn.run(create_app(s, build_worker(s)), host=host, port=port, log_level="warning", http=NoDelayProtocol)
        return
    if s.tracking_uri.startswith("sqlite:"):
        from services.storage import open_registry

        open_registry(s)  # the first reader of a new sqlite database creates its tables: once, before workers race to
    # each worker process rebuilds these exact settings from a file
    os.environ["RANKLOOP_CONFIG"] = str(s.write_json(s.state_dir / "run" / "serve.json"))
    os.environ["RANKLOOP_TORCH_THREADS"] = str(threads)  # the supervisor loads no model: only its workers do
    uvicorn.run(
        "services.serve.app:app_from_environment",
        factory=True,
        workers=workers,
        host=host,
        port=port,
        log_level="warning",
        http=NoDelayProtocol,
    )


@app.command()
def stream() -> None:
    """Run the stream processor (faust worker): join, label, dead-letter, write the label store."""
    from services.storage.health import require
    from services.storage.kafka import create_topics
    from services.stream.app import create_app, spare_the_collector

    s = settings()
    setup_process(s)
    require(s, "kafka")
    create_topics(s.kafka.address, s.keys.topics(), s.kafka.partitions)
    faust_app = create_app(s)
    spare_the_collector()
    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    faust_app.main()
