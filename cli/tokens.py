"""`netmesh admin token ...`: bearer tokens for the read API and the dashboard
(`netmesh server --http`). Registered under `admin` by `cli.main`."""

from __future__ import annotations

from typing import Any

import click

from cli.main import (
    admin_command,
    admin_query,
    emit_json,
    json_option,
    parse_duration,
    plannable,
    run,
    table,
    when,
)
from events.commands import ROLES


@click.group("token")
def token() -> None:
    """Bearer tokens for the read API and the dashboard (read-only)."""


@token.command("create")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default="auditor",
    show_default=True,
    help="What it may read: everything (admin, auditor) or its networks (network-admin).",
)
@click.option(
    "--network", "networks", multiple=True, help="A network-admin token's network (repeatable)."
)
@click.option(
    "--expires", default="30d", show_default=True, help="Lifetime: 30m, 1h, 7d, 2w or never."
)
@json_option
@plannable
@click.pass_obj
def token_create(
    server: str, name: str, role: str, networks: tuple[str, ...], expires: str, as_json: bool
) -> None:
    """Make token NAME; print it (only it, once: only its SHA-256 is kept)."""
    result: dict[str, Any] = run(
        admin_command(
            server,
            "token.create",
            name=name,
            role=role,
            networks=list(networks),
            expires_in=parse_duration(expires),
        )
    )
    if as_json:
        emit_json(result)
    else:
        click.echo(result["token"])


@token.command("list")
@json_option
@click.pass_obj
def token_list(server: str, as_json: bool) -> None:
    """Tokens, their roles and state (never the tokens themselves)."""
    rows = run(admin_query(server, "tokens"))
    if as_json:
        emit_json(rows)
        return
    table(
        [
            (
                r["name"],
                r["role"],
                ",".join(r["networks"]) or "-",
                r["state"],
                when(r["expires_at"]),
                when(r["last_used_at"]),
            )
            for r in rows
        ],
        ["NAME", "ROLE", "NETWORKS", "STATE", "EXPIRES", "LAST USED"],
    )


@token.command("revoke")
@click.argument("name")
@json_option
@plannable
@click.pass_obj
def token_revoke(server: str, name: str, as_json: bool) -> None:
    """Token NAME no longer works (at once, on every replica)."""
    result = run(admin_command(server, "token.revoke", name=name))
    if as_json:
        emit_json(result)
    elif result.get("already_revoked"):
        click.echo(f"token {name} was revoked already")
    else:
        click.echo(f"revoked token {name}")
