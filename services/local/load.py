"""Load on a serving worker from a laptop: clients ranking distinct queries until stopped, every
answer recorded (the serving benchmark and the swap test drive serving with it)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Self

import httpx

CLIENTS = 8


class ClientThreads:
    """Client threads, each running `_client(n)` until the `with` block ends."""

    clients: int
    _stop: threading.Event
    _threads: list[threading.Thread]

    def _client(self, n: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


@dataclass
class Load(ClientThreads):
    """Clients sending distinct queries (every request a miss, in this load and across loads) until
    stopped; every answer recorded."""

    base_url: str
    queries: list[str]
    clients: int = CLIENTS
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    log: list[tuple[float, float, int, str]] = field(default_factory=list)  # (start, ms, status, version or request id)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self, n: int) -> None:
        rng = random.Random(n)
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            i = 0
            while not self._stop.is_set():
                query = f"{rng.choice(self.queries)} {self.tag}-{n}-{i}"  # never seen: a cache miss
                started = time.time()
                try:
                    r = http.post("/rank", json={"query": query, "k": 10})
                    body = r.json() if r.status_code == 200 else {}
                    self.log.append(
                        (
                            started,
                            (time.time() - started) * 1000,
                            r.status_code,
                            f"{body.get('model_version')}|{body.get('request_id')}",
                        )
                    )
                except httpx.HTTPError:
                    self.log.append((started, (time.time() - started) * 1000, 0, ""))
                i += 1

    def between(self, t0: float, t1: float) -> list[tuple[float, float, int, str]]:
        return [row for row in self.log if t0 <= row[0] < t1]
