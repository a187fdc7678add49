"""The three deployed processes: serve, stream, schedule."""

from __future__ import annotations

import sys

from services.cli.base import app, settings, setup_process


@app.command()
def serve(host: str | None = None, port: int | None = None) -> None:  # type: ignore[assignment]
    """Run the serving worker (FastAPI): /rank, /events, /model, /health, /metrics."""
    import uvicorn

    from services.serve.app import build_worker, create_app

    s = settings()
    setup_process(s)
    worker = build_worker(s)
    uvicorn.run(create_app(s, worker), host=host or s.serving.host, port=port or s.serving.port, log_level="warning")


@app.command()
def stream() -> None:
    """Run the stream processor (faust worker): join, label, dead-letter, write the label store."""
    from services.storage.health import require
    from services.storage.kafka import create_topics
    from services.stream.app import create_app

    s = settings()
    setup_process(s)
    require(s, "kafka")
    create_topics(s.kafka.address, s.keys.topics(), s.kafka.partitions)
    faust_app = create_app(s)
    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    faust_app.main()


@app.command()
def schedule() -> None:
    """Retrain continuously: on N new labels or on the interval, one run at a time."""
    from services.schedule.scheduler import Scheduler

    s = settings()
    setup_process(s)
    Scheduler(s).run()
