"""Logging of the long-running processes: rankloop's lifecycle events at INFO, libraries at WARNING;
text lines, or one JSON object per line (`log_format = "json"`) for a log pipeline."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

QUIET = ("kafka", "aiokafka", "mlflow", "httpx", "urllib3", "sentence_transformers", "transformers", "faust", "mode")
TEXT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def configure(log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(name)s %(levelname)s %(message)s", rename_fields={"asctime": "time"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: already running" is expected
