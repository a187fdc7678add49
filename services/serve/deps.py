"""Typed dependencies of the serving routes: the worker, and the rate limits per API key."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from schemas import DependencyUnavailable
from services.auth import digest
from services.config import AuthSettings
from services.http import Credentials, bearer
from services.serve.worker import Worker

log = logging.getLogger("rankloop.serve")


def get_worker(request: Request) -> Worker:
    return request.app.state.worker


WorkerDep = Annotated[Worker, Depends(get_worker)]


class RateLimit:
    """A route dependency answering 429 with Retry-After once the caller's API key has used its bucket
    (an open, keyless server trusts its callers and is not limited). With Redis down it lets requests
    through: ranking must not depend on Redis, and a limiter failing closed would be an outage."""

    down = False  # logged once per outage, for every route

    def __init__(self, rate: Callable[[AuthSettings], float]):
        self.rate = rate

    def __call__(self, request: Request, worker: WorkerDep, credentials: Credentials = Depends(bearer)) -> None:
        auth = worker.s.auth
        rate_per_s = self.rate(auth)
        if rate_per_s <= 0 or credentials is None:
            return
        bucket = f"key:{digest(credentials.credentials)[:16]}"
        try:
            wait = worker.caches.limits.take(bucket, rate_per_s, max(1.0, rate_per_s * auth.burst_s))
        except DependencyUnavailable as e:
            if not RateLimit.down:
                log.warning("rate limits not enforced while their store is down: %s", e)
            RateLimit.down = True
            return
        RateLimit.down = False
        if wait > 0:
            worker.metrics.rate_limited.labels(request.url.path).inc()
            detail = f"rate limit of {rate_per_s:g} requests/s exceeded; retry in {wait:.1f}s"
            raise HTTPException(429, detail, headers={"Retry-After": str(math.ceil(wait))})


rank_limit = RateLimit(lambda auth: auth.rank_per_s)
events_limit = RateLimit(lambda auth: auth.events_per_s)
