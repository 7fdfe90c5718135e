"""decide(topology, command, context) -> Decision: the rules of netmesh.

Pure: no I/O, no clock, no randomness (the context brings the time, the actor
and any fresh ids or secrets). A refused command raises `Rejected` with a stable
code and a one-line message meant for the person who typed the command.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from events.commands import (
    ROLES,
    AddAdmin,
    AnyCommand,
    CreateEnrollmentKey,
    CreateNetwork,
    DeleteNetwork,
    Join,
    LeaveNetworks,
    RemoveAdmin,
    RemoveNode,
    ReportEndpoint,
    RequestKeyRotation,
    RevokeEnrollmentKey,
    RotateHostKey,
)
from events.model import (
    AdminAdded,
    AdminRemoved,
    AnyEvent,
    EnrollmentKeyCreated,
    EnrollmentKeyRevoked,
    EnrollmentKeyUsed,
    HostEndpointObserved,
    HostKeyRotated,
    HostKeyRotationRequested,
    HostRegistered,
    NetworkCreated,
    NetworkDeleted,
    NodeJoined,
    NodeRemoved,
)
from events.store import Expectation
from events.subjects import ADMIN_EVENTS_WILDCARD, NETWORK_EVENTS_WILDCARD, aggregate_subject
from events.tokens import InvalidToken, parse_token, secret_digest
from projections.topology import Admin, EnrollmentKey, Node, Topology

NETWORK_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
HOST_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})$")


# Commands only an admin may send, signed with their key. The others come from
# agents: `join` is authorized by its enrollment token and signed by the new
# host's own key; `endpoint.report` and `host.leave` must be signed by the key
# their host registered (hosts enrolled by agents older than that have none).
ADMIN_VERBS = frozenset(
    {
        "network.create",
        "network.delete",
        "key.create",
        "key.revoke",
        "node.remove",
        "node.rotate_key",
        "admin.add",
        "admin.remove",
    }
)
# How far a command's `signed_at` may be from the control plane's clock.
SIGNATURE_WINDOW = 300.0


def authorize(
    topology: Topology,
    verb: str,
    command: AnyCommand,
    signer: str | None,
    signature_problem: str | None,
    now: float,
) -> str | None:
    """Who a signed command is from: "admin:<name>" or "host:<id>"; None for a
    command that needs no signature (from an agent that has no key). Raises
    Rejected ("unauthorized") otherwise. `signature_problem` is None when the
    signature checked out."""
    if verb not in ADMIN_VERBS:
        return _authorize_host(topology, verb, command, signer, signature_problem, now)
    signed_at = command.signed_at
    if not signer or signature_problem == "unsigned":
        raise Rejected("unauthorized", f"{verb} must be signed by an admin key (--admin-key)")
    if signature_problem is not None:
        raise Rejected("unauthorized", f"{verb}: {signature_problem}")
    admin = topology.admins.get(signer)
    if admin is None:
        raise Rejected("unauthorized", f"{verb}: signed by a key that is not an admin's")
    _check_role(topology, verb, command, admin)
    if abs(now - signed_at) > SIGNATURE_WINDOW:
        raise Rejected(
            "unauthorized",
            f"{verb}: signed at {signed_at:.0f}, more than {SIGNATURE_WINDOW:.0f} s from "
            "the server's clock (a replay, or a clock to fix)",
        )
    return f"admin:{admin.name}"


def _check_role(topology: Topology, verb: str, command: AnyCommand, admin: Admin) -> None:
    """Raises Rejected when `admin`'s role does not cover the command."""
    if admin.role == "admin":
        return
    if admin.role != "network-admin":
        raise Rejected("unauthorized", f"{verb}: {admin.name} is an {admin.role}: read-only")
    network: str | None = None
    match command:
        case CreateNetwork(name=name) | DeleteNetwork(name=name):
            network = name
        case CreateEnrollmentKey(network=name):
            network = name
        case RevokeEnrollmentKey(key_id=key_id):
            key = topology.keys.get(key_id)
            network = key.network if key is not None else None
        case RemoveNode(node=ref) | RequestKeyRotation(node=ref):
            try:
                network = resolve_node(topology, ref).network
            except Rejected:
                network = None  # decide says why
        case _:
            raise Rejected("unauthorized", f"{verb}: only an admin may do that")
    if network is not None and network not in admin.networks:
        raise Rejected(
            "unauthorized",
            f"{verb}: {admin.name} administers {', '.join(admin.networks)}, not {network!r}",
        )


def _authorize_host(
    topology: Topology,
    verb: str,
    command: AnyCommand,
    signer: str | None,
    signature_problem: str | None,
    now: float,
) -> str | None:
    if isinstance(command, Join):
        required, host_id = command.signing_key, command.name
        # The host this join lands on, found as `_join` finds it: by the
        # normalised key, or by the id derived from it (which also finds a
        # host that has since rotated that key away).
        try:
            key = parse_public_key(command.public_key)
        except Rejected:
            key = ""
        existing = (
            topology.hosts.get(topology.host_by_public_key.get(key) or host_id_for(key))
            if key
            else None
        )
        if existing is not None and existing.signing_key and existing.signing_key != required:
            # Someone else's WireGuard key with their own signing key: a takeover.
            raise Rejected(
                "unauthorized",
                f"join: host {existing.host_id} is registered with another signing key",
            )
        # A host key is one host's login to the broker: a second host joining
        # with it (a machine that lost its WireGuard key but kept its host
        # key) would log in as the first, while that one is still a member.
        holder = topology.host_by_signing_key(required)
        if (
            holder is not None
            and (existing is None or holder != existing.host_id)
            and topology.nodes_by_host.get(holder)
        ):
            raise Rejected(
                "conflict",
                f"join: this machine's host key already belongs to host {holder}, still in "
                f"{', '.join(sorted(topology.networks_of_host(holder)))}: remove that node "
                "first, or enroll from a fresh state dir",
            )
    elif isinstance(command, ReportEndpoint | LeaveNetworks | RotateHostKey):
        host = topology.hosts.get(command.host_id)
        required, host_id = (host.signing_key if host is not None else ""), command.host_id
    else:
        return None
    if not required:
        return None
    if signature_problem is not None or signer != required:
        why = signature_problem if signer == required else "signed by another key"
        raise Rejected("unauthorized", f"{verb}: must be signed by the host's key ({why})")
    if abs(now - command.signed_at) > SIGNATURE_WINDOW:
        raise Rejected(
            "unauthorized", f"{verb}: signed more than {SIGNATURE_WINDOW:.0f} s from now"
        )
    return f"host:{host_id}" if host_id else "host"


class Rejected(Exception):
    """A command refused by the rules. `code` is stable; the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Context:
    now: float
    actor: str
    new_key_id: str = ""
    new_secret: str = ""


@dataclass(frozen=True)
class Decision:
    """Events to append (subject, event), the checks guarding them, and the answer."""

    events: tuple[tuple[str, AnyEvent], ...] = ()
    expect: tuple[Expectation, ...] = ()
    result: dict[str, Any] = field(default_factory=dict)


def decide(topology: Topology, command: AnyCommand, ctx: Context) -> Decision:
    """Raises Rejected."""
    match command:
        case CreateNetwork():
            return _create_network(topology, command)
        case DeleteNetwork():
            return _delete_network(topology, command)
        case CreateEnrollmentKey():
            return _create_key(topology, command, ctx)
        case RevokeEnrollmentKey():
            return _revoke_key(topology, command)
        case Join():
            return _join(topology, command, ctx)
        case RemoveNode():
            return _remove_node(topology, command)
        case ReportEndpoint():
            return _report_endpoint(topology, command)
        case LeaveNetworks():
            return _leave(topology, command)
        case RotateHostKey():
            return _rotate_key(topology, command)
        case RequestKeyRotation():
            return _request_rotation(topology, command)
        case AddAdmin():
            return _add_admin(topology, command)
        case RemoveAdmin():
            return _remove_admin(topology, command)
    raise Rejected("invalid", f"unknown command {command!r}")  # pragma: no cover


def network_subject(name: str) -> str:
    return aggregate_subject("network", name)


def host_subject(host_id: str) -> str:
    return aggregate_subject("host", host_id)


def _one_event(
    topology: Topology, subject: str, event: AnyEvent, result: dict[str, Any]
) -> Decision:
    """The commonest decision: one event on one aggregate, guarded by its version."""
    return Decision(events=((subject, event),), expect=(_guard(topology, subject),), result=result)


def _guard(topology: Topology, subject: str) -> Expectation:
    return Expectation(subject, topology.version(subject))


def _create_network(topology: Topology, cmd: CreateNetwork) -> Decision:
    if not NETWORK_NAME.match(cmd.name):
        raise Rejected(
            "invalid",
            f"invalid network name {cmd.name!r}: use 1-32 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
        )
    cidr = parse_cidr(cmd.cidr)
    if cidr.version == 6 and cmd.mtu < 1280:
        raise Rejected("invalid", f"MTU {cmd.mtu} is below 1280, the minimum for IPv6")
    if cmd.name in topology.networks:
        raise Rejected("conflict", f"network {cmd.name!r} already exists")
    for other in topology.networks.values():
        if ipaddress.ip_network(other.cidr).overlaps(cidr):
            raise Rejected("conflict", f"{cidr} overlaps network {other.name!r} ({other.cidr})")
    event = NetworkCreated(
        network=cmd.name,
        cidr=str(cidr),
        listen_port=cmd.listen_port,
        mtu=cmd.mtu,
        keepalive=cmd.keepalive,
    )
    # Overlap spans every network, so the check guards them all.
    return Decision(
        events=((network_subject(cmd.name), event),),
        expect=(Expectation(NETWORK_EVENTS_WILDCARD, topology.last_network_seq),),
        result={"network": cmd.name, "cidr": str(cidr)},
    )


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Raises Rejected("invalid", ...)."""
    if "/" not in text:
        raise Rejected("invalid", f"invalid CIDR {text!r}: missing prefix length, e.g. /24")
    try:
        interface = ipaddress.ip_interface(text)
    except ValueError:
        raise Rejected("invalid", f"invalid CIDR {text!r}: expected e.g. 10.10.0.0/24") from None
    network = interface.network
    if interface.ip != network.network_address:
        raise Rejected("invalid", f"invalid CIDR {text!r}: host bits set (did you mean {network}?)")
    if network.num_addresses < 4:
        raise Rejected("invalid", f"CIDR {text!r} is too small: at most /30 (IPv4) or /126 (IPv6)")
    return network


def _delete_network(topology: Topology, cmd: DeleteNetwork) -> Decision:
    _network(topology, cmd.name)
    members = topology.nodes_of_network(cmd.name)
    if members and not cmd.force:
        raise Rejected(
            "conflict",
            f"network {cmd.name!r} has {len(members)} node(s); remove them first, "
            "or pass --force to disconnect them",
        )
    subject = network_subject(cmd.name)
    return _one_event(topology, subject, NetworkDeleted(network=cmd.name), {"network": cmd.name})


def _network(topology: Topology, name: str) -> Any:
    network = topology.networks.get(name)
    if network is None:
        raise Rejected("not_found", f"no network named {name!r}")
    return network


def _create_key(topology: Topology, cmd: CreateEnrollmentKey, ctx: Context) -> Decision:
    _network(topology, cmd.network)
    expires_at = ctx.now + cmd.expires_in if cmd.expires_in is not None else None
    subject = network_subject(cmd.network)
    event = EnrollmentKeyCreated(
        network=cmd.network,
        key_id=ctx.new_key_id,
        secret_sha256=secret_digest(ctx.new_secret),
        uses=cmd.uses,
        expires_at=expires_at,
    )
    return _one_event(
        topology,
        subject,
        event,
        {
            "key_id": ctx.new_key_id,
            "network": cmd.network,
            "uses": cmd.uses,
            "expires_at": expires_at,
        },
    )


def _revoke_key(topology: Topology, cmd: RevokeEnrollmentKey) -> Decision:
    key = topology.keys.get(cmd.key_id)
    if key is None:
        raise Rejected("not_found", f"no enrollment key {cmd.key_id!r}")
    if key.revoked:
        return Decision(result={"key_id": key.key_id, "already_revoked": True})
    subject = network_subject(key.network)
    return _one_event(
        topology,
        subject,
        EnrollmentKeyRevoked(network=key.network, key_id=key.key_id),
        {"key_id": key.key_id},
    )


def authenticate_key(topology: Topology, key_id: str, secret: str) -> EnrollmentKey:
    """The key a token names, if its secret matches. Raises Rejected."""
    key = topology.keys.get(key_id)
    if key is None:
        retired_network = topology.retired_keys.get(key_id)
        if retired_network is not None:
            raise Rejected(
                "not_found",
                f"enrollment key {key_id} was for network {retired_network!r}, "
                "which has been deleted",
            )
        raise Rejected("invalid_token", "enrollment token not recognised")
    if not hmac.compare_digest(key.secret_sha256, secret_digest(secret)):
        raise Rejected("invalid_token", "enrollment token not recognised")
    return key


def check_key_usable(key: EnrollmentKey, now: float) -> None:
    """Raises Rejected with the specific reason a key cannot be used now."""
    if key.revoked:
        raise Rejected("revoked", f"enrollment key {key.key_id} has been revoked")
    if key.expires_at is not None and now >= key.expires_at:
        raise Rejected("expired", f"enrollment key {key.key_id} has expired")
    if key.uses is not None and key.used >= key.uses:
        raise Rejected(
            "exhausted", f"enrollment key {key.key_id} is used up ({key.used} of {key.uses} uses)"
        )


def parse_public_key(text: str) -> str:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise Rejected("invalid", "public key must be 32 bytes, base64 (as `wg pubkey` prints)")
    return base64.b64encode(raw).decode()


def parse_endpoint(text: str) -> str:
    """An IP, or ip:port / [v6]:port. Raises Rejected."""
    if "%" in text:
        # A scoped (link-local) address means nothing on the peers' machines.
        raise Rejected("invalid", f"invalid endpoint {text!r}: scoped addresses cannot be shared")
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
        raise Rejected("invalid", f"invalid endpoint {text!r}: expected IP or IP:PORT") from None
    if not sep or not 1 <= port_number <= 65535:
        raise Rejected("invalid", f"invalid endpoint {text!r}: port must be 1-65535")
    return f"[{ip}]:{port_number}" if ip.version == 6 else f"{ip}:{port_number}"


def host_id_for(public_key: str) -> str:
    """A host's id, fixed at its first join from its first public key."""
    return "h" + hashlib.sha256(public_key.encode()).hexdigest()[:12]


def node_id_for(network: str, host_id: str) -> str:
    return "n" + hashlib.sha256(f"{network}/{host_id}".encode()).hexdigest()[:10]


def _join(topology: Topology, cmd: Join, ctx: Context) -> Decision:
    try:
        token = parse_token(cmd.token)
    except InvalidToken as exc:
        raise Rejected("invalid_token", str(exc)) from None
    key = authenticate_key(topology, token.key_id, token.secret)
    network = _network(topology, key.network)
    public_key = parse_public_key(cmd.public_key)
    if not HOST_NAME.match(cmd.name):
        raise Rejected(
            "invalid",
            f"invalid host name {cmd.name!r}: use letters, digits, '.', '_' and '-' (max 63)",
        )
    endpoints = tuple(parse_endpoint(e) for e in cmd.endpoints)

    host_id = topology.host_by_public_key.get(public_key) or host_id_for(public_key)
    host = topology.hosts.get(host_id)
    node_id = node_id_for(network.name, host_id)
    existing = topology.nodes.get(node_id)
    if existing is not None:
        # A host's second join (an agent restarted with the same identity) is
        # answered from what is there, and uses no key.
        return Decision(result=_join_result(network, existing, host_id))
    check_key_usable(key, ctx.now)
    for other in topology.nodes_of_network(network.name):
        if other.name == cmd.name:
            raise Rejected(
                "conflict",
                f"name {cmd.name!r} is taken in network {network.name!r}; "
                "choose another with --name",
            )
    listen_port = cmd.listen_port or (host.listen_port if host else network.listen_port)
    address = allocate_address(
        network.cidr, {n.address for n in topology.nodes_of_network(network.name)}
    )
    net_subject = network_subject(network.name)
    h_subject = host_subject(host_id)
    events: list[tuple[str, AnyEvent]] = [
        (net_subject, EnrollmentKeyUsed(network=network.name, key_id=key.key_id, host_id=host_id)),
        (
            net_subject,
            NodeJoined(
                network=network.name,
                node_id=node_id,
                host_id=host_id,
                name=cmd.name,
                address=address,
            ),
        ),
    ]
    if host is None:
        events.append(
            (
                h_subject,
                HostRegistered(
                    host_id=host_id,
                    name=cmd.name,
                    public_key=public_key,
                    listen_port=listen_port,
                    endpoints=endpoints,
                    signing_key=cmd.signing_key,
                ),
            )
        )
    elif (host.endpoints, host.listen_port) != (endpoints, listen_port):
        events.append(
            (
                h_subject,
                HostEndpointObserved(host_id=host_id, endpoints=endpoints, listen_port=listen_port),
            )
        )
    expect = [_guard(topology, net_subject)]
    if len(events) > 2:
        expect.append(_guard(topology, h_subject))
    node = Node(node_id, network.name, host_id, cmd.name, address, ctx.now)
    return Decision(
        events=tuple(events), expect=tuple(expect), result=_join_result(network, node, host_id)
    )


def _join_result(network: Any, node: Node, host_id: str) -> dict[str, Any]:
    prefix = ipaddress.ip_network(network.cidr).prefixlen
    return {
        "host_id": host_id,
        "node_id": node.node_id,
        "network": network.name,
        "name": node.name,
        "address": node.address,
        "cidr": network.cidr,
        "interface_address": f"{node.address}/{prefix}",
    }


def allocate_address(cidr: str, used: set[str]) -> str:
    """The lowest free host address of the network. Raises Rejected when full."""
    for ip in _host_addresses(ipaddress.ip_network(cidr)):
        if str(ip) not in used:
            return str(ip)
    raise Rejected("exhausted", f"network {cidr} has no free addresses")


def _host_addresses(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> Iterator[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    # hosts() skips the network and broadcast addresses (v4) / the subnet-router
    # anycast address (v6), and is lazy, so a /8 costs what is used.
    return iter(network.hosts())


NodeT = TypeVar("NodeT")


def match_node(
    ref: str, nodes: Iterable[NodeT], key: Callable[[NodeT], tuple[str, str, str]]
) -> NodeT:
    """The node `ref` names: its id, NETWORK/NAME, or a name unique across
    networks. `key` gives a node's (id, network, name). Raises Rejected."""
    candidates = [(key(n), n) for n in nodes]
    matches = [n for (node_id, _, _), n in candidates if node_id == ref]
    if not matches:
        network, slash, name = ref.rpartition("/")
        matches = [
            n
            for (_, net, nm), n in candidates
            if nm == name and (net == network if slash else True)
        ]
    if not matches:
        raise Rejected("not_found", f"no node {ref!r}")
    if len(matches) > 1:
        options = ", ".join(sorted("/".join(key(n)[1:]) for n in matches))
        raise Rejected("ambiguous", f"{ref!r} is in several networks: say which ({options})")
    return matches[0]


def resolve_node(topology: Topology, ref: str) -> Node:
    """Raises Rejected (see `match_node`)."""
    return match_node(ref, topology.nodes.values(), lambda n: (n.node_id, n.network, n.name))


def _remove_node(topology: Topology, cmd: RemoveNode) -> Decision:
    node = resolve_node(topology, cmd.node)
    subject = network_subject(node.network)
    return _one_event(
        topology,
        subject,
        NodeRemoved(network=node.network, node_id=node.node_id, host_id=node.host_id),
        {"node_id": node.node_id, "network": node.network, "name": node.name},
    )


def _report_endpoint(topology: Topology, cmd: ReportEndpoint) -> Decision:
    host = topology.hosts.get(cmd.host_id)
    if host is None:
        raise Rejected("not_found", f"no host {cmd.host_id!r}")
    endpoints = tuple(parse_endpoint(e) for e in cmd.endpoints)
    listen_port = cmd.listen_port or host.listen_port
    if (host.endpoints, host.listen_port) == (endpoints, listen_port):
        return Decision(result={"host_id": host.host_id, "changed": False})
    subject = host_subject(host.host_id)
    event = HostEndpointObserved(host_id=host.host_id, endpoints=endpoints, listen_port=listen_port)
    return _one_event(topology, subject, event, {"host_id": host.host_id, "changed": True})


def _add_admin(topology: Topology, cmd: AddAdmin) -> Decision:
    if not NETWORK_NAME.match(cmd.name):
        raise Rejected("invalid", f"invalid admin name {cmd.name!r}: use a-z, 0-9 and '-'")
    try:
        raw = base64.b64decode(cmd.public_key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise Rejected("invalid", "admin key must be an Ed25519 public key, base64")
    if cmd.role not in ROLES:
        raise Rejected("invalid", f"role must be one of {', '.join(ROLES)}")
    if (cmd.role == "network-admin") != bool(cmd.networks):
        raise Rejected("invalid", "a network-admin needs --network (and only a network-admin)")
    for network in cmd.networks:
        _network(topology, network)
    names = {a.name for a in topology.admins.values()}
    if cmd.name in names:
        raise Rejected("conflict", f"admin {cmd.name!r} already exists")
    key = base64.b64encode(raw).decode()
    if key in topology.admins:
        raise Rejected("conflict", "that key already belongs to an admin")
    subject = aggregate_subject("admin", cmd.name)
    event = AdminAdded(name=cmd.name, public_key=key, role=cmd.role, networks=cmd.networks)
    return Decision(
        events=((subject, event),),
        # Across all admins: two replicas must not both pass the checks above.
        expect=(Expectation(ADMIN_EVENTS_WILDCARD, topology.last_admin_seq),),
        result={"name": cmd.name, "role": cmd.role, "networks": list(cmd.networks)},
    )


def _remove_admin(topology: Topology, cmd: RemoveAdmin) -> Decision:
    admin = next((a for a in topology.admins.values() if a.name == cmd.name), None)
    if admin is None:
        raise Rejected("not_found", f"no admin {cmd.name!r}")
    full = [a for a in topology.admins.values() if a.role == "admin"]
    if admin.role == "admin" and len(full) == 1:
        raise Rejected("conflict", f"{cmd.name!r} is the last admin: add another first")
    subject = aggregate_subject("admin", cmd.name)
    return Decision(
        events=((subject, AdminRemoved(name=cmd.name)),),
        # Across all admins: two concurrent removals must not both pass the
        # "last admin" check.
        expect=(Expectation(ADMIN_EVENTS_WILDCARD, topology.last_admin_seq),),
        result={"name": cmd.name},
    )


def _request_rotation(topology: Topology, cmd: RequestKeyRotation) -> Decision:
    node = resolve_node(topology, cmd.node)
    host = topology.hosts[node.host_id]
    if not host.signing_key:
        raise Rejected(
            "conflict", f"host {host.host_id} has no signing key: re-enroll it to rotate its key"
        )
    subject = host_subject(host.host_id)
    event = HostKeyRotationRequested(host_id=host.host_id, epoch=host.key_epoch + 1)
    return _one_event(
        topology,
        subject,
        event,
        {"host_id": host.host_id, "node": node.node_id, "epoch": event.epoch},
    )


def _rotate_key(topology: Topology, cmd: RotateHostKey) -> Decision:
    host = topology.hosts.get(cmd.host_id)
    if host is None:
        raise Rejected("not_found", f"no host {cmd.host_id!r}")
    if not host.signing_key:
        # Without a signing key anyone could claim to be this host: re-enroll.
        raise Rejected(
            "unauthorized", f"host {cmd.host_id} has no signing key: re-enroll it to rotate"
        )
    new_key = parse_public_key(cmd.public_key)
    if new_key == host.public_key:
        return Decision(result={"host_id": host.host_id, "changed": False})
    if new_key in topology.host_by_public_key:
        raise Rejected("conflict", "that public key belongs to another host")
    subject = host_subject(host.host_id)
    event = HostKeyRotated(host_id=host.host_id, public_key=new_key, previous_key=host.public_key)
    return _one_event(
        topology, subject, event, {"host_id": host.host_id, "changed": True, "public_key": new_key}
    )


def _leave(topology: Topology, cmd: LeaveNetworks) -> Decision:
    if cmd.host_id not in topology.hosts:
        raise Rejected("not_found", f"no host {cmd.host_id!r}")
    nodes = [n for n in topology.nodes_of_host(cmd.host_id) if cmd.network in (None, n.network)]
    if cmd.network is not None and not nodes:
        raise Rejected("not_found", f"host {cmd.host_id} is not in network {cmd.network!r}")
    events = tuple(
        (
            network_subject(n.network),
            NodeRemoved(network=n.network, node_id=n.node_id, host_id=n.host_id),
        )
        for n in nodes
    )
    return Decision(
        events=events,
        expect=tuple(_guard(topology, network_subject(n.network)) for n in nodes),
        result={"host_id": cmd.host_id, "left": sorted(n.network for n in nodes)},
    )
