"""Egress gateways, as three sections of the desired state.

A gateway node forwards to ranges beyond the overlay (a LAN, a VPC). Every
other member of its network that may use a range gets:

- `routes[range]`: the range routed through the overlay interface;
- `egress[range]`: the gateways forwarding to it, best first (metric, then
  key). The agent puts the range in the allowed IPs of the first one it finds
  alive, so two gateways of one range fail over without the control plane.

The gateway itself gets `forward[range]`: masquerade or not, and which
sources may send what there (its own nftables forward chain enforces it).

Who may use a range: everyone in a network without a policy. Under a policy,
a member whose rules reach the range (a destination `*` or a CIDR selector
overlapping it) and who sees the gateway (a rule between the two: they must
be peers for the range to ride on the gateway's peer entry).

The internet (`0.0.0.0/0`, `::/0`) is never pushed on everyone: a range that
holds every address is left out of members' routes (using it is opt-in).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import ClassVar

from events.desired import (
    EgressEntry,
    EgressVia,
    ExitEntry,
    ForwardEntry,
    ForwardRule,
    RouteEntry,
)
from events.model import (
    EgressAdded,
    EgressRemoved,
    Event,
    ExitCleared,
    ExitSet,
    HostKeyRotated,
    NodeJoined,
    NodeRemoved,
    NodeTagged,
    NodeUntagged,
    PolicySet,
)
from events.policy import Everyone, InRange
from projections.access import canonical_ports, host_cidr
from projections.sections.base import Reread
from projections.topology import Gateway, Network, Topology

INTERNET = "0.0.0.0/0"
EVERYTHING = frozenset({INTERNET, "::/0"})


def offered(topology: Topology, host_id: str) -> dict[str, list[EgressVia]]:
    """The ranges `host_id` reaches through gateways, each with its gateways
    (unsorted): what its `routes` and `egress` sections hold."""
    found: dict[str, list[EgressVia]] = {}
    own = forwarded(topology, host_id)
    for node in topology.nodes_of_host(host_id):
        network = topology.networks.get(node.network)
        if network is None or not network.gateways:
            continue
        for gateway in network.gateways.values():
            peer = _gateway_host(topology, gateway)
            if peer is None or peer[0] == host_id or not _sees(network, node.node_id, gateway):
                continue
            for cidr in gateway.ranges:
                if cidr in EVERYTHING or cidr in own or not may_use(network, node.node_id, cidr):
                    continue
                found.setdefault(cidr, []).append(EgressVia(metric=gateway.metric, peer=peer[1]))
    return found


def forwarded(topology: Topology, host_id: str) -> set[str]:
    """The ranges `host_id` itself forwards to (in any of its networks)."""
    ranges: set[str] = set()
    for node in topology.nodes_of_host(host_id):
        network = topology.networks.get(node.network)
        gateway = network.gateways.get(node.node_id) if network is not None else None
        if gateway is not None:
            ranges.update(gateway.ranges)
    return ranges


def may_use(network: Network, node_id: str, cidr: str) -> bool:
    """Whether member `node_id` may send to range `cidr` (some of it)."""
    index = network.access
    if index is None:
        return True
    target = ipaddress.ip_network(cidr)
    for position in index.as_source.get(node_id, ()):
        if any(_reaches(d, target) for d in index.policy.rules[position].destinations):
            return True
    return False


def forward_rules(network: Network, gateway: Gateway, cidr: str) -> tuple[ForwardRule, ...]:
    """Who may send what to range `cidr` through `gateway`."""
    index = network.access
    if index is None:
        return (ForwardRule(sources=(network.cidr,), destination=cidr, allow=("any",)),)
    target = ipaddress.ip_network(cidr)
    rules = []
    for position, rule in enumerate(index.policy.rules):
        for selector in rule.destinations:
            if not _reaches(selector, target):
                continue
            # The part of the range the rule names (CIDRs nest or are disjoint).
            destination = cidr
            if isinstance(selector, InRange) and selector.cidr.prefixlen > target.prefixlen:
                destination = str(selector.cidr)
            sources = {
                host_cidr(index.members[n].address)
                for n in index.sources[position]
                if n != gateway.node_id
            }
            sources.update(index.source_ranges[position])
            if sources:
                rules.append(
                    ForwardRule(
                        sources=tuple(sorted(sources)),
                        destination=destination,
                        allow=canonical_ports(rule.ports),
                    )
                )
    return tuple(sorted(set(rules), key=lambda r: (r.destination, r.sources, r.allow)))


def _reaches(selector: object, target: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    if isinstance(selector, Everyone):
        return True
    return (
        isinstance(selector, InRange)
        and selector.cidr.version == target.version
        and selector.cidr.overlaps(target)
    )


def _sees(network: Network, node_id: str, gateway: Gateway) -> bool:
    return network.access is None or network.access.sees(node_id, gateway.node_id)


def _gateway_host(topology: Topology, gateway: Gateway) -> tuple[str, str] | None:
    """(host id, public key) of a gateway's host."""
    node = topology.nodes.get(gateway.node_id)
    host = topology.hosts.get(node.host_id) if node is not None else None
    return (host.host_id, host.public_key) if host is not None else None


class _OfferedSection:
    """What `routes` and `egress` share: both hold exactly the offered ranges,
    and the same events move them."""

    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        EgressAdded,
        EgressRemoved,
        NodeRemoved,
        HostKeyRotated,
        NodeTagged,
        NodeUntagged,
        PolicySet,
    )
    name: ClassVar[str]

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._offered: dict[str, dict[str, list[EgressVia]]] = {}

    def offered(self, host_id: str) -> dict[str, list[EgressVia]]:
        if host_id not in self._offered:
            self._offered[host_id] = offered(self.topology, host_id)
        return self._offered[host_id]

    @classmethod
    def rereads(cls, topology: Topology, event: Event) -> Sequence[Reread]:
        match event:
            case EgressAdded(network=network, node_id=node_id, ranges=ranges):
                gateway = _network(topology, network).gateways.get(node_id)
                keys = frozenset(ranges) | frozenset(gateway.ranges if gateway else ())
                return (Reread(cls.name, keys, networks=frozenset((network,))),)
            case EgressRemoved(network=network, ranges=ranges):
                return (Reread(cls.name, frozenset(ranges), networks=frozenset((network,))),)
            case NodeRemoved(network=network, node_id=node_id):
                departed = _network(topology, network).departed_gateway
                if departed is None or departed.node_id != node_id:
                    return ()
                keys = frozenset(departed.ranges)
                return (Reread(cls.name, keys, networks=frozenset((network,))),)
            case HostKeyRotated(host_id=host_id):
                # Members name the gateway by its key.
                return [
                    Reread(cls.name, frozenset(g.ranges), networks=frozenset((n.network,)))
                    for n in topology.nodes_of_host(host_id)
                    if (g := _network(topology, n.network).gateways.get(n.node_id)) is not None
                ]
            case (
                NodeTagged(network=network)
                | NodeUntagged(network=network)
                | PolicySet(network=network)
            ):
                # Who may use which range moved: every range of the network.
                keys = _all_ranges(_network(topology, network))
                if not keys:
                    return ()
                if isinstance(event, PolicySet):
                    return (Reread(cls.name, keys, networks=frozenset((network,))),)
                return (Reread(cls.name, keys, hosts=frozenset((event.host_id,))),)
        return ()


class RouteSection(_OfferedSection):
    """`routes`: the ranges this host reaches through gateways."""

    name: ClassVar[str] = "routes"

    def entries(self, host_id: str) -> dict[str, RouteEntry]:
        return {cidr: RouteEntry() for cidr in sorted(self.offered(host_id))}

    def entry(self, host_id: str, key: str) -> RouteEntry | None:
        return RouteEntry() if key in self.offered(host_id) else None


class EgressSection(_OfferedSection):
    """`egress`: the gateways of each range this host reaches, best first."""

    name: ClassVar[str] = "egress"

    def entries(self, host_id: str) -> dict[str, EgressEntry]:
        return {
            cidr: EgressEntry(via=tuple(sorted(via)))
            for cidr, via in sorted(self.offered(host_id).items())
        }

    def entry(self, host_id: str, key: str) -> EgressEntry | None:
        via = self.offered(host_id).get(key)
        return EgressEntry(via=tuple(sorted(via))) if via else None


class ForwardSection:
    """`forward`: the ranges this host forwards to, as a gateway."""

    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        EgressAdded,
        EgressRemoved,
        NodeJoined,
        NodeRemoved,
        NodeTagged,
        NodeUntagged,
        PolicySet,
    )
    name: ClassVar[str] = "forward"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def entries(self, host_id: str) -> dict[str, ForwardEntry]:
        found: dict[str, ForwardEntry] = {}
        for cidr in sorted(forwarded(self.topology, host_id)):
            entry = self.entry(host_id, cidr)
            if entry is not None:
                found[cidr] = entry
        return found

    def entry(self, host_id: str, key: str) -> ForwardEntry | None:
        nat = False
        rules: set[ForwardRule] = set()
        seen = False
        for node in self.topology.nodes_of_host(host_id):
            network = self.topology.networks.get(node.network)
            gateway = network.gateways.get(node.node_id) if network is not None else None
            if network is None or gateway is None or key not in gateway.ranges:
                continue
            seen = True
            nat = nat or gateway.nat
            rules.update(forward_rules(network, gateway, key))
        if not seen:
            return None
        ordered = sorted(rules, key=lambda r: (r.destination, r.sources, r.allow))
        return ForwardEntry(nat=nat, rules=tuple(ordered))

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        match event:
            case EgressAdded(network=network, node_id=node_id, host_id=host_id, ranges=ranges):
                gateway = _network(topology, network).gateways.get(node_id)
                keys = frozenset(ranges) | frozenset(gateway.ranges if gateway else ())
                return (Reread(ForwardSection.name, keys, hosts=frozenset((host_id,))),)
            case EgressRemoved(host_id=host_id, ranges=ranges):
                return (
                    Reread(ForwardSection.name, frozenset(ranges), hosts=frozenset((host_id,))),
                )
            case (
                NodeJoined(network=network)
                | NodeRemoved(network=network)
                | NodeTagged(network=network)
                | NodeUntagged(network=network)
                | PolicySet(network=network)
            ):
                # Under a policy, a member's arrival, departure or tags move
                # the sources of the gateways' rules.
                found = _network(topology, network)
                if found.access is None and not isinstance(event, PolicySet):
                    return ()
                return [
                    Reread(ForwardSection.name, frozenset(g.ranges), hosts=frozenset((host[0],)))
                    for g in found.gateways.values()
                    if (host := _gateway_host(topology, g)) is not None
                ]
        return ()


class ExitSection:
    """`exit`: the internet gateway this host's default route goes through
    (`netmesh node exit`), while it is one and this host may use it."""

    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        ExitSet,
        ExitCleared,
        EgressAdded,
        EgressRemoved,
        NodeRemoved,
        HostKeyRotated,
        NodeTagged,
        NodeUntagged,
        PolicySet,
    )
    name: ClassVar[str] = "exit"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def entries(self, host_id: str) -> dict[str, ExitEntry]:
        entry = self.entry(host_id, INTERNET)
        return {INTERNET: entry} if entry is not None else {}

    def entry(self, host_id: str, key: str) -> ExitEntry | None:
        if key != INTERNET:
            return None
        for node in self.topology.nodes_of_host(host_id):  # by network name: one wins
            network = self.topology.networks.get(node.network)
            gateway = network.gateways.get(node.exit_via) if network and node.exit_via else None
            if network is None or gateway is None or INTERNET not in gateway.ranges:
                continue
            peer = _gateway_host(self.topology, gateway)
            if peer is None or peer[0] == host_id or not _sees(network, node.node_id, gateway):
                continue
            if may_use(network, node.node_id, INTERNET):
                return ExitEntry(peer=peer[1])
        return None

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        keys = frozenset((INTERNET,))
        match event:
            case ExitSet(host_id=host_id) | ExitCleared(host_id=host_id):
                return (Reread(ExitSection.name, keys, hosts=frozenset((host_id,))),)
            case (
                EgressAdded(network=network, node_id=gateway)
                | EgressRemoved(network=network, node_id=gateway)
                | NodeRemoved(network=network, node_id=gateway)
            ):
                users = _exit_users(topology, network, {gateway})
            case HostKeyRotated(host_id=host_id):
                users = set()
                for node in topology.nodes_of_host(host_id):
                    users |= _exit_users(topology, node.network, {node.node_id})
            case (
                NodeTagged(network=network)
                | NodeUntagged(network=network)
                | PolicySet(network=network)
            ):
                users = _exit_users(topology, network, None)
            case _:
                return ()
        return (Reread(ExitSection.name, keys, hosts=frozenset(users)),) if users else ()


def _exit_users(topology: Topology, network: str, via: set[str] | None) -> set[str]:
    """Hosts whose nodes in `network` exit through one of `via` (None: any)."""
    return {
        node.host_id
        for node in topology.nodes_of_network(network)
        if node.exit_via and (via is None or node.exit_via in via)
    }


_NO_NETWORK = Network(name="", cidr="0.0.0.0/32", listen_port=0, mtu=0, keepalive=0, created_at=0)


def _network(topology: Topology, name: str) -> Network:
    return topology.networks.get(name) or _NO_NETWORK


def _all_ranges(network: Network) -> frozenset[str]:
    return frozenset(cidr for g in network.gateways.values() for cidr in g.ranges)
