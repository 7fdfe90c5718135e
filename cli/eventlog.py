"""`netmesh events log` (with filters), `events verify`, `events schema`,
`events diff`: the event log as a tool. Attached to the `events` group of
`cli.main`."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import click

from cli.client import CliError, connect, event_reader
from cli.main import admin_query, emit_json, events, json_option, login, run, when
from events.logfilter import (
    BadFilter,
    LogFilter,
    Point,
    beyond_the_log,
    check_type_pattern,
    parse_point,
)

if TYPE_CHECKING:
    from controlplane.audit import AuditReport
    from events.jetstream import JetStreamEventStore

since_option = click.option(
    "--since", default=None, metavar="SEQ|TIME", help="From this event (or time) on."
)
until_option = click.option(
    "--until", default=None, metavar="SEQ|TIME", help="Up to this event (or time)."
)


def _parsed(text: str | None) -> Point | None:
    if text is None:
        return None
    try:
        return parse_point(text)
    except BadFilter as exc:
        raise click.ClickException(str(exc)) from None


@events.command("log")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events.")
@since_option
@until_option
@click.option("--type", "type_pattern", default=None, help="Only these types, e.g. 'node.*'.")
@click.option(
    "--network", "network_name", default=None, help="Only this network's (and its members')."
)
@json_option
@click.pass_obj
def events_log(
    server: str,
    follow: bool,
    since: str | None,
    until: str | None,
    type_pattern: str | None,
    network_name: str | None,
    as_json: bool,
) -> None:
    """Print the events, oldest first (all of them, or those asked for)."""
    try:
        wanted = LogFilter(
            since=_parsed(since),
            until=_parsed(until),
            type_pattern=None if type_pattern is None else check_type_pattern(type_pattern),
            network=network_name,
        )
    except BadFilter as exc:
        raise click.ClickException(str(exc)) from None
    run(_events_log(server, follow, wanted, as_json))


def _beyond(point: Point | None, head: int) -> None:
    if point is not None and point.seq is not None and point.seq > head:
        raise CliError(beyond_the_log(point.seq, head))


@contextlib.asynccontextmanager
async def reading_events(server: str) -> AsyncIterator[tuple[JetStreamEventStore, int]]:
    """The event stream as this admin may read it, and its last sequence.
    Raises CliError (one line) for anything that stops the reading."""
    import nats.errors

    from events.jetstream import JetStreamEventStore
    from events.store import StoreError

    who = login()
    nc = await connect(server, who)
    try:
        store = JetStreamEventStore(nc, reader=event_reader(nc, who))
        try:
            head = await store.last_sequence()
        except Exception as exc:
            raise CliError(f"cannot read the event stream at {server}: {exc!r}") from None
        yield store, head
    except (StoreError, nats.errors.Error, TimeoutError) as exc:
        # The control plane made no consumer, or events were dropped on the way.
        raise CliError(f"cannot read the event stream at {server}: {exc}") from None
    finally:
        await nc.close()


async def _events_log(server: str, follow: bool, wanted: LogFilter, as_json: bool) -> None:
    import msgspec

    from events.envelope import encode_envelope

    async with reading_events(server) as (store, head):
        _beyond(wanted.since, head)
        _beyond(wanted.until, head)
        if head == 0 and not follow:
            return
        # Membership of --network is followed from the first event; otherwise
        # reading starts where it is asked to.
        start = 1
        if wanted.network is None and wanted.since is not None and wanted.since.seq is not None:
            start = max(wanted.since.seq, 1)
        async for recorded in store.follow(start):
            if wanted.past_until(recorded):
                return
            if wanted.wanted(recorded):
                env = recorded.envelope
                if as_json:
                    body = msgspec.json.decode(encode_envelope(env))
                    body["seq"] = recorded.seq
                    body["subject"] = recorded.subject
                    click.echo(json.dumps(body, sort_keys=True))
                else:
                    data = msgspec.to_builtins(env.data)
                    data.pop("type", None)
                    fields = " ".join(
                        f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in data.items()
                    )
                    click.echo(
                        f"{recorded.seq:>6} {when(env.time)} {env.type:<24} {fields}  [{env.actor}]"
                    )
                sys.stdout.flush()
            if not follow and recorded.seq >= head:
                return


@events.command("verify")
@click.option(
    "--root-key",
    default=None,
    help="The first admin's public key (base64), if you know it: otherwise the log's "
    "first admin is trusted, and printed.",
)
@json_option
@click.pass_obj
def events_verify(server: str, root_key: str | None, as_json: bool) -> None:
    """Check every event's signatures against the admins before it (exit 1 on a problem)."""
    report = run(_events_verify(server, root_key))
    if as_json:
        emit_json(
            {
                "events": report.events,
                "signed_commands": report.signed_commands,
                "unsigned_agent_events": report.unsigned_events,
                "root_key": report.root,
                "problems": [{"seq": seq, "problem": why} for seq, why in report.problems],
            }
        )
    else:
        click.echo(
            f"{report.events} events: {report.signed_commands} signed commands verified, "
            f"{report.unsigned_events} events without a proof (agents without a key), "
            f"{len(report.problems)} problems; root admin key {report.root or '-'}"
        )
        for seq, why in report.problems:
            click.echo(f"  event {seq}: {why}")
    if report.problems:
        sys.exit(1)


async def _events_verify(server: str, root_key: str | None) -> AuditReport:
    from controlplane.audit import verify_log

    async with reading_events(server) as (store, head):
        recorded = []
        if head:
            async for batch in store.follow_batches(1):
                recorded.extend(batch)
                if batch[-1].seq >= head:
                    break
        return verify_log(recorded, root_key)


@events.command("schema")
@click.argument("event_type", metavar="[TYPE]", required=False)
def events_schema(event_type: str | None) -> None:
    """Print the JSON Schema of the log's envelope (every event), or of TYPE's payload."""
    from events.schema import UnknownType, event_schema, log_schema

    try:
        emit_json(log_schema() if event_type is None else event_schema(event_type))
    except UnknownType as exc:
        raise click.ClickException(str(exc)) from None


@events.command("diff")
@click.argument("from_point", metavar="FROM")
@click.argument("to_point", metavar="TO")
@json_option
@click.pass_obj
def events_diff(server: str, from_point: str, to_point: str, as_json: bool) -> None:
    """What changed in the topology from FROM to TO (each an event's sequence or a time)."""
    import msgspec

    from projections.timetravel import Change

    since, until = _parsed(from_point), _parsed(to_point)
    answer = run(
        admin_query(server, "diff", at=msgspec.to_builtins(since), to=msgspec.to_builtins(until))
    )
    if as_json:
        emit_json(answer)
        return
    changes = [msgspec.convert(c, Change) for c in answer["changes"]]
    span = f"from #{answer['from']} to #{answer['to']}"
    if not changes:
        click.echo(f"{span}: nothing changed")
        return
    click.echo(f"{span}: {len(changes)} change(s)")
    for change in changes:
        click.echo(str(change))
