"""Nodes (a host's membership of a network, in the network's aggregate):
joining with an enrollment token, and removing a node."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

from controlplane.rules.base import (
    Context,
    Decision,
    Rejected,
    guard,
    host_subject,
    network_subject,
    one_event,
    parse_endpoint,
    parse_public_key,
    parse_tags,
    require_network,
)
from controlplane.rules.keys import (
    GUESSING,
    authenticate_key,
    check_key_usable,
    throttle_bucket,
)
from controlplane.rules.spec import ByAdmin, ByEnrolling, CommandSpec, Produces, Scope, Throttle
from events.commands import ErrorCode, Join, RemoveNode, TagNode, UntagNode
from events.model import (
    AnyEvent,
    EnrollmentKeyUsed,
    HostEndpointObserved,
    HostRegistered,
    NodeJoined,
    NodeRemoved,
    NodeTagged,
    NodeUntagged,
)
from events.tokens import InvalidToken, parse_token
from projections.topology import Network, Node, Topology, host_range

HOST_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})$")


def host_id_for(public_key: str) -> str:
    """A host's id, fixed at its first join from its first public key."""
    return "h" + hashlib.sha256(public_key.encode()).hexdigest()[:12]


def node_id_for(network: str, host_id: str) -> str:
    return "n" + hashlib.sha256(f"{network}/{host_id}".encode()).hexdigest()[:10]


def join(topology: Topology, cmd: Join, ctx: Context) -> Decision:
    try:
        token = parse_token(cmd.token)
    except InvalidToken as exc:
        raise Rejected(ErrorCode.INVALID_TOKEN, str(exc)) from None
    key = authenticate_key(topology, token.key_id, token.secret)
    network = require_network(topology, key.network)
    public_key = parse_public_key(cmd.public_key)
    if not HOST_NAME.match(cmd.name):
        raise Rejected(
            ErrorCode.INVALID,
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
    for member in topology.nodes_by_network.get(network.name, ()):
        if topology.nodes[member].name == cmd.name:
            raise Rejected(
                ErrorCode.CONFLICT,
                f"name {cmd.name!r} is taken in network {network.name!r}; "
                "choose another with --name",
            )
    listen_port = cmd.listen_port or (host.listen_port if host else network.listen_port)
    address = allocate_address(
        network.cidr,
        topology.addresses.get(network.name, ()),
        topology.address_floor.get(network.name, 0),
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
                tags=key.tags,
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
    expect = [guard(topology, net_subject)]
    if len(events) > 2:
        expect.append(guard(topology, h_subject))
    node = Node(node_id, network.name, host_id, cmd.name, address, ctx.now, frozenset(key.tags))
    return Decision(
        events=tuple(events), expect=tuple(expect), result=_join_result(network, node, host_id)
    )


def _join_result(network: Network, node: Node, host_id: str) -> dict[str, Any]:
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


def admit_join(topology: Topology, cmd: Join) -> tuple[str, str]:
    """The key a join must be signed with (its own), and who it is from.
    Raises Rejected when it would take over another host's identity."""
    # The host this join lands on, found as `join` finds it: by the
    # normalised key, or by the id derived from it (which also finds a
    # host that has since rotated that key away).
    try:
        key = parse_public_key(cmd.public_key)
    except Rejected:
        key = ""
    existing = (
        topology.hosts.get(topology.host_by_public_key.get(key) or host_id_for(key))
        if key
        else None
    )
    if existing is not None and existing.signing_key and existing.signing_key != cmd.signing_key:
        # Someone else's WireGuard key with their own signing key: a takeover.
        raise Rejected(
            ErrorCode.UNAUTHORIZED,
            f"join: host {existing.host_id} is registered with another signing key",
        )
    # A host key is one host's login to the broker: a second host joining
    # with it (a machine that lost its WireGuard key but kept its host
    # key) would log in as the first, while that one is still a member.
    holder = topology.host_by_signing_key(cmd.signing_key)
    if (
        holder is not None
        and (existing is None or holder != existing.host_id)
        and topology.nodes_by_host.get(holder)
    ):
        raise Rejected(
            ErrorCode.CONFLICT,
            f"join: this machine's host key already belongs to host {holder}, still in "
            f"{', '.join(sorted(topology.networks_of_host(holder)))}: remove that node "
            "first, or enroll from a fresh state dir",
        )
    return cmd.signing_key, cmd.name


def join_bucket(topology: Topology, cmd: Join) -> str:
    """Failed joins count in the same window as failed broker connections with
    that token (one bucket for tokens that do not parse)."""
    try:
        return throttle_bucket(topology, parse_token(cmd.token).key_id)
    except InvalidToken:
        return "malformed"


JOIN = CommandSpec[Join](
    Join,
    join,
    ByEnrolling(admit_join, signs_with=lambda cmd: cmd.signing_key),
    Produces((EnrollmentKeyUsed, NodeJoined, HostRegistered, HostEndpointObserved)),
    throttle=Throttle(join_bucket, GUESSING, "failed joins with this enrollment key"),
)


def allocate_address(cidr: str, used: Collection[int], floor: int = 0) -> str:
    """The lowest free host address of the network (`used`: addresses taken,
    as integers; every host address below `floor` is taken). Raises Rejected
    when full. Integers, and a floor the topology keeps: a join in a network
    of N was O(N) address objects and strings, the seed of 5,000 joins O(N^2)."""
    first, last = host_range(ipaddress.ip_network(cidr))
    candidate = max(first, floor)
    while candidate <= last:
        if candidate not in used:
            return str(ipaddress.ip_address(candidate))
        candidate += 1
    raise Rejected(ErrorCode.EXHAUSTED, f"network {cidr} has no free addresses")


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
        raise Rejected(ErrorCode.NOT_FOUND, f"no node {ref!r}")
    if len(matches) > 1:
        options = ", ".join(sorted("/".join(key(n)[1:]) for n in matches))
        raise Rejected(
            ErrorCode.AMBIGUOUS, f"{ref!r} is in several networks: say which ({options})"
        )
    return matches[0]


def resolve_node(topology: Topology, ref: str) -> Node:
    """Raises Rejected (see `match_node`)."""
    return match_node(ref, topology.nodes.values(), lambda n: (n.node_id, n.network, n.name))


def network_of_node(topology: Topology, ref: str) -> str | None:
    """The network of the node `ref` names; None when it names none (the rules say why)."""
    try:
        return resolve_node(topology, ref).network
    except Rejected:
        return None


def remove_node(topology: Topology, cmd: RemoveNode, _ctx: Context) -> Decision:
    node = resolve_node(topology, cmd.node)
    subject = network_subject(node.network)
    return one_event(
        topology,
        subject,
        NodeRemoved(network=node.network, node_id=node.node_id, host_id=node.host_id),
        {"node_id": node.node_id, "network": node.network, "name": node.name},
    )


REMOVE = CommandSpec[RemoveNode](
    RemoveNode,
    remove_node,
    # The node is named as the admin typed it (id, NETWORK/NAME or a unique
    # name): the event says which node, and in which network, that was.
    ByAdmin(Scope(lambda topology, cmd: network_of_node(topology, cmd.node))),
    Produces((NodeRemoved,)),
)


def tag_node(topology: Topology, cmd: TagNode | UntagNode, _ctx: Context) -> Decision:
    """Adds (TagNode) or takes away (UntagNode) the tags that change anything;
    none: a no-op that writes nothing."""
    if not cmd.tags:
        raise Rejected(ErrorCode.INVALID, "give at least one tag")
    tags = parse_tags(cmd.tags)
    node = resolve_node(topology, cmd.node)
    adding = isinstance(cmd, TagNode)
    changed = tuple(t for t in tags if (t in node.tags) != adding)
    after = node.tags | set(changed) if adding else node.tags - set(changed)
    result: dict[str, Any] = {
        "node_id": node.node_id,
        "network": node.network,
        "name": node.name,
        "changed": list(changed),
        "tags": sorted(after),
    }
    if not changed:
        return Decision(result=result)
    fields = {"network": node.network, "node_id": node.node_id, "host_id": node.host_id}
    event = NodeTagged(**fields, tags=changed) if adding else NodeUntagged(**fields, tags=changed)
    return one_event(topology, network_subject(node.network), event, result)


TAG = CommandSpec[TagNode](
    TagNode,
    tag_node,
    ByAdmin(Scope(lambda topology, cmd: network_of_node(topology, cmd.node))),
    Produces((NodeTagged,), within=(("tags", "tags"),)),
)

UNTAG = CommandSpec[UntagNode](
    UntagNode,
    tag_node,
    ByAdmin(Scope(lambda topology, cmd: network_of_node(topology, cmd.node))),
    Produces((NodeUntagged,), within=(("tags", "tags"),)),
)

SPECS = (JOIN, REMOVE, TAG, UNTAG)
