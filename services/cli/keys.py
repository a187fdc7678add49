"""API keys: create (the secret is printed once), list, revoke. Workers pick changes up by themselves."""

from __future__ import annotations

import typer

from services.auth import KeyStore, Scope, describe
from services.cli.base import app, console, settings

keys_app = typer.Typer(help="API keys for /rank, /events and admin routes (stored hashed)", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _store() -> KeyStore:
    return KeyStore(settings().keys_file)


@keys_app.command("create")
def create(
    name: str,
    scope: list[Scope] = typer.Option(..., "--scope", help="rank, events:write or admin; repeat for several"),
) -> None:
    """A new key with SCOPES; its secret is printed once and stored only as a hash."""
    key, secret = _store().create(name, scope)
    console.print(f"key [bold]{key.name}[/] ({', '.join(s.value for s in key.scopes)}): shown once, keep it now")
    print(secret)


@keys_app.command("list")
def list_keys() -> None:
    """Names, scopes and state of every key (never the secrets)."""
    console.print_json(describe(_store().read()))


@keys_app.command("revoke")
def revoke(name: str) -> None:
    """Revokes the active key NAME; workers refuse it from their next request."""
    _store().revoke(name)
    console.print(f"revoked {name}")
