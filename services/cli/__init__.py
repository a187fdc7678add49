"""`rankloop`: one console script for every process and chore, a module per command group."""

from services.cli import data, infra, keys, labels, local, models, processes, schedule  # noqa: F401 - each registers its commands
from services.cli.base import app


def main() -> None:
    app()


__all__ = ["app", "main"]
