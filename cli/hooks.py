"""`netmesh hook add/list/remove/test`: webhooks (delivered by the control
plane: controlplane/hooks.py). Attached to the root group of `cli.main`."""

from __future__ import annotations

from pathlib import Path

import click

from cli.main import (
    admin_command,
    admin_query,
    cli,
    emit_json,
    json_option,
    plannable,
    run,
    table,
    when,
)
from cli.secretfile import removed_on_failure
from cli.secretfile import secret_file as secret_file_for
from cli.wait import waitable


@cli.group()
def hook() -> None:
    """Webhooks: the events POSTed to a URL as they happen."""


@hook.command("add")
@click.argument("url")
@click.option("--events", "pattern", default="*", show_default=True, help="e.g. 'node.*'.")
@click.option(
    "--secret-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the hook's HMAC secret here (mode 0600) instead of printing it.",
)
@json_option
@plannable
@waitable
@click.pass_obj
def hook_add(server: str, url: str, pattern: str, secret_file: Path | None, as_json: bool) -> None:
    """POST each event matching --events to URL, in order, at least once,
    signed (header Netmesh-Signature: sha256=HMAC of the body)."""
    out = secret_file_for(secret_file, "the secret", exclusive=False)
    with removed_on_failure(out):
        result = run(admin_command(server, "hook.add", url=url, events=pattern))
    secret = result.pop("secret")
    if out is not None:
        out.write(secret + "\n")
    else:
        result["secret"] = secret
    if as_json:
        emit_json(result)
        return
    click.echo(f"added hook {result['hook_id']}: {result['events']} -> {result['url']}")
    if secret_file is None:
        click.echo(f"secret (shown once): {secret}")


@hook.command("list")
@json_option
@click.pass_obj
def hook_list(server: str, as_json: bool) -> None:
    """Hooks, and how their deliveries go (a failing one: since when, and why)."""
    rows = run(admin_query(server, "hooks"))
    if as_json:
        emit_json(rows)
        return
    table(
        [
            (
                r["hook_id"],
                r["events"],
                r["url"],
                r["state"]
                if r["state"] == "ok"
                else f"failing since {when(r['failing_since'])} ({r['failures']}x): "
                f"{r['last_error']}",
                r["pending"],
                r["delivered"] or "-",
            )
            for r in rows
        ],
        ["HOOK", "EVENTS", "URL", "STATE", "PENDING", "DELIVERED"],
    )


@hook.command("remove")
@click.argument("hook_id", metavar="HOOK")
@plannable
@waitable
@click.pass_obj
def hook_remove(server: str, hook_id: str) -> None:
    """Stop delivering to HOOK (what it has not delivered yet is not sent)."""
    run(admin_command(server, "hook.remove", hook_id=hook_id))
    click.echo(f"removed hook {hook_id}")


@hook.command("test")
@click.argument("hook_id", metavar="HOOK")
@json_option
@click.pass_obj
def hook_test(server: str, hook_id: str, as_json: bool) -> None:
    """POST a signed `hook.test` message to HOOK's URL now; exit 1 unless it answers 2xx."""
    answer = run(admin_query(server, "hook_test", name=hook_id))
    if as_json:
        emit_json(answer)
    elif answer["ok"]:
        click.echo(f"hook {hook_id}: HTTP {answer['status']} in {answer['seconds']} s")
    if not answer["ok"]:
        why = answer.get("error") or f"HTTP {answer['status']}"
        raise click.ClickException(f"hook {hook_id} did not take the test message: {why}")
