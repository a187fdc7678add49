"""The error vocabulary every rankloop layer raises and the CLI and SDK report.

A message always says what failed and what to do about it; callers branch on the class, never on
the text.
"""

from __future__ import annotations


class RankloopError(Exception):
    """Anything rankloop reports to a person: the CLI prints it as one line and exits 1."""


class DependencyUnavailable(RankloopError):
    """The broker, Redis or MLflow cannot be reached; the message names it and how to start it."""


class NotFound(RankloopError):
    """A dataset, split, index, model version or file that does not exist."""


class InvalidState(RankloopError):
    """The request is valid but does not apply now (already the champion, nothing to roll back)."""


class InvalidInput(RankloopError):
    """An argument or setting that can never work (e.g. the eval split also feeding training)."""


class TooManyRequests(RankloopError):
    """A limit was reached; `retry_after` seconds until it lets the request through (a 429)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class RequestFailed(RankloopError):
    """The serving worker answered an SDK call with an unexpected status."""
