"""`netmesh events verify`: check the event log's signatures, offline.

Pure: it reads recorded events and trusts nothing but the keys in them, from
the root of trust on (the first `admin.added`, or a key the operator names).
An event an admin command produced carries, on the command's first event, the
exact signed text, the signer and the signature; the check recomputes all of it.
A server or broker that altered an admin event, invented one, or replayed a
command under another id is caught. Hosts sign their own commands (join,
endpoint reports, leaving) with a key registered at their join; events from
hosts enrolled by older agents carry no proof and are counted as unsigned.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from controlplane.rules import verbs_sent_by
from controlplane.rules.spec import Sender
from events.envelope import RecordedEvent
from events.model import (
    AdminAdded,
    AdminRemoved,
    EnrollmentKeyCreated,
    EnrollmentKeyRevoked,
    EnrollmentKeyUsed,
    Event,
    HostEndpointObserved,
    HostKeyRotated,
    HostKeyRotationRequested,
    HostRegistered,
    NetworkCreated,
    NetworkDeleted,
    NodeRemoved,
)
from events.signing import COMMAND_CONTEXT, verify, verify_key_of

ADMIN_VERBS = frozenset(verbs_sent_by(Sender.ADMIN))

# What each admin verb may produce first, and the field that must match the
# signed command: a valid signature cannot be pinned on another change.
FIRST_EVENT: dict[str, tuple[type[Event], str, str]] = {
    "network.create": (NetworkCreated, "network", "name"),
    "network.delete": (NetworkDeleted, "network", "name"),
    "key.create": (EnrollmentKeyCreated, "network", "network"),
    "key.revoke": (EnrollmentKeyRevoked, "key_id", "key_id"),
    "node.remove": (NodeRemoved, "node_id", "node"),
    "join": (EnrollmentKeyUsed, "network", ""),
    "endpoint.report": (HostEndpointObserved, "host_id", "host_id"),
    "host.leave": (NodeRemoved, "host_id", "host_id"),
    "host.rotate_key": (HostKeyRotated, "host_id", "host_id"),
    "node.rotate_key": (HostKeyRotationRequested, "", ""),
    "admin.add": (AdminAdded, "name", "name"),
    "admin.remove": (AdminRemoved, "name", "name"),
}


@dataclass
class AuditReport:
    events: int = 0
    signed_commands: int = 0
    unsigned_events: int = 0  # from agents (join, endpoint reports, leave): not signed yet
    root: str | None = None  # the admin key everything was checked against
    problems: list[tuple[int, str]] = field(default_factory=list)


def verify_log(events: Iterable[RecordedEvent], root: str | None = None) -> AuditReport:
    """Check every event; `root` is the first admin's public key if known."""
    report = AuditReport(root=root)
    admins: dict[str, tuple[str, str, tuple[str, ...]]] = {}  # public key -> name, role, networks
    hosts: dict[str, str] = {}  # host id -> its signing key
    used: set[str] = set()  # command ids whose proof has been seen (once each)
    proven = ""  # the command whose events are being read (they follow its proof)
    for recorded in events:
        report.events += 1
        env = recorded.envelope
        if env.command_id != proven:
            proven = ""  # a command's events are contiguous: this one is not its
        if env.signature:
            problem = _check_proof(
                env.signed, env.signer, env.signature, env.command_id, admins, hosts, env.data
            )
            if problem is None and env.command_id in used:
                problem = "a proof already used by an earlier command"
            if problem is None:
                proven = env.command_id
                used.add(env.command_id)
                report.signed_commands += 1
            else:
                proven = ""
                report.problems.append((recorded.seq, problem))
        match env.data:
            case HostRegistered() as registered:
                if registered.signing_key:
                    hosts[registered.host_id] = registered.signing_key
                if env.command_id != proven:
                    report.unsigned_events += 1
            case AdminAdded() as added if not admins and not env.signature:
                # The root of trust: the first admin, written by the server.
                if report.root is None:
                    report.root = added.public_key
                elif added.public_key != report.root:
                    report.problems.append(
                        (recorded.seq, "the first admin is not the root key you gave")
                    )
                    continue
                admins[added.public_key] = (added.name, added.role, tuple(added.networks))
            case AdminAdded() as added:
                if env.command_id != proven:
                    report.problems.append((recorded.seq, "admin added without a signed command"))
                    continue
                admins[added.public_key] = (added.name, added.role, tuple(added.networks))
            case AdminRemoved(name=name):
                if env.command_id != proven:
                    report.problems.append((recorded.seq, "admin removed without a signed command"))
                    continue
                for key in [k for k, (n, _, _) in admins.items() if n == name]:
                    del admins[key]
            case (
                NetworkCreated()
                | NetworkDeleted()
                | EnrollmentKeyCreated()
                | EnrollmentKeyRevoked()
            ) as event if env.command_id != proven:
                report.problems.append(
                    (recorded.seq, f"{type(event).__name__} without a valid admin signature")
                )
            case _ if env.command_id != proven:
                report.unsigned_events += 1
    return report


def _check_proof(
    signed: str,
    signer: str,
    signature: str,
    command_id: str,
    admins: dict[str, tuple[str, str, tuple[str, ...]]],
    hosts: dict[str, str],
    event: Event,
) -> str | None:
    try:
        key = verify_key_of(signer)
    except ValueError:
        return "the signer is not a public key"
    problem = verify(key, signed.encode(), signature)
    if problem is not None:
        return f"{problem} on the command"
    context, _, rest = signed.encode().partition(b"\n")
    verb, _, payload = rest.partition(b"\n")
    if context + b"\n" != COMMAND_CONTEXT:
        return "the signed text is not a command"
    try:
        fields = msgspec.json.decode(payload, type=dict[str, object])
    except msgspec.DecodeError:
        return "the signed command is not JSON"
    name = verb.decode()
    if name in ADMIN_VERBS:
        if signer not in admins:
            return "signed by a key that was not an admin's at the time"
        _, role, networks = admins[signer]
        if role == "auditor" or (role == "network-admin" and name.startswith("admin.")):
            return f"signed by an {role}, who may not {name}"
        # A network admin's change must stay in their networks (the event names
        # the network, except a key-rotation request, which names the host).
        scope = getattr(event, "network", None)
        if role == "network-admin" and scope is not None and scope not in networks:
            return f"signed by a network admin of {', '.join(networks)}, not of {scope!r}"
    elif name == "join":
        if fields.get("signing_key") != signer:
            return "a join signed by another key than the one it registers"
    elif hosts.get(str(fields.get("host_id"))) != signer:
        return "signed by a key that is not the host's"
    if fields.get("command_id") != command_id:
        return "the event's command id is not the one that was signed"
    expected = FIRST_EVENT.get(verb.decode())
    if expected is None:
        return f"{verb.decode()!r} is not an admin command"
    cls, event_field, command_field = expected
    if not isinstance(event, cls):
        return f"a signed {verb.decode()} cannot produce {type(event).__name__}"
    if not command_field or name == "node.remove":
        # A node is named as the admin typed it (id, NETWORK/NAME or a unique
        # name): which node that was needs the state of the time.
        return None
    wanted = fields.get(command_field)
    have = getattr(event, event_field)
    if wanted != have:
        return f"the event's {event_field} {have!r} is not the signed {wanted!r}"
    # Everything else the command fixes must be what the event says.
    for command_key, event_key in SAME_FIELDS.get(name, ()):
        if command_key in fields and _normal(fields[command_key]) != _normal(
            getattr(event, event_key)
        ):
            return f"the event's {event_key} is not the signed one"
    return None


# (command field, event field) that must agree, beyond the one FIRST_EVENT names.
SAME_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "network.create": (("cidr", "cidr"), ("listen_port", "listen_port"), ("mtu", "mtu")),
    "admin.add": (("public_key", "public_key"), ("role", "role"), ("networks", "networks")),
    "host.rotate_key": (("public_key", "public_key"),),
}


def _normal(value: object) -> object:
    """Lists and tuples alike; base64 keys by their bytes."""
    if isinstance(value, list | tuple):
        return tuple(value)
    if isinstance(value, str) and len(value) == 44 and value.endswith("="):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return value
    return value
