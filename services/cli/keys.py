"""API keys: create (the secret is printed once), list, revoke. Workers pick changes up by themselves."""

from __future__ import annotations

import typer

from services.auth import KeyStore, Scope, UserSecret, describe
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


@keys_app.command("user-secret")
def user_secret() -> None:
    """Prints the deployment's user-signing secret (made on first use): give it to the backend that
    authenticates your users, which signs their ids with it (`schemas.trust.sign_user`, or the SDK's
    `user_secret`). Feedback of a signed user counts as that user's; docs/security.md says why."""
    s = settings()
    secret = UserSecret(s.user_secret_file).ensure()
    console.print(f"user-signing secret of {s.user_secret_file} (keep it on servers, never in a browser):")
    print(secret)
