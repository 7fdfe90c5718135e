"""Egress gateways (part of the network's aggregate): a node forwarding to
ranges beyond the overlay for the other members.

A range may not overlap any network's own CIDR (members would not know which
way to send), so the decision reads every network, and its events are
guarded like a network's creation: against every network event since.
"""

from __future__ import annotations

import ipaddress

from controlplane.rules.base import Context, Decision, Rejected, network_subject, one_event
from controlplane.rules.networks import whole_network
from controlplane.rules.nodes import network_of_node, resolve_node
from controlplane.rules.spec import ByAdmin, CommandSpec, Produces, Scope
from events.commands import AddEgress, ClearExit, ErrorCode, RemoveEgress, SetExit
from events.model import AnyEvent, EgressAdded, EgressRemoved, ExitCleared, ExitSet
from events.store import Expectation
from events.subjects import NETWORK_EVENTS_WILDCARD
from projections.topology import Node, Topology

MAX_RANGES = 64  # per command: a gateway's ranges are a few LANs, not a routing table
MAX_METRIC = 65535


def parse_range(text: str) -> ipaddress.IPv4Network:
    """An egress range: an IPv4 CIDR with no host bits. Raises Rejected."""
    network = whole_network(text, "range", "a CIDR such as 192.168.1.0/24")
    if str(network) != text:
        # Recorded as signed: `events verify` compares the two.
        raise Rejected(ErrorCode.INVALID, f"invalid range {text!r}: write it as {network}")
    if network.version == 6:
        # Linux forwards IPv6 only for all interfaces at once (and then stops
        # taking router advertisements): not something to switch on quietly.
        raise Rejected(ErrorCode.INVALID, f"range {text}: IPv6 egress is not supported yet")
    assert isinstance(network, ipaddress.IPv4Network)
    return network


def _check_ranges(topology: Topology, ranges: tuple[str, ...]) -> tuple[str, ...]:
    if not ranges:
        raise Rejected(ErrorCode.INVALID, "give at least one --range")
    if len(ranges) > MAX_RANGES:
        raise Rejected(ErrorCode.INVALID, f"{len(ranges)} ranges: at most {MAX_RANGES} at once")
    parsed = sorted({parse_range(r) for r in ranges})
    for cidr in parsed:
        if cidr.prefixlen == 0:
            continue  # the internet: never routed on members but by `node exit`
        for network in topology.networks.values():
            if ipaddress.ip_network(network.cidr).overlaps(cidr):
                raise Rejected(
                    ErrorCode.CONFLICT,
                    f"range {cidr} overlaps network {network.name!r} ({network.cidr})",
                )
    return tuple(str(c) for c in parsed)


def _decision(
    topology: Topology, network: str, event: AnyEvent, result: dict[str, object]
) -> Decision:
    return Decision(
        events=((network_subject(network), event),),
        expect=(Expectation(NETWORK_EVENTS_WILDCARD, topology.last_network_seq),),
        result=result,
    )


def add_egress(topology: Topology, cmd: AddEgress, _ctx: Context) -> Decision:
    node = resolve_node(topology, cmd.node)
    if not 0 <= cmd.metric <= MAX_METRIC:
        raise Rejected(ErrorCode.INVALID, f"metric {cmd.metric}: use 0 to {MAX_METRIC}")
    ranges = _check_ranges(topology, cmd.ranges)
    network = topology.networks[node.network]
    was = network.gateways.get(node.node_id)
    after = tuple(sorted({*(was.ranges if was else ()), *ranges}, key=ipaddress.ip_network))
    result: dict[str, object] = {
        "node_id": node.node_id,
        "network": node.network,
        "name": node.name,
        "ranges": list(after),
        "nat": cmd.nat,
        "metric": cmd.metric,
    }
    same = was is not None and (was.nat, was.metric) == (cmd.nat, cmd.metric)
    if same and was is not None and set(ranges) <= set(was.ranges):
        return Decision(result={**result, "changed": False})
    event = EgressAdded(
        network=node.network,
        node_id=node.node_id,
        host_id=node.host_id,
        ranges=ranges,
        nat=cmd.nat,
        metric=cmd.metric,
    )
    return _decision(topology, node.network, event, {**result, "changed": True})


ADD = CommandSpec[AddEgress](
    AddEgress,
    add_egress,
    ByAdmin(Scope(lambda topology, cmd: network_of_node(topology, cmd.node))),
    Produces(
        (EgressAdded,),
        agree=(("nat", "nat"), ("metric", "metric")),
        same_set=(("ranges", "ranges"),),
    ),
)


def remove_egress(topology: Topology, cmd: RemoveEgress, _ctx: Context) -> Decision:
    node = resolve_node(topology, cmd.node)
    gateway = topology.networks[node.network].gateways.get(node.node_id)
    if gateway is None:
        raise Rejected(ErrorCode.NOT_FOUND, f"node {node.name!r} is not an egress gateway")
    if cmd.ranges:
        asked = {str(parse_range(r)) for r in cmd.ranges}
        unknown = sorted(asked - set(gateway.ranges))
        if unknown:
            raise Rejected(
                ErrorCode.NOT_FOUND,
                f"node {node.name!r} has no egress range {', '.join(unknown)} "
                f"(it has {', '.join(gateway.ranges)})",
            )
        ranges = tuple(r for r in gateway.ranges if r in asked)
    else:
        ranges = gateway.ranges
    event = EgressRemoved(
        network=node.network, node_id=node.node_id, host_id=node.host_id, ranges=ranges
    )
    left = [r for r in gateway.ranges if r not in ranges]
    result: dict[str, object] = {
        "node_id": node.node_id,
        "network": node.network,
        "name": node.name,
        "removed": list(ranges),
        "ranges": left,
    }
    return _decision(topology, node.network, event, result)


REMOVE = CommandSpec[RemoveEgress](
    RemoveEgress,
    remove_egress,
    ByAdmin(Scope(lambda topology, cmd: network_of_node(topology, cmd.node))),
    # Without ranges the command means all of them: the event names them.
    Produces((EgressRemoved,), same_set_if_given=(("ranges", "ranges"),)),
)

INTERNET = "0.0.0.0/0"


def node_in_network(topology: Topology, network: str, ref: str) -> Node:
    """The node `ref` names, which must be in `network`: a bare name is
    looked up there first. Raises Rejected."""
    try:
        node = resolve_node(topology, f"{network}/{ref}" if "/" not in ref else ref)
    except Rejected:
        node = resolve_node(topology, ref)
    if node.network != network:
        raise Rejected(
            ErrorCode.INVALID,
            f"node {node.name!r} is in network {node.network!r}, not {network!r}",
        )
    return node


def _internet_gateway(topology: Topology, node: Node, ref: str) -> Node:
    """The node `ref` names, as an internet gateway of `node`'s network.
    Raises Rejected."""
    via = node_in_network(topology, node.network, ref)
    if via.node_id == node.node_id:
        raise Rejected(ErrorCode.INVALID, f"node {node.name!r} cannot be its own exit")
    gateway = topology.networks[node.network].gateways.get(via.node_id)
    if gateway is None or INTERNET not in gateway.ranges:
        raise Rejected(
            ErrorCode.INVALID,
            f"node {via.name!r} is not an internet gateway "
            f"(netmesh gateway egress add {node.network}/{via.name} --range {INTERNET})",
        )
    return via


def set_exit(topology: Topology, cmd: SetExit, _ctx: Context) -> Decision:
    node = resolve_node(topology, cmd.node)
    via = _internet_gateway(topology, node, cmd.via)
    own = topology.networks[node.network].gateways.get(node.node_id)
    if own is not None and INTERNET in own.ranges:
        raise Rejected(ErrorCode.INVALID, f"node {node.name!r} is an internet gateway itself")
    result: dict[str, object] = {
        "node_id": node.node_id,
        "network": node.network,
        "name": node.name,
        "via": via.name,
        "via_node_id": via.node_id,
        "changed": node.exit_via != via.node_id,
    }
    if node.exit_via == via.node_id:
        return Decision(result=result)
    event = ExitSet(
        network=node.network, node_id=node.node_id, host_id=node.host_id, via=via.node_id
    )
    return one_event(topology, network_subject(node.network), event, result)


EXIT = CommandSpec[SetExit](
    SetExit,
    set_exit,
    ByAdmin(Scope(lambda topology, cmd: network_of_node(topology, cmd.node))),
    Produces((ExitSet,)),
)


def clear_exit(topology: Topology, cmd: ClearExit, _ctx: Context) -> Decision:
    node = resolve_node(topology, cmd.node)
    result: dict[str, object] = {
        "node_id": node.node_id,
        "network": node.network,
        "name": node.name,
        "changed": bool(node.exit_via),
    }
    if not node.exit_via:
        return Decision(result=result)
    event = ExitCleared(network=node.network, node_id=node.node_id, host_id=node.host_id)
    return one_event(topology, network_subject(node.network), event, result)


EXIT_OFF = CommandSpec[ClearExit](
    ClearExit,
    clear_exit,
    ByAdmin(Scope(lambda topology, cmd: network_of_node(topology, cmd.node))),
    Produces((ExitCleared,)),
)

SPECS = (ADD, REMOVE, EXIT, EXIT_OFF)
