"""Who vouches for a piece of feedback: signed user tokens and client network prefixes.

A `user` string in `/rank` is whatever the caller says, so it costs an attacker nothing to mint
thousands. What the server can vouch for is a user id the *application* signed with the deployment's
user-signing secret (`sign_user`, which the application's backend calls for the users it
authenticated), or else the network the request came from. Training counts feedback per such source
(docs/security.md, "Trust model"). Standard library only: an application's backend can copy this file.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import time

TOKEN_VERSION = "rl1"
MAX_TOKEN_CHARS = 512


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload: str) -> str:
    return _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest())


def sign_user(secret: str, user: str, ttl_s: float = 86400.0, now: float | None = None) -> str:
    """A token vouching that `user` is a user the application authenticated, valid for `ttl_s`:
    `rl1.<user, base64url>.<expiry, unix seconds>.<HMAC-SHA256, base64url>`."""
    expires = int((now if now is not None else time.time()) + ttl_s)
    payload = f"{TOKEN_VERSION}.{_b64(user.encode())}.{expires}"
    return f"{payload}.{_mac(secret, payload)}"


class BadToken(ValueError):
    """A user token that does not verify: the message says why, for a 422."""


def verify_user(secret: str, token: str, now: float | None = None) -> str:
    """The user id a token vouches for; BadToken if it was not signed with `secret` or has expired."""
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != TOKEN_VERSION:
        raise BadToken(f"user_token is not a {TOKEN_VERSION} token (rl1.<user>.<expiry>.<signature>)")
    payload = ".".join(parts[:3])
    if not hmac.compare_digest(_mac(secret, payload), parts[3]):
        raise BadToken("user_token's signature does not match this deployment's user-signing secret")
    try:
        user, expires = _unb64(parts[1]).decode(), int(parts[2])
    except (ValueError, UnicodeDecodeError):
        raise BadToken("user_token's user or expiry is malformed") from None
    if expires < (now if now is not None else time.time()):
        raise BadToken(f"user_token expired at {expires}; sign the user again")
    return user


def network_prefix(address: str | None) -> str | None:
    """The network a client address belongs to, as a source: IPv4 /24, IPv6 /48. Addresses in one
    prefix are one source: a thousand user ids from one network are one network's say."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    bits = 24 if ip.version == 4 else 48
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))
