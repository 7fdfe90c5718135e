"""What an event did to who may reach whom, for the sections a policy shapes
(`peers`, `firewall` and `dns`).

In a network with a policy, an event changes the relation between two sets
of members, sources and destinations (`Moved`): a join or a departure between
the member and the rules it is in, a tag change between the member and the
rules naming those tags, a policy change between the members of the rules
that differ. Sources' entries at destinations (and, for peers, the other way
round) are then what to re-read, and nothing else: a tag change at 1,000
hosts touches the hosts its rules name, not the network.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from events.dns import fqdn, node_label
from events.model import Event, NodeJoined, NodeRemoved, NodeTagged, NodeUntagged, PolicySet
from events.policy import InRange
from projections.access import AccessIndex, host_cidr, rule_shape
from projections.topology import Network, Topology


class Ends(msgspec.Struct, frozen=True):
    """Members as the sections key them: their hosts, public keys, firewall
    keys, names in DNS."""

    hosts: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()
    cidrs: frozenset[str] = frozenset()
    names: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.hosts)


class Moved(msgspec.Struct, frozen=True):
    """What `sources` may open towards `destinations` may have changed
    (`ranges`: CIDR sources of the rules concerned, firewall keys of their own)."""

    sources: Ends
    destinations: Ends
    ranges: frozenset[str] = frozenset()


def policy_of(topology: Topology, network: str) -> AccessIndex | None:
    """The access index of a network with a policy; None when it allows everything."""
    found = topology.networks.get(network)
    return found.access if found is not None else None


def ends(topology: Topology, node_ids: Iterable[str]) -> Ends:
    hosts, keys, cidrs, names = set(), set(), set(), set()
    for node_id in node_ids:
        node = topology.nodes.get(node_id)
        if node is None:
            continue
        hosts.add(node.host_id)
        cidrs.add(host_cidr(node.address))
        name = topology.dns_name(node)
        if name is not None:
            names.add(name)
        # A joining host's node comes before its registration (its key):
        # peers learn the key from the registration's rereads.
        host = topology.hosts.get(node.host_id)
        if host is not None:
            keys.add(host.public_key)
    return Ends(frozenset(hosts), frozenset(keys), frozenset(cidrs), frozenset(names))


def viewers(topology: Topology, network: str, node_id: str) -> frozenset[str] | None:
    """The hosts that see member `node_id` under the network's policy; None
    when the network has none (every member sees it)."""
    index = policy_of(topology, network)
    if index is None:
        return None
    seen = index.visible(node_id)
    return frozenset(topology.nodes[n].host_id for n in seen if n in topology.nodes)


def moved(topology: Topology, event: Event) -> list[Moved]:
    """The relations `event` may have changed in a network with a policy
    (empty for a network without one, or an event that changes none)."""
    match event:
        case NodeJoined(network=network, node_id=node_id):
            index = policy_of(topology, network)
            if index is None or node_id not in index.members:
                return []
            member = _one(topology, node_id)
            return _around(
                topology, index, member, index.as_source[node_id], index.as_destination[node_id]
            )
        case NodeRemoved(network=network, node_id=node_id, host_id=host_id):
            index = policy_of(topology, network)
            if index is None or index.last_removed is None or index.last_removed[0] != node_id:
                return []
            _, departed, as_source, as_destination = index.last_removed
            host = topology.hosts.get(host_id)
            if host is None:
                return []
            label = node_label(departed.name)
            network_domain = topology.networks[network].dns_domain
            member = Ends(
                frozenset((host_id,)),
                frozenset((host.public_key,)),
                frozenset((host_cidr(departed.address),)),
                frozenset((fqdn(label, network_domain),) if label is not None else ()),
            )
            return _around(topology, index, member, as_source, as_destination)
        case (
            NodeTagged(network=network, node_id=node_id, tags=tags)
            | NodeUntagged(network=network, node_id=node_id, tags=tags)
        ):
            index = policy_of(topology, network)
            if index is None or node_id not in index.members:
                return []
            naming_source, naming_destination = index.rules_naming(tags)
            return _around(
                topology, index, _one(topology, node_id), naming_source, naming_destination
            )
        case PolicySet(network=network):
            found = topology.networks.get(network)
            if found is None or found.access is None or found.previous_policy is None:
                return []  # from allowing everything: every member gets a snapshot
            return _between_policies(topology, found)
    return []


def _one(topology: Topology, node_id: str) -> Ends:
    return ends(topology, (node_id,))


def _around(
    topology: Topology,
    index: AccessIndex,
    member: Ends,
    as_source: Iterable[int],
    as_destination: Iterable[int],
) -> list[Moved]:
    """A member's relations through the rules it is (or was) a source and a
    destination of."""
    out = []
    for position in as_source:
        others = _without(ends(topology, index.destinations[position]), member)
        if others:
            out.append(Moved(member, others))
    for position in as_destination:
        others = _without(ends(topology, index.sources[position]), member)
        ranges = frozenset(index.source_ranges[position])
        if others or ranges:
            out.append(Moved(others, member, ranges))
    return out


def _without(found: Ends, member: Ends) -> Ends:
    """`found` less the (one) member itself: a host is not its own peer."""
    if not found.hosts & member.hosts:
        return found
    return Ends(
        found.hosts - member.hosts,
        found.keys - member.keys,
        found.cidrs - member.cidrs,
        found.names - member.names,
    )


def _between_policies(topology: Topology, network: Network) -> list[Moved]:
    assert network.access is not None and network.previous_policy is not None
    before = {rule_shape(r): r for r in network.previous_policy.rules}
    after = {rule_shape(r): r for r in network.access.policy.rules}
    changed = [r for shape, r in before.items() if shape not in after]
    changed += [r for shape, r in after.items() if shape not in before]
    out = []
    for rule in changed:
        sources, destinations = network.access.rule_members(rule)
        ranges = frozenset(str(s) for s in rule.sources if isinstance(s, InRange))
        out.append(Moved(ends(topology, sources), ends(topology, destinations), ranges))
    return out
