"""A command's spec: everything the control plane knows about one command, in
one declaration beside its handler.

From the specs come the dispatch (`decide`), who may send what (`authorize`:
admins by role and network, hosts by their own key, enrolling hosts by their
token), what the broker lets hosts and enrolling agents publish, what
`events verify` checks in the log, and the CLI's check of a command before it
sends it. A fact about a command written anywhere else is a copy that can drift.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Generic, TypeVar

from controlplane.rules.base import Context, Decision
from events.commands import Command, ErrorCode
from events.model import Event
from projections.topology import Topology

C = TypeVar("C", bound=Command)


class Sender(StrEnum):
    """Who sends a command, which says how it is authenticated."""

    ADMIN = "admin"  # signed by an admin's key; their role says what they may sign
    HOST = "host"  # an enrolled host, signed by the key it registered at its join
    ENROLLING = "enrolling"  # a host with an enrollment token (a new one, or joining again)


def event_network(_topology: Topology, _command: Command, event: Event) -> str | None:
    """The network the event names (the events of a network's aggregate all do)."""
    network = getattr(event, "network", None)
    return network if isinstance(network, str) else None


@dataclass(frozen=True)
class Scope(Generic[C]):
    """The network an admin command is about: a network admin may sign it only
    for their own networks. Found twice, in ways that must agree (a test checks
    that they do): by the rules, from the command and the topology; and by
    `events verify`, offline, from the command, the first event it produced and
    the topology the log had folded up to that event."""

    # None: the command names nothing that exists (the rules say so).
    of_command: Callable[[Topology, C], str | None]
    of_event: Callable[[Topology, C, Event], str | None] = event_network


@dataclass(frozen=True)
class ByAdmin(Generic[C]):
    """Signed by an admin. Without a scope, only a full admin may send it."""

    scope: Scope[C] | None = None
    kind: ClassVar[Sender] = Sender.ADMIN


@dataclass(frozen=True)
class ByHost(Generic[C]):
    """Signed by the key the host registered at its join (hosts enrolled by
    agents older than that have none, and send unsigned)."""

    host_of: Callable[[C], str]  # the host the command is from
    kind: ClassVar[Sender] = Sender.HOST


@dataclass(frozen=True)
class ByEnrolling(Generic[C]):
    """Authorized by its enrollment token (the rules check it) and signed by the
    host key it registers."""

    # (the key that must sign it, who it is from); raises Rejected when the
    # command would take over another host.
    admit: Callable[[Topology, C], tuple[str, str]]
    signs_with: Callable[[C], str]  # the host key the command registers
    kind: ClassVar[Sender] = Sender.ENROLLING


@dataclass(frozen=True)
class Produces:
    """The events a command may append, and what `events verify` checks of the
    first one (the one its signed proof goes with) against the signed command."""

    events: tuple[type[Event], ...]  # the first event first
    # (command field, event field): what the command is about, e.g. the network's name.
    about: tuple[str, str] | None = None
    # Other (command field, event field) pairs that must be equal.
    agree: tuple[tuple[str, str], ...] = ()
    # (command field, event field) pairs of collections equal as sets (the
    # event holds them once each, sorted).
    same_set: tuple[tuple[str, str], ...] = ()
    # (command field, event field) pairs of collections where the event holds
    # some of what was signed, at least one (a tag command records only the
    # tags it changed).
    within: tuple[tuple[str, str], ...] = ()
    # (command field, event field) pairs equal as sets when the command names
    # any: none signed means "all of them", which the event then lists.
    same_set_if_given: tuple[tuple[str, str], ...] = ()

    @property
    def first(self) -> type[Event]:
        return self.events[0]


class Need(StrEnum):
    """What the command pipeline brings to a command that asks for it."""

    # A new enrollment key id and secret in the context, derived from the
    # command id (`controlplane.enrollment`): a retry's answer is the same.
    FRESH_KEY = "fresh_key"
    # The answer carries the enrollment token of that key (the rules never
    # see the server's URL or keys).
    ENROLLMENT_TOKEN = "enrollment_token"
    # The answer carries the fresh key's secret (a webhook's HMAC secret):
    # never recorded, sealed to the signer when answered again.
    HOOK_SECRET = "hook_secret"
    # The answer carries a read API bearer token made from the fresh secret
    # (`controlplane.rules.tokens.bearer_token`).
    BEARER_TOKEN = "bearer_token"


@dataclass(frozen=True)
class Throttle(Generic[C]):
    """Failed attempts are counted per bucket; too many, and the next ones are
    refused for a while without being decided (someone is guessing)."""

    bucket: Callable[[Topology, C], str]
    counted: frozenset[ErrorCode]  # the refusals that count as failures
    what: str  # what failed, for the refusal: "too many <what>"


@dataclass(frozen=True)
class CommandSpec(Generic[C]):
    command: type[C]  # its tag is the verb
    handler: Callable[[Topology, C, Context], Decision]  # pure; raises Rejected
    sender: ByAdmin[C] | ByHost[C] | ByEnrolling[C]
    produces: Produces
    needs: frozenset[Need] = frozenset()
    throttle: Throttle[C] | None = None

    def __post_init__(self) -> None:
        wants_key = {Need.ENROLLMENT_TOKEN, Need.BEARER_TOKEN, Need.HOOK_SECRET} & self.needs
        if wants_key and Need.FRESH_KEY not in self.needs:
            raise ValueError(f"{self.verb}: a token or secret needs a fresh key")

    @property
    def verb(self) -> str:
        return str(self.command.__struct_config__.tag)

    @property
    def sent_by(self) -> Sender:
        return self.sender.kind
