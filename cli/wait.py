"""`--wait [SECONDS]` (default 30): after a command, until every host whose
desired state it changed has reported applying it; `status --wait`: until
every host in a network has. Prints the time it took (stderr: stdout stays the
command's own answer); on timeout exits 3 naming each host still behind and
why (offline, error, behind)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from cli.client import CliError, Login, connect, request
from events.connect import close_quickly
from events.subjects import query_subject

WAIT = "netmesh.wait"
DEFAULT_WAIT = 30.0
# Between two questions to the control plane while waiting (it reads one
# report per host each time): quick at first, a changed host applies in ms.
POLL_FIRST, POLL_MAX = 0.05, 0.5


F = TypeVar("F", bound=Callable[..., Any])


class NotConverged(click.ClickException):
    exit_code = 3


def _wait_for(ctx: click.Context, _param: click.Parameter, value: float | None) -> None:
    if value is not None:
        ctx.meta[WAIT] = value


def _wait_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--wait",
        type=click.FloatRange(min=0),
        is_flag=False,
        flag_value=DEFAULT_WAIT,
        default=None,
        expose_value=False,
        callback=_wait_for,
        metavar="[SECONDS]",
        help=help_text,
    )


waitable = _wait_option(
    "Return once every host it changed has applied it (default 30 s); "
    "exit 3 naming those that have not."
)
waitable_network = _wait_option(
    "First wait until every host in a network has applied its desired state "
    "(default 30 s); exit 3 naming those that have not."
)


def asked_wait() -> float | None:
    """--wait's seconds, if the command being run was given it."""
    seconds = click.get_current_context().meta.get(WAIT)
    return float(seconds) if seconds is not None else None


async def converge(
    server: str, login: Login, seq: int | None, command_id: str | None, timeout: float
) -> tuple[dict[str, Any], float]:
    """Ask until converged or `timeout`: (the last answer, seconds waited)."""
    started = time.monotonic()
    args = {k: v for k, v in (("seq", seq), ("command", command_id)) if v is not None}
    nc = await connect(server, login)
    try:
        pause = POLL_FIRST
        while True:
            answer = await request(nc, query_subject("convergence"), args, server)
            waited = time.monotonic() - started
            if answer["converged"] or waited >= timeout:
                return answer, waited
            await asyncio.sleep(min(pause, max(0.0, timeout - waited)))
            pause = min(pause * 2, POLL_MAX)
    finally:
        await close_quickly(nc)


def outcome(answer: dict[str, Any], waited: float, timeout: float) -> str:
    """The line to print when converged. Raises NotConverged (exit 3)."""
    hosts = answer["hosts"]
    if answer["converged"]:
        if not hosts:
            return "nothing to wait for: no host's desired state changed"
        return f"converged in {waited:.2f} s: {len(hosts)} host(s) applied it"
    late = [h for h in hosts if h["state"] != "applied"]
    named = ", ".join(f"{h['name']} ({h['state']}: {h['why']})" for h in late)
    raise NotConverged(
        f"not converged within {timeout:g} s: {len(late)} of {len(hosts)} host(s) "
        f"have not applied it: {named}"
    )


def wait_after_command(
    server: str, login: Login, seq: int | None, command_id: str, timeout: float
) -> None:
    """Once the command's own output is printed (the context closes), wait."""

    def wait() -> None:
        if seq is None:  # it appended nothing
            click.echo("nothing to wait for: the command changed nothing", err=True)
            return
        try:
            answer, waited = asyncio.run(converge(server, login, seq, command_id, timeout))
        except CliError as exc:
            raise click.ClickException(f"the command was applied, the wait failed: {exc}") from None
        click.echo(outcome(answer, waited, timeout), err=True)

    click.get_current_context().call_on_close(wait)
