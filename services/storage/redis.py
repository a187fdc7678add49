"""Redis: the rank cache, document embeddings per model version and intake de-duplication, shared by
every serving replica."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, cast

import numpy as np
from redis import Redis
from redis.exceptions import LockError, RedisError
from redis.lock import Lock

from schemas import DependencyUnavailable
from services.keys import Keys
from services.storage.protocols import Caches, WorkerReport

log = logging.getLogger("rankloop.redis")


class RedisRankCache:
    """Raises DependencyUnavailable when Redis is down: the caller serves without the cache."""

    def __init__(self, redis: Redis, ttl_s: int):
        self.redis, self.ttl = redis, ttl_s

    def get(self, key: str) -> Any | None:
        try:
            raw = self.redis.get(key)
        except RedisError as e:
            raise DependencyUnavailable(f"redis: {e}") from e
        return json.loads(raw) if raw else None

    def set(self, key: str, value: Any) -> None:
        try:
            self.redis.set(key, json.dumps(value), ex=self.ttl)
        except RedisError as e:
            raise DependencyUnavailable(f"redis: {e}") from e


class RedisEmbeddingCache:
    """Document embeddings per model version, float16: replicas share them and a promotion fills the
    new version's cache lazily instead of re-embedding the corpus."""

    def __init__(self, redis: Redis, keys: Keys, ttl_s: int = 7 * 24 * 3600):
        self.redis, self.keys, self.ttl = redis, keys, ttl_s

    def get_many(self, version: str, doc_ids: list[str]) -> dict[str, np.ndarray]:
        """Nothing found while Redis is down: the caller computes the embeddings itself."""
        try:
            raws = self.redis.mget([self.keys.embedding(version, d) for d in doc_ids]) if doc_ids else []
        except RedisError as e:
            log.warning("embedding cache unavailable: %s", e)
            return {}
        return {d: np.frombuffer(cast(bytes, r), dtype=np.float16).astype(np.float32) for d, r in zip(doc_ids, raws) if r}

    def put_many(self, version: str, vectors: Mapping[str, np.ndarray]) -> None:
        pipe = self.redis.pipeline()
        for d, v in vectors.items():
            pipe.set(self.keys.embedding(version, d), np.asarray(v, dtype=np.float16).tobytes(), ex=self.ttl)
        try:
            pipe.execute()
        except RedisError as e:
            log.warning("embedding cache unavailable: %s", e)


SEEN_SCRIPT = """
for i = 1, #KEYS do
  if redis.call('SISMEMBER', KEYS[i], ARGV[1]) == 1 then return 0 end
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


class RedisSeenEvents:
    """Event ids seen in the last `ttl_s`, as 8-byte hashes in one Redis set per time bucket (a sixth
    of the TTL wide; a bucket expires whole): 73 bytes per id against 125 for a key with a TTL per id
    (`rankloop bench dedup`); two different ids share a hash once in ~10^19 pairs."""

    BUCKETS = 6

    def __init__(self, redis: Redis, keys: Keys, ttl_s: int):
        self.redis, self.keys, self.ttl = redis, keys, ttl_s
        self.width = max(1, ttl_s // self.BUCKETS)
        self.script = redis.register_script(SEEN_SCRIPT)

    def _buckets(self) -> list[str]:
        """The current bucket first, then the older ones the TTL still covers."""
        now = int(time.time()) // self.width
        return [self.keys.seen_events(b) for b in range(now, now - self.BUCKETS - 1, -1)]

    @staticmethod
    def _hash(event_id: str) -> bytes:
        return hashlib.blake2b(event_id.encode(), digest_size=8).digest()

    def first_sighting(self, event_id: str) -> bool:
        try:
            keep = self.width * (self.BUCKETS + 1)
            return bool(self.script(keys=self._buckets(), args=[self._hash(event_id), keep]))
        except RedisError as e:
            raise DependencyUnavailable(f"de-duplication needs Redis, which is unavailable ({e})") from e

    def forget(self, event_id: str) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            for key in self._buckets():
                pipe.srem(key, self._hash(event_id))
            pipe.execute()
        except RedisError as e:
            raise DependencyUnavailable(f"de-duplication needs Redis, which is unavailable ({e})") from e


TOKEN_BUCKET = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = math.min(burst, (tonumber(b[1]) or burst) + math.max(0, now - (tonumber(b[2]) or now)) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


NEW_IDENTITY = """
if redis.call('EXISTS', KEYS[1]) == 1 then return '0' end
""" + TOKEN_BUCKET.replace("KEYS[1]", "KEYS[2]").replace(
    "return tostring(wait)", "if wait == 0 then redis.call('SET', KEYS[1], 1, 'EX', ARGV[3]) end\nreturn tostring(wait)"
)


class RedisRateLimiter:
    """A token bucket per identity in one Lua script (atomic across replicas, Redis's own clock)."""

    def __init__(self, redis: Redis, keys: Keys):
        self.keys = keys
        self.script = redis.register_script(TOKEN_BUCKET)
        self.new_identity = redis.register_script(NEW_IDENTITY)

    def take(self, identity: str, rate_per_s: float, burst: float) -> float:
        try:
            return float(self.script(keys=[self.keys.rate_bucket(identity)], args=[rate_per_s, burst]))
        except RedisError as e:
            raise DependencyUnavailable(f"redis: {e}") from e

    def admit_identity(self, scope: str, identity: str, rate_per_s: float, burst: float, remember_s: float) -> float:
        digest = hashlib.blake2b(identity.encode(), digest_size=8).hexdigest()
        keys = [self.keys.known_identity(scope, digest), self.keys.new_identity_bucket(scope)]
        try:
            return float(self.new_identity(keys=keys, args=[rate_per_s, burst, int(remember_s)]))
        except RedisError as e:
            raise DependencyUnavailable(f"redis: {e}") from e


class RedisActivity:
    KEEP_MINUTES = 24 * 60

    def __init__(self, redis: Redis, keys: Keys):
        self.redis, self.keys = redis, keys

    def count(self, counts: dict[str, int], at: float | None = None) -> None:
        key = self.keys.activity(int((at or time.time()) // 60))
        pipe = self.redis.pipeline(transaction=False)
        for field, n in counts.items():
            if n:
                pipe.hincrby(key, field, n)
        pipe.expire(key, self.KEEP_MINUTES * 60)
        try:
            pipe.execute()
        except RedisError as e:
            log.warning("activity counts not recorded: %s", e)

    def minutes(self, last: int, now: float | None = None) -> list[tuple[int, dict[str, int]]]:
        end = int((now or time.time()) // 60)
        span = list(range(end - last + 1, end + 1))
        pipe = self.redis.pipeline(transaction=False)
        for minute in span:
            pipe.hgetall(self.keys.activity(minute))
        try:
            rows = pipe.execute()
        except RedisError as e:
            raise DependencyUnavailable(f"redis: {e}") from e
        return [(m, {k.decode(): int(v) for k, v in row.items()}) for m, row in zip(span, rows)]

    def count_online(self, counts: dict[str, dict[str, float]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for version, fields in counts.items():
            for field, n in fields.items():
                if n:
                    pipe.hincrbyfloat(self.keys.online(version), field, n)
        try:
            pipe.execute()
        except RedisError as e:
            log.warning("online counts not recorded: %s", e)

    def online(self, version: str) -> dict[str, float]:
        raw = self.redis.hgetall(self.keys.online(version))
        return {k.decode(): float(v) for k, v in raw.items()}  # type: ignore[union-attr]


class RedisFleet:
    def __init__(self, redis: Redis, keys: Keys):
        self.redis, self.keys = redis, keys

    def report(self, report: WorkerReport) -> None:
        try:
            self.redis.hset(self.keys.fleet, report.worker, report.model_dump_json())
        except RedisError as e:
            log.warning("worker report not recorded: %s", e)

    def reports(self, max_age_s: float) -> list[WorkerReport]:
        try:
            raws = self.redis.hgetall(self.keys.fleet)
        except RedisError as e:
            raise DependencyUnavailable(f"redis: {e}") from e
        found = [WorkerReport.model_validate_json(v) for v in raws.values()]
        stale = [r.worker for r in found if r.at < time.time() - max_age_s]
        if stale:  # workers that stopped: forgotten (a worker that comes back reports again)
            self.redis.hdel(self.keys.fleet, *stale)
        return [r for r in found if r.worker not in stale]


def redis_caches(redis: Redis, keys: Keys, ttl_s: int, seen_ttl_s: int) -> Caches:
    def ping() -> bool:
        try:
            return bool(redis.ping())
        except RedisError:
            return False

    return Caches(
        RedisRankCache(redis, ttl_s),
        RedisEmbeddingCache(redis, keys),
        RedisSeenEvents(redis, keys, seen_ttl_s),
        ping,
        RedisRateLimiter(redis, keys),
        RedisActivity(redis, keys),
        RedisFleet(redis, keys),
    )


class RenewedLock:
    """A Redis lock renewed every third of its expiry while a training runs, so a long one never loses
    it to a second scheduler; a lock Redis forgot (a restart) is taken again if it is free."""

    def __init__(self, lock: Lock, ttl_s: float):
        self.lock, self.ttl_s = lock, ttl_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._renew, name="training-lock", daemon=True)

    def __enter__(self) -> RenewedLock:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        try:
            self.lock.release()
        except LockError as e:  # Redis restarted mid-training and forgot the lock: nothing to release
            log.warning("training lock was lost while training (Redis restarted?): %s", e)

    def _renew(self) -> None:
        while not self.done.wait(self.ttl_s / 3):
            try:
                self.lock.reacquire()
            except LockError:
                try:
                    lost = not self.lock.acquire(blocking=False)
                except RedisError as e:
                    lost = True
                    log.warning("training lock not renewed: %s", e)
                if lost:
                    log.warning("training lock lost and now held elsewhere (Redis restarted?)")
            except RedisError as e:
                log.warning("training lock not renewed (Redis away?): %s", e)


class RedisScheduleState:
    def __init__(self, redis: Redis, keys: Keys):
        self.redis, self.keys = redis, keys

    def read(self) -> dict[str, str]:
        try:
            raw = self.redis.hgetall(self.keys.train_state)
        except RedisError as e:
            raise DependencyUnavailable(f"redis: {e}") from e
        return {k.decode(): v.decode() for k, v in raw.items()}  # type: ignore[union-attr]

    def write(self, **fields: float | str) -> None:
        self.redis.hset(self.keys.train_state, mapping=fields)  # type: ignore[arg-type]

    def add_failure(self) -> int:
        return int(self.redis.hincrby(self.keys.train_state, "failures", 1))

    def try_lock(self, ttl_s: float) -> RenewedLock | None:
        # thread_local=False: the renewing thread needs the token
        lock = self.redis.lock(self.keys.train_lock, timeout=ttl_s, blocking=False, thread_local=False)
        return RenewedLock(lock, ttl_s) if lock.acquire(blocking=False) else None

    def locked(self) -> bool:
        try:
            return bool(self.redis.exists(self.keys.train_lock))
        except RedisError as e:
            raise DependencyUnavailable(f"redis: {e}") from e
