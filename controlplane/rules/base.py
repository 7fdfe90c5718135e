"""What every rule works with: the context a decision gets, the decision it
returns, the refusal it raises, and the checks several aggregates share.

Pure: no I/O, no clock, no randomness (the context brings the time, the actor
and any fresh ids or secrets).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from events.commands import ROLES, ErrorCode, Role
from events.model import AnyEvent
from events.policy import TAG_NAME
from events.store import Expectation
from events.subjects import aggregate_subject
from projections.topology import Network, Topology


class Rejected(Exception):
    """A command refused by the rules. `code` is stable; the message is for people."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Context:
    now: float
    actor: str
    # Only for commands whose spec needs them (`Need.FRESH_KEY`).
    new_key_id: str = ""
    new_secret: str = ""


@dataclass(frozen=True)
class Decision:
    """Events to append (subject, event), the checks guarding them, and the answer."""

    events: tuple[tuple[str, AnyEvent], ...] = ()
    expect: tuple[Expectation, ...] = ()
    result: dict[str, Any] = field(default_factory=dict)


def network_subject(name: str) -> str:
    return aggregate_subject("network", name)


def host_subject(host_id: str) -> str:
    return aggregate_subject("host", host_id)


def one_event(
    topology: Topology, subject: str, event: AnyEvent, result: dict[str, Any]
) -> Decision:
    """The commonest decision: one event on one aggregate, guarded by its version."""
    return Decision(events=((subject, event),), expect=(guard(topology, subject),), result=result)


def guard(topology: Topology, subject: str) -> Expectation:
    return Expectation(subject, topology.version(subject))


def require_network(topology: Topology, name: str) -> Network:
    """Raises Rejected when there is no such network."""
    network = topology.networks.get(name)
    if network is None:
        raise Rejected(ErrorCode.NOT_FOUND, f"no network named {name!r}")
    return network


def check_role(topology: Topology, role: str, networks: tuple[str, ...], who: str) -> None:
    """A role of the role model and its networks (a network-admin's, which
    must exist; only a network-admin has any). Raises Rejected; `who` names
    the holder in the message ("a network-admin", "a network-admin token")."""
    if role not in ROLES:
        raise Rejected(ErrorCode.INVALID, f"role must be one of {', '.join(ROLES)}")
    if (role == Role.NETWORK_ADMIN) != bool(networks):
        raise Rejected(ErrorCode.INVALID, f"{who} needs --network (and only a network-admin)")
    for network in networks:
        require_network(topology, network)


def parse_public_key(text: str) -> str:
    """A WireGuard public key, normalised. Raises Rejected."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise Rejected(
            ErrorCode.INVALID, "public key must be 32 bytes, base64 (as `wg pubkey` prints)"
        )
    return base64.b64encode(raw).decode()


def parse_endpoint(text: str) -> str:
    """An IP, or ip:port / [v6]:port. Raises Rejected."""
    if "%" in text:
        # A scoped (link-local) address means nothing on the peers' machines.
        raise Rejected(
            ErrorCode.INVALID, f"invalid endpoint {text!r}: scoped addresses cannot be shared"
        )
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ip = ipaddress.ip_address(host)
        port_number = int(port)
    except ValueError:
        raise Rejected(
            ErrorCode.INVALID, f"invalid endpoint {text!r}: expected IP or IP:PORT"
        ) from None
    if not sep or not 1 <= port_number <= 65535:
        raise Rejected(ErrorCode.INVALID, f"invalid endpoint {text!r}: port must be 1-65535")
    return f"[{ip}]:{port_number}" if ip.version == 6 else f"{ip}:{port_number}"


MAX_TAGS = 64


def parse_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    """Tag names, each once, sorted. Raises Rejected on a malformed one."""
    if len(tags) > MAX_TAGS:
        raise Rejected(ErrorCode.INVALID, f"{len(tags)} tags: at most {MAX_TAGS} at once")
    for tag in tags:
        if not TAG_NAME.match(tag):
            raise Rejected(
                ErrorCode.INVALID,
                f"invalid tag {tag!r}: tags are 1-32 of a-z, 0-9 and '-', "
                "starting and ending with a letter or digit",
            )
    return tuple(sorted(set(tags)))
