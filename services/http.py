"""What the two HTTP processes (serving replicas and the control process) share: API keys as a
dependency per route, the body limit, JSON parsing that answers 400 with the reason, and 422s that
never echo the input back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from uvicorn.protocols.http.h11_impl import H11Protocol

from schemas import ErrorBody, InvalidInput, TooManyRequests
from schemas.trust import network_prefix
from services.auth import ApiKey, KeyStore, Scope
from services.config import Settings

bearer = HTTPBearer(auto_error=False, description="an API key from `rankloop keys create`")
Credentials = HTTPAuthorizationCredentials | None

NO_KEY: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no valid API key"},
    403: {"model": ErrorBody, "description": "the key lacks the scope"},
}
BAD_BODY: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "malformed JSON"},
    413: {"model": ErrorBody, "description": "body larger than serving.max_body_bytes"},
}


class KeyGate:
    """The key file and whether keys are required: with no key ever created and `auth.required` off,
    everything is open (the local default) and the process says so."""

    def __init__(self, keys: KeyStore, required: bool):
        self.keys, self.required = keys, required

    @property
    def open(self) -> bool:
        return not (self.required or self.keys.enabled)


def new_app(s: Settings, title: str, description: str, lifespan: Callable[[FastAPI], Any]) -> FastAPI:
    """An app of either HTTP process: 422s without the input echoed, the body limit, the settings and
    the key gate in `app.state` (the dependencies below read them)."""
    app = FastAPI(
        title=title,
        lifespan=lifespan,
        description=description,
        exception_handlers={RequestValidationError: validation_error, InvalidInput: invalid_input, TooManyRequests: too_many},
    )
    app.state.settings = s
    app.state.key_gate = KeyGate(KeyStore(s.keys_file), s.auth.required)
    app.add_middleware(BodyLimit, limit=s.serving.max_body_bytes)
    return app


def caller(*scopes: Scope) -> Callable[..., ApiKey | None]:
    """A route dependency: 401 without a valid key, 403 without one of `scopes`; None on an open
    server. Reads the app's `KeyGate` (`app.state.key_gate`)."""

    def check(request: Request, credentials: Credentials = Depends(bearer)) -> ApiKey | None:
        gate: KeyGate = request.app.state.key_gate
        if gate.open:
            return None
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise HTTPException(401, "an API key is required: send `Authorization: Bearer rk_...`", headers=challenge)
        key = gate.keys.verify(credentials.credentials)
        if key is None:
            raise HTTPException(401, "unknown or revoked API key", headers=challenge)
        if not any(key.allows(scope) for scope in scopes):
            wanted = " or ".join(repr(scope.value) for scope in scopes)
            raise HTTPException(403, f"the key {key.name!r} lacks the {wanted} scope")
        return key

    return check


def admin(request: Request, credentials: Credentials = Depends(bearer)) -> str:
    """Moving the model always needs an admin key, even on a process that is otherwise open; the
    key's name is who the move is audited as."""
    gate: KeyGate = request.app.state.key_gate
    key = gate.keys.verify(credentials.credentials) if credentials else None
    if key is None:
        raise HTTPException(
            401,
            "moving the model needs an admin key, even on an open server: `rankloop keys create NAME --scope admin`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not key.allows(Scope.admin):
        raise HTTPException(403, f"the key {key.name!r} lacks the 'admin' scope")
    return f"key:{key.name}"


def pages(request: Request, credentials: Credentials = Depends(bearer)) -> None:
    """/metrics and /status: open with `auth.metrics_public` (a scraper inside the network), else admin."""
    if request.app.state.settings.auth.metrics_public:
        return
    caller(Scope.admin)(request, credentials)


class BodyLimit:
    """ASGI middleware: refuses a body over `limit` bytes with 413 as soon as the declared length or the
    bytes read so far exceed it, so a 200 MB post never sits in memory."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body over the limit of {self.limit} bytes (serving.max_body_bytes)"
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await JSONResponse({"detail": too_large}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, too_large)  # FastAPI passes it through body parsing as a 413
            return message

        await self.app(scope, limited, send)


def parse_json(body: bytes) -> Any:
    """The body as JSON, or 400 with the reason: malformed, not UTF-8, NaN/Infinity (not JSON, and
    no score or time can be NaN), or nested too deep to parse."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    try:
        return json.loads(body, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise HTTPException(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise HTTPException(400, "malformed JSON: nested too deep") from None


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with where and what, without echoing the input back (it may be huge, or not encodable)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors]
    return JSONResponse({"detail": detail}, status_code=422)


async def invalid_input(request: Request, exc: Exception) -> JSONResponse:
    """A request that passed its schema but not the server's checks (an undeclared filter field, an
    unknown candidate id): 422 with what was wrong."""
    return JSONResponse({"detail": str(exc)}, status_code=422)


async def too_many(request: Request, exc: Exception) -> JSONResponse:
    """A limit the server checks past the route's dependencies (new identities per key): 429 with Retry-After."""
    wait = exc.retry_after if isinstance(exc, TooManyRequests) else 1.0
    return JSONResponse({"detail": str(exc)}, status_code=429, headers={"Retry-After": str(max(1, math.ceil(wait)))})


def client_network(request: Request, trusted_proxies: list[str]) -> str | None:
    """The network prefix of the client (`schemas.trust.network_prefix`): the socket's peer, or, when the
    peer is one of `auth.trusted_proxies`, the last address its X-Forwarded-For appended."""
    peer = request.client.host if request.client else None
    if peer in trusted_proxies:
        forwarded = [a.strip() for a in request.headers.get("x-forwarded-for", "").split(",") if a.strip()]
        peer = forwarded[-1] if forwarded else peer
    return network_prefix(peer)


class NoDelayProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with Nagle's algorithm off on every connection. Under `serve
    --workers N` uvicorn binds the socket itself with protocol number 0, so asyncio does not turn
    on TCP_NODELAY for the connections it accepts, and a response written in two parts waits for
    the client's delayed ACK: a cache hit took 48 ms p50 with two workers instead of 3.5 ms."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
