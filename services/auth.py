"""API keys with scopes: who may rank, emit events, or move the model.

A key is shown once, at creation (`rankloop keys create`), and stored only as its SHA-256 (a key is
32 random bytes, so a fast hash is as safe as a slow one and costs nothing per request). The key file
is shared by every worker of a machine (or mounted from a secret store) and re-read when it changes,
so a revocation takes effect without a restart. With no key ever created and `auth.required` off, the
server runs open, as a local single-user default, and says so at start-up and in `/health/ready`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, Field

from schemas import InvalidInput, NotFound

KEY_PREFIX = "rk_"


class Scope(str, Enum):
    rank = "rank"  # POST /rank, GET /model
    events_write = "events:write"  # POST /events
    documents_write = "documents:write"  # PUT /documents, DELETE /documents
    admin = "admin"  # everything, including moving the model


class ApiKey(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    sha256: str
    scopes: list[Scope]
    created_at: float
    revoked_at: float | None = None

    def allows(self, scope: Scope) -> bool:
        return self.revoked_at is None and (scope in self.scopes or Scope.admin in self.scopes)


class KeyFile(BaseModel):
    keys: list[ApiKey] = []


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


class KeyStore:
    """The key file: created, listed and revoked by the CLI; checked by every request."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._loaded: tuple[int, int] | None = None  # (inode, mtime) of the file read last
        self._by_digest: dict[str, ApiKey] = {}
        self._any_key = False

    def read(self) -> KeyFile:
        if not self.path.exists():
            return KeyFile()
        return KeyFile.model_validate_json(self.path.read_text())

    def _write(self, keys: KeyFile) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(keys.model_dump_json(indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.path)  # atomic: a worker never reads half a file

    def create(self, name: str, scopes: list[Scope]) -> tuple[ApiKey, str]:
        """A new key; the secret is returned here and never stored."""
        keys = self.read()
        if any(k.name == name and k.revoked_at is None for k in keys.keys):
            raise InvalidInput(f"a key named {name!r} exists; revoke it first or choose another name")
        if not scopes:
            raise InvalidInput("a key needs at least one scope: rank, events:write, documents:write, admin")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(name=name, sha256=digest(secret), scopes=sorted(set(scopes), key=lambda s: s.value), created_at=time.time())
        keys.keys.append(key)
        self._write(keys)
        return key, secret

    def revoke(self, name: str) -> ApiKey:
        keys = self.read()
        for key in keys.keys:
            if key.name == name and key.revoked_at is None:
                key.revoked_at = time.time()
                self._write(keys)
                return key
        raise NotFound(f"no active key named {name!r}; `rankloop keys list` shows them")

    def _active(self) -> dict[str, ApiKey]:
        """Active keys by digest, re-read when the file changed (one stat per request; every write
        replaces the file, so a new inode says so even within the clock's resolution)."""
        try:
            st = self.path.stat()
            seen: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            seen = None
        with self._lock:
            if seen != self._loaded:
                keys = self.read().keys if seen is not None else []
                self._by_digest = {k.sha256: k for k in keys if k.revoked_at is None}
                self._any_key = bool(keys)
                self._loaded = seen
            return self._by_digest

    @property
    def enabled(self) -> bool:
        """Once a key was ever created, keys are required: revoking the last one closes the server."""
        self._active()
        return self._any_key

    def verify(self, secret: str) -> ApiKey | None:
        wanted = digest(secret)
        for known, key in self._active().items():  # constant-time per comparison
            if hmac.compare_digest(known, wanted):
                return key
        return None


class UserSecret:
    """The deployment's user-signing secret (`auth.user_secret_file`, mode 0600): an application's
    backend signs the ids of users it authenticated with it (`schemas.trust.sign_user`), and /rank
    counts feedback of a signed user as that user's. Re-read when the file changes, like the key file."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._loaded: tuple[tuple[int, int] | None, str | None] = (None, None)

    def get(self) -> str | None:
        """The secret, or None while there is none (then no user can be signed)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        seen = (st.st_ino, st.st_mtime_ns)
        with self._lock:
            if self._loaded[0] != seen:
                self._loaded = (seen, self.path.read_text().strip() or None)
            return self._loaded[1]

    def ensure(self) -> str:
        """The secret, made once if there is none."""
        if (found := self.get()) is not None:
            return found
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(secrets.token_urlsafe(32))
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, self.path)  # atomic and never replaces one another process just made
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return str(self.get())


def describe(keys: KeyFile) -> str:
    rows = [
        {"name": k.name, "scopes": [s.value for s in k.scopes], "created_at": k.created_at, "revoked": k.revoked_at is not None}
        for k in keys.keys
    ]
    return json.dumps(rows, indent=2)
