"""The rules of netmesh, one module per aggregate, and every command's spec.

Each module declares its commands' specs beside their handlers (`SPECS`);
this registry is the only list of them. Everything else that needs a fact
about a command (dispatch, authorization, broker grants, `events verify`, the
CLI) looks it up here.
"""

from __future__ import annotations

from typing import Any

from controlplane.rules import (
    admins,
    dns,
    gateways,
    hooks,
    hosts,
    ingress,
    keys,
    nat,
    networks,
    nodes,
    policies,
    relays,
    tokens,
)
from controlplane.rules.spec import CommandSpec, Sender
from events.commands import Command

SPECS: tuple[CommandSpec[Any], ...] = (
    *networks.SPECS,
    *keys.SPECS,
    *nodes.SPECS,
    *policies.SPECS,
    *gateways.SPECS,
    *ingress.SPECS,
    *dns.SPECS,
    *hosts.SPECS,
    *admins.SPECS,
    *hooks.SPECS,
    *tokens.SPECS,
    *nat.SPECS,
    *relays.SPECS,
)
_BY_TYPE: dict[type[Command], CommandSpec[Any]] = {spec.command: spec for spec in SPECS}
_BY_VERB: dict[str, CommandSpec[Any]] = {spec.verb: spec for spec in SPECS}
if len(_BY_TYPE) != len(SPECS):  # two specs for one command: a mistake to stop at
    raise RuntimeError("a command has more than one spec")


def spec_for(command: Command) -> CommandSpec[Any]:
    """The spec of a command of the protocol (every one has a spec)."""
    return _BY_TYPE[type(command)]


def spec_for_verb(verb: str) -> CommandSpec[Any] | None:
    return _BY_VERB.get(verb)


def verbs_sent_by(*senders: Sender) -> tuple[str, ...]:
    return tuple(spec.verb for spec in SPECS if spec.sent_by in senders)
