"""`netmesh events verify`: check the event log's signatures, offline.

Pure: it reads recorded events and trusts nothing but the keys in them, from
the root of trust on (the first `admin.added`, or a key the operator names).
An event an admin command produced carries, on the command's first event, the
exact signed text, the signer and the signature; the check recomputes all of it.
A server or broker that altered an admin event, invented one, or replayed a
command under another id is caught. Hosts sign their own commands (join,
endpoint reports, leaving) with a key registered at their join; events from
hosts enrolled by older agents carry no proof and are counted as unsigned.

What is checked comes from the commands' specs, as the control plane's own
authorization does: who may sign a command (a network admin only for their
networks, found in the topology the log has folded up to that command), which
event it produces first, and which of its fields the event must repeat.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from controlplane.authorization import RoleVerdict, role_verdict
from controlplane.rules import SPECS, spec_for_verb
from controlplane.rules.spec import ByAdmin, ByEnrolling, ByHost, CommandSpec, Sender
from events.commands import Command, Role
from events.envelope import Envelope, RecordedEvent
from events.model import AdminAdded, AdminRemoved, AdminTokenUsed, Event, HostRegistered
from events.signing import COMMAND_CONTEXT, verify, verify_key_of
from projections.topology import Topology, evolve


def _admin_only_events() -> frozenset[type[Event]]:
    """Events only an admin's command produces: in the log without a proof, forged."""
    by_admins = {e for s in SPECS if s.sent_by is Sender.ADMIN for e in s.produces.events}
    by_others = {e for s in SPECS if s.sent_by is not Sender.ADMIN for e in s.produces.events}
    return frozenset(by_admins - by_others)


ADMIN_ONLY_EVENTS = _admin_only_events()

# public key -> (name, role, networks): the admins proven so far.
Admins = dict[str, tuple[str, str, tuple[str, ...]]]


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
    admins: Admins = {}
    # Where things are, folded as the control plane folds them: which network a
    # key or node is in, which key a host registered (at each point of the log).
    topology = Topology()
    used: set[str] = set()  # command ids whose proof has been seen (once each)
    proven = ""  # the command whose events are being read (they follow its proof)
    for recorded in events:
        report.events += 1
        env = recorded.envelope
        if env.command_id != proven:
            proven = ""  # a command's events are contiguous: this one is not its
        if env.signature:
            problem = _check_proof(env, admins, topology)
            if problem is None and env.command_id in used:
                problem = "a proof already used by an earlier command"
            if problem is None:
                proven = env.command_id
                used.add(env.command_id)
                report.signed_commands += 1
            else:
                proven = ""
                report.problems.append((recorded.seq, problem))
        evolve(topology, recorded)
        match env.data:
            case HostRegistered():
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
            case AdminTokenUsed():
                pass  # the control plane's own record of a read (no one signs a read)
            case event if type(event) in ADMIN_ONLY_EVENTS and env.command_id != proven:
                report.problems.append(
                    (recorded.seq, f"{type(event).__name__} without a valid admin signature")
                )
            case _ if env.command_id != proven:
                report.unsigned_events += 1
    return report


def _check_proof(env: Envelope, admins: Admins, topology: Topology) -> str | None:
    """Why the proof on `env` (the first event of a signed command) does not
    hold, against the admins proven so far and the log's topology before it."""
    try:
        key = verify_key_of(env.signer)
    except ValueError:
        return "the signer is not a public key"
    problem = verify(key, env.signed.encode(), env.signature)
    if problem is not None:
        return f"{problem} on the command"
    context, _, rest = env.signed.encode().partition(b"\n")
    verb_bytes, _, payload = rest.partition(b"\n")
    if context + b"\n" != COMMAND_CONTEXT:
        return "the signed text is not a command"
    verb = verb_bytes.decode(errors="replace")
    spec = spec_for_verb(verb)
    if spec is None:
        return f"{verb!r} is not an admin command"
    try:
        command = msgspec.json.decode(payload, type=spec.command)
    except msgspec.ValidationError as exc:
        return f"the signed {verb} is not a valid command: {exc}"
    except msgspec.DecodeError:
        return "the signed command is not JSON"
    event = env.data
    problem = _signer_problem(spec, command, env.signer, event, admins, topology)
    if problem is not None:
        return problem
    if command.command_id != env.command_id:
        return "the event's command id is not the one that was signed"
    if not isinstance(event, spec.produces.first):
        return f"a signed {verb} cannot produce {type(event).__name__}"
    return _fields_problem(spec, command, event)


def _signer_problem(
    spec: CommandSpec[Any],
    command: Command,
    signer: str,
    event: Event,
    admins: Admins,
    topology: Topology,
) -> str | None:
    verb = spec.verb
    match spec.sender:
        case ByAdmin(scope=scope):
            if signer not in admins:
                return "signed by a key that was not an admin's at the time"
            _, role, networks = admins[signer]
            network = None
            if scope is not None and role == Role.NETWORK_ADMIN:
                network = scope.of_event(topology, command, event)
                if network is None:
                    return f"signed by a network admin, for a {verb} whose network the log lacks"
            match role_verdict(role, networks, scope, network):
                case RoleVerdict.READ_ONLY | RoleVerdict.ADMINS_ONLY:
                    return f"signed by an {role}, who may not {verb}"
                case RoleVerdict.OUT_OF_SCOPE:
                    return f"signed by a network admin of {', '.join(networks)}, not of {network!r}"
        case ByEnrolling(signs_with=signs_with):
            if signs_with(command) != signer:
                return f"a {verb} signed by another key than the one it registers"
        case ByHost(host_of=host_of):
            host = topology.hosts.get(host_of(command))
            if host is None or host.signing_key != signer:
                return "signed by a key that is not the host's"
    return None


def _fields_problem(spec: CommandSpec[Any], command: Command, event: Event) -> str | None:
    """What the event says that the signed command does not: a valid signature
    cannot be pinned on another change."""
    about = spec.produces.about
    if about is not None:
        command_field, event_field = about
        wanted, have = getattr(command, command_field), getattr(event, event_field)
        if wanted != have:
            return f"the event's {event_field} {have!r} is not the signed {wanted!r}"
    for command_field, event_field in spec.produces.agree:
        if _normal(getattr(command, command_field)) != _normal(getattr(event, event_field)):
            return f"the event's {event_field} is not the signed one"
    for command_field, event_field in spec.produces.same_set:
        if set(getattr(command, command_field)) != set(getattr(event, event_field)):
            return f"the event's {event_field} are not the signed ones"
    for command_field, event_field in spec.produces.same_set_if_given:
        signed = getattr(command, command_field)
        if signed and set(signed) != set(getattr(event, event_field)):
            return f"the event's {event_field} are not the signed ones"
    for command_field, event_field in spec.produces.within:
        signed, recorded = getattr(command, command_field), getattr(event, event_field)
        if not recorded or not set(recorded) <= set(signed):
            return f"the event's {event_field} are not among the signed ones"
    return None


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
