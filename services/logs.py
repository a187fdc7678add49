"""Logging of the long-running processes: rankloop's lifecycle events at INFO, libraries at WARNING."""

from __future__ import annotations

import logging
import sys

QUIET = ("kafka", "aiokafka", "mlflow", "httpx", "urllib3", "sentence_transformers", "faust", "mode")


def configure() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: already running" is expected
