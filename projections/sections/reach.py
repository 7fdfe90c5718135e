"""Who reaches what through gateways (pure): the rules the gateway sections
share (`egress`, `routes`, `forward`, `exit`, and the ingress gateways'
`clients`).

Who may use a range: everyone in a network without a policy. Under a policy,
a member whose rules reach the range (a destination `*` or a CIDR selector
overlapping it) and who sees the gateway (a rule between the two: they must
be peers for the range to ride on the gateway's peer entry).
"""

from __future__ import annotations

import ipaddress

from events.desired import EgressVia, ForwardRule
from events.policy import Everyone, InRange
from projections.access import canonical_ports, host_cidr
from projections.topology import Gateway, Network, Topology

INTERNET = "0.0.0.0/0"
EVERYTHING = frozenset({INTERNET, "::/0"})


def offered(
    topology: Topology, host_id: str, only: str | None = None
) -> dict[str, list[EgressVia]]:
    """The ranges `host_id` reaches through gateways (of network `only`, or
    of all its networks), each with its gateways (unsorted): what its
    `routes` and `egress` sections hold."""
    found: dict[str, list[EgressVia]] = {}
    own = forwarded(topology, host_id)
    for node in topology.nodes_of_host(host_id):
        if only is not None and node.network != only:
            continue
        network = topology.networks.get(node.network)
        if network is None or not network.gateways:
            continue
        for gateway in network.gateways.values():
            peer = gateway_host(topology, gateway)
            if peer is None or peer[0] == host_id or not sees(network, node.node_id, gateway):
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


def sees(network: Network, node_id: str, gateway: Gateway) -> bool:
    return network.access is None or network.access.sees(node_id, gateway.node_id)


def gateway_host(topology: Topology, gateway: Gateway) -> tuple[str, str] | None:
    """(host id, public key) of a gateway's host."""
    node = topology.nodes.get(gateway.node_id)
    host = topology.hosts.get(node.host_id) if node is not None else None
    return (host.host_id, host.public_key) if host is not None else None


_NO_NETWORK = Network(name="", cidr="0.0.0.0/32", listen_port=0, mtu=0, keepalive=0, created_at=0)


def network_named(topology: Topology, name: str) -> Network:
    return topology.networks.get(name) or _NO_NETWORK


def all_ranges(network: Network) -> frozenset[str]:
    return frozenset(cidr for g in network.gateways.values() for cidr in g.ranges)
