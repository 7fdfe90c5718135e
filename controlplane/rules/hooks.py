"""The hook aggregate: webhooks, each its own subject (`netmesh.ev.hook.<id>`).
A hook's id and HMAC secret derive from the command that adds it (as an
enrollment key's do): the log holds the secret's SHA-256, never the secret."""

from __future__ import annotations

from urllib.parse import urlsplit

from controlplane.rules.base import Context, Decision, Rejected, guard, one_event
from controlplane.rules.spec import ByAdmin, CommandSpec, Need, Produces
from events.commands import AddHook, ErrorCode, RemoveHook
from events.logfilter import BadFilter, check_type_pattern
from events.model import HookAdded, HookRemoved
from events.subjects import aggregate_subject
from events.tokens import secret_digest
from projections.topology import Topology


def hook_subject(hook_id: str) -> str:
    return aggregate_subject("hook", hook_id)


def add_hook(topology: Topology, cmd: AddHook, ctx: Context) -> Decision:
    url = urlsplit(cmd.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise Rejected(ErrorCode.INVALID, f"{cmd.url!r} is not an http:// or https:// URL")
    try:
        check_type_pattern(cmd.events)
    except BadFilter as exc:
        raise Rejected(ErrorCode.INVALID, str(exc)) from None
    hook_id = "w" + ctx.new_key_id.removeprefix("k")
    subject = hook_subject(hook_id)
    event = HookAdded(
        hook_id=hook_id, url=cmd.url, events=cmd.events, secret_sha256=secret_digest(ctx.new_secret)
    )
    return Decision(
        events=((subject, event),),
        expect=(guard(topology, subject),),
        result={"hook_id": hook_id, "url": cmd.url, "events": cmd.events},
    )


ADD = CommandSpec[AddHook](
    AddHook,
    add_hook,
    ByAdmin(),  # no scope: a hook sees every network's events
    Produces((HookAdded,), agree=(("url", "url"), ("events", "events"))),
    needs=frozenset({Need.FRESH_KEY, Need.HOOK_SECRET}),
)


def remove_hook(topology: Topology, cmd: RemoveHook, _ctx: Context) -> Decision:
    if cmd.hook_id not in topology.hooks:
        raise Rejected(ErrorCode.NOT_FOUND, f"no hook {cmd.hook_id!r}")
    subject = hook_subject(cmd.hook_id)
    return one_event(topology, subject, HookRemoved(hook_id=cmd.hook_id), {"hook_id": cmd.hook_id})


REMOVE = CommandSpec[RemoveHook](
    RemoveHook, remove_hook, ByAdmin(), Produces((HookRemoved,), about=("hook_id", "hook_id"))
)

SPECS = (ADD, REMOVE)
