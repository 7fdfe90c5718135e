"""Relays (part of the network's aggregate): hosts that forward the WireGuard
datagrams of pairs that cannot reach each other directly.

A relay is a node with an endpoint everyone reaches. It forwards a pair's
datagrams as they are, between two UDP ports of its own (agent/relay.py): it
holds neither side's key and cannot read their traffic (Netmaker's relay
routes decrypted packets instead). A pair is opened on demand: an agent that
cannot get an answer from a peer on any direct path asks (`relay.request`, a
signed host command), and the network records which relay carries the pair
and on which ports (`relay.pair_opened`: the audit log says via whom a host
was reached). The pair's two hosts then get the relay as their last candidate
(projections/sections/paths.py); their agents go back to direct paths when
those answer again (agent/nat.py).
"""

from __future__ import annotations

from typing import Any

from controlplane.rules.base import Context, Decision, Rejected, network_subject, one_event
from controlplane.rules.gateways import node_in_network
from controlplane.rules.nodes import network_of_node, resolve_node
from controlplane.rules.spec import ByAdmin, ByHost, CommandSpec, Produces, Scope
from events.commands import AddRelay, ErrorCode, RemoveRelay, RequestRelay
from events.model import RelayAdded, RelayPairOpened, RelayRemoved
from projections.sections.peers import PeerSection, peer_endpoint
from projections.topology import Network, Node, Relay, RelayPair, Topology, pair_key

DEFAULT_PORTS = (52000, 52999)  # two per pair: 500 pairs


def parse_ports(text: str) -> tuple[int, int]:
    """ "LOW-HIGH" (inclusive, at least two ports). Raises Rejected."""
    if not text:
        return DEFAULT_PORTS
    low_text, dash, high_text = text.partition("-")
    try:
        low, high = int(low_text), int(high_text if dash else low_text)
    except ValueError:
        raise Rejected(
            ErrorCode.INVALID, f"invalid ports {text!r}: expected LOW-HIGH, e.g. 52000-52999"
        ) from None
    if not 1 <= low < high <= 65535:
        raise Rejected(
            ErrorCode.INVALID,
            f"invalid ports {text!r}: LOW-HIGH with 1 <= LOW < HIGH <= 65535 (two per pair)",
        )
    return low, high


def relay_view(topology: Topology, network: Network, relay: Relay) -> dict[str, Any]:
    node = topology.nodes.get(relay.node_id)
    host = topology.hosts.get(relay.host_id)
    pairs = network.pairs_via(relay.node_id)
    return {
        "network": network.name,
        "node_id": relay.node_id,
        "name": node.name if node is not None else None,
        "endpoint": peer_endpoint(host) if host is not None else None,
        "ports": f"{relay.ports[0]}-{relay.ports[1]}",
        "pairs": [
            {
                "hosts": [_host_name(topology, h) for h in p.hosts],
                "ports": list(p.ports),
                "asked_by": _host_name(topology, p.asked_by),
            }
            for p in pairs
        ],
    }


def _host_name(topology: Topology, host_id: str) -> str:
    host = topology.hosts.get(host_id)
    return host.name if host is not None else host_id


def _result(node: Node, **more: object) -> dict[str, object]:
    return {"node_id": node.node_id, "network": node.network, "name": node.name, **more}


def _relay_node(topology: Topology, cmd: AddRelay | RemoveRelay) -> Node:
    network = getattr(cmd, "network", "")
    if network:
        if network not in topology.networks:
            raise Rejected(ErrorCode.NOT_FOUND, f"no network {network!r}")
        return node_in_network(topology, network, cmd.node)
    return resolve_node(topology, cmd.node)


def add_relay(topology: Topology, cmd: AddRelay, _ctx: Context) -> Decision:
    node = _relay_node(topology, cmd)
    network = topology.networks[node.network]
    host = topology.hosts[node.host_id]
    if host.seen:
        raise Rejected(
            ErrorCode.INVALID,
            f"node {node.name!r} has no endpoint everyone reaches: it was seen behind a NAT "
            f"(at {host.seen}); a relay needs a public endpoint",
        )
    if peer_endpoint(host) is None:
        raise Rejected(
            ErrorCode.INVALID,
            f"node {node.name!r} announces no endpoint: a relay needs one everyone reaches "
            "(start its agent with --endpoint)",
        )
    ports = parse_ports(cmd.ports)
    if ports[0] <= host.listen_port <= ports[1]:
        raise Rejected(
            ErrorCode.INVALID,
            f"ports {ports[0]}-{ports[1]} include the WireGuard port of {node.name!r} "
            f"({host.listen_port})",
        )
    was = network.relays.get(node.node_id)
    if was is not None:
        if was.ports == ports or not cmd.ports:
            return Decision(result=_result(node, ports=list(was.ports), changed=False))
        raise Rejected(
            ErrorCode.CONFLICT,
            f"node {node.name!r} already relays on ports {was.ports[0]}-{was.ports[1]}: "
            "remove it first to change them",
        )
    for other in topology.nodes_of_host(node.host_id):
        relay = topology.networks[other.network].relays.get(other.node_id)
        if relay is not None and relay.ports[0] <= ports[1] and ports[0] <= relay.ports[1]:
            raise Rejected(
                ErrorCode.CONFLICT,
                f"ports {ports[0]}-{ports[1]} overlap those its host relays on in network "
                f"{other.network!r} ({relay.ports[0]}-{relay.ports[1]})",
            )
    event = RelayAdded(
        network=node.network, node_id=node.node_id, host_id=node.host_id, ports=ports
    )
    return one_event(
        topology,
        network_subject(node.network),
        event,
        _result(node, ports=list(ports), changed=True),
    )


def _node_network(topology: Topology, cmd: AddRelay | RemoveRelay) -> str | None:
    return network_of_node(topology, cmd.node)


ADD = CommandSpec[AddRelay](
    AddRelay,
    add_relay,
    ByAdmin(Scope(_node_network)),
    Produces((RelayAdded,)),
)


def remove_relay(topology: Topology, cmd: RemoveRelay, _ctx: Context) -> Decision:
    node = resolve_node(topology, cmd.node)
    network = topology.networks[node.network]
    if node.node_id not in network.relays:
        raise Rejected(ErrorCode.NOT_FOUND, f"node {node.name!r} is not a relay")
    pairs = len(network.pairs_via(node.node_id))
    event = RelayRemoved(network=node.network, node_id=node.node_id, host_id=node.host_id)
    return one_event(
        topology, network_subject(node.network), event, _result(node, pairs_closed=pairs)
    )


REMOVE = CommandSpec[RemoveRelay](
    RemoveRelay, remove_relay, ByAdmin(Scope(_node_network)), Produces((RelayRemoved,))
)


def open_pair_in(topology: Topology, a: str, b: str) -> tuple[Network, RelayPair] | None:
    """The relayed pair of hosts a and b, in the first network that has one."""
    key = pair_key(a, b)
    for name in sorted(topology.networks_of_host(a)):
        network = topology.networks[name]
        pair = network.relay_pairs.get(key)
        if pair is not None:
            return network, pair
    return None


def free_ports(network: Network, relay: Relay) -> tuple[int, int] | None:
    """The lowest two free ports of `relay` (its pairs' ports are taken)."""
    taken = {p for pair in network.pairs_via(relay.node_id) for p in pair.ports}
    port = relay.ports[0]
    while port + 1 <= relay.ports[1]:
        if port not in taken and port + 1 not in taken:
            return port, port + 1
        port += 2 if port + 1 in taken else 1
    return None


def request_relay(topology: Topology, cmd: RequestRelay, _ctx: Context) -> Decision:
    if cmd.host_id not in topology.hosts:
        raise Rejected(ErrorCode.NOT_FOUND, f"no host {cmd.host_id!r}")
    peer_id = topology.host_by_public_key.get(cmd.peer_key)
    if peer_id is None or peer_id == cmd.host_id:
        raise Rejected(ErrorCode.NOT_FOUND, "no peer with that public key")
    if PeerSection(topology).entry(cmd.host_id, cmd.peer_key) is None:
        raise Rejected(ErrorCode.NOT_FOUND, "that host is not a peer of this one")
    existing = open_pair_in(topology, cmd.host_id, peer_id)
    if existing is not None:
        network, pair = existing
        node = topology.nodes[pair.relay]
        return Decision(result={"network": network.name, "relay": node.name, "changed": False})
    shared = topology.networks_of_host(cmd.host_id) & topology.networks_of_host(peer_id)
    options = []
    for name in sorted(shared):
        network = topology.networks[name]
        for relay in network.relays.values():
            if relay.host_id in (cmd.host_id, peer_id):
                continue
            ports = free_ports(network, relay)
            if ports is not None:
                node = topology.nodes[relay.node_id]
                options.append(
                    (len(network.pairs_via(relay.node_id)), node.name, network, relay, ports)
                )
    if not options:
        raise Rejected(
            ErrorCode.NOT_FOUND,
            "no relay with free ports in a network these hosts share (netmesh relay add NODE)",
        )
    _, name, network, relay, ports = min(options, key=lambda o: (o[0], o[1], o[2].name))
    hosts = tuple(sorted((cmd.host_id, peer_id)))
    event = RelayPairOpened(
        network=network.name,
        relay=relay.node_id,
        hosts=(hosts[0], hosts[1]),
        ports=ports,
        asked_by=cmd.host_id,
    )
    result = {"network": network.name, "relay": name, "changed": True}
    return one_event(topology, network_subject(network.name), event, result)


REQUEST = CommandSpec[RequestRelay](
    RequestRelay,
    request_relay,
    ByHost(lambda cmd: cmd.host_id),
    Produces((RelayPairOpened,), about=("host_id", "asked_by")),
)

SPECS = (ADD, REMOVE, REQUEST)
