"""Prometheus endpoints of the processes without an HTTP app (stream, scheduler)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


def serve_metrics(registry: CollectorRegistry, host: str, port: int, who: str) -> None:
    """Serves `registry` on http://host:port/metrics (port 0: not at all). A port already taken (a
    second worker on one machine) is a warning: that process counts, the first one serves."""
    if not port:
        return
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        log.warning("%s metrics not served on %s:%d: %s", who, host, port, e)
