"""The `dns` and `dns_zones` sections: the names a host's DNS server answers,
and the domains it answers for.

`dns`, keyed by the whole name: every node of the host's networks as
NODE.DOMAIN (its overlay address: A or AAAA), and each network's custom
records. Under an access policy a host gets only the names of the members it
sees (as its peers; and its own), so a name tells nothing the peer list does
not. A record and a node with the same name: the node's wins (the rules refuse
a record named as a node, but a node may join with a record's name later).

`dns_zones`, keyed by domain: one per network of the host. Both change with
memberships (a snapshot); `dns` also by one name per join, departure or record,
re-read by the members who see it: a join in a network of N hosts is N-1
deltas of one name each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from events.desired import DnsEntry, DnsZoneEntry
from events.dns import fqdn, relative_name, within
from events.model import (
    ClientCreated,
    ClientRemoved,
    DnsRecordAdded,
    DnsRecordRemoved,
    Event,
    IngressRemoved,
    NodeJoined,
    NodeRemoved,
    NodeTagged,
    NodeUntagged,
    PolicySet,
)
from projections.sections.base import Reread
from projections.sections.policy import moved, policy_of
from projections.topology import Topology

# A zone's names: whole name -> (entry, the node it names; "" for a record).
Zone = dict[str, tuple[DnsEntry, str]]


def zone_of(topology: Topology, network: str) -> Zone:
    """Every name in `network`'s domain, as a host that sees every member
    would have it."""
    found = topology.networks.get(network)
    if found is None:
        return {}
    zone: Zone = {}
    for record in found.records.values():
        entry = DnsEntry(a=record.a, aaaa=record.aaaa, cname=record.cname)
        zone[fqdn(record.name, found.dns_domain)] = (entry, "")
    for client in found.clients.values():  # named by an admin, as records are
        zone[fqdn(client.name, found.dns_domain)] = (DnsEntry(a=(client.address,)), "")
    for node in topology.nodes_of_network(network):  # by node id: the first takes a name
        name = topology.dns_name(node)
        if name is None or zone.get(name, (None, ""))[1]:
            continue
        v6 = ":" in node.address
        entry = DnsEntry(aaaa=(node.address,)) if v6 else DnsEntry(a=(node.address,))
        zone[name] = (entry, node.node_id)
    return zone


class DnsSection:
    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        NodeJoined,
        NodeRemoved,
        NodeTagged,
        NodeUntagged,
        PolicySet,
        DnsRecordAdded,
        DnsRecordRemoved,
        ClientCreated,
        ClientRemoved,
        IngressRemoved,
    )
    name: ClassVar[str] = "dns"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._zones: dict[str, Zone] = {}  # per network, for the batch

    def _zone(self, network: str) -> Zone:
        if network not in self._zones:
            self._zones[network] = zone_of(self.topology, network)
        return self._zones[network]

    def _sees(self, network: str, node_id: str) -> set[str] | None:
        """The nodes whose names `node_id` may know (itself included); None: all."""
        index = policy_of(self.topology, network)
        if index is None:
            return None
        return index.visible(node_id) | {node_id}

    def entries(self, host_id: str) -> dict[str, DnsEntry]:
        found: dict[str, DnsEntry] = {}
        for node in self.topology.nodes_of_host(host_id):
            seen = self._sees(node.network, node.node_id)
            for name, (entry, owner) in self._zone(node.network).items():
                if not owner or seen is None or owner in seen:
                    found[name] = entry
        return dict(sorted(found.items()))

    def entry(self, host_id: str, key: str) -> DnsEntry | None:
        for node in self.topology.nodes_of_host(host_id):
            network = self.topology.networks.get(node.network)
            if network is None or not within(key, network.dns_domain):
                continue
            named = self._zone(node.network).get(key)
            if named is None:
                return None
            entry, owner = named
            seen = self._sees(node.network, node.node_id)
            return entry if not owner or seen is None or owner in seen else None
        return None

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        clients = _client_names(topology, event)
        named = DnsSection._rereads(topology, event)
        return [*named, *clients] if clients else named

    @staticmethod
    def _rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        match event:
            case DnsRecordAdded(network=network) | DnsRecordRemoved(network=network):
                record = _record_key(topology, event)
                if record is None:
                    return ()
                return (Reread(DnsSection.name, record, networks=frozenset((network,))),)
            case (
                NodeJoined(network=network, node_id=node_id)
                | NodeRemoved(network=network, node_id=node_id)
            ):
                node = topology.nodes.get(node_id) or topology.last_dropped
                name = topology.dns_name(node) if node and node.node_id == node_id else None
                if policy_of(topology, network) is not None:
                    moves = DnsSection._policy_moves(topology, event)
                    if name is None or not _is_a_record(topology, network, name):
                        return moves
                    # A record of that name: it is everyone's until a node
                    # takes the name, and everyone's again once it goes.
                    everyone = Reread(
                        DnsSection.name, frozenset((name,)), networks=frozenset((network,))
                    )
                    return [*moves, everyone]
                if node is None or name is None:
                    return ()
                # Its own host gets a snapshot (its memberships moved).
                key = frozenset((name,))
                networks = frozenset((network,))
                return (Reread(DnsSection.name, key, networks=networks, owner=node.host_id),)
            case NodeTagged() | NodeUntagged() | PolicySet():
                return DnsSection._policy_moves(topology, event)
        return ()

    @staticmethod
    def _policy_moves(topology: Topology, event: Event) -> Sequence[Reread]:
        """Under a policy, both ends of every relation the event moved re-read
        each other's names (and nobody else learns them, not even as removals)."""
        rereads = []
        for m in moved(topology, event):
            if m.sources.names and m.destinations.hosts:
                rereads.append(Reread(DnsSection.name, m.sources.names, hosts=m.destinations.hosts))
            if m.destinations.names and m.sources.hosts:
                rereads.append(Reread(DnsSection.name, m.destinations.names, hosts=m.sources.hosts))
        return rereads


def _is_a_record(topology: Topology, network: str, name: str) -> bool:
    """Whether whole name `name` is a custom record's (or a client's) in `network`."""
    found = topology.networks.get(network)
    if found is None:
        return False
    try:
        relative = relative_name(name, found.dns_domain)
    except ValueError:
        return False
    return relative in found.records or relative in found.clients


def _client_names(topology: Topology, event: Event) -> list[Reread]:
    """External clients' names a client event (or the departure of their
    gateway) added or took away: every member of the network re-reads them."""
    match event:
        case ClientCreated(network=network, name=name):
            names = [name]
        case (
            ClientRemoved(network=network)
            | IngressRemoved(network=network)
            | NodeRemoved(network=network)
        ):
            found = topology.networks.get(network)
            names = [c.name for c in found.departed_clients] if found is not None else []
        case _:
            return []
    net = topology.networks.get(network)
    if net is None or not names:
        return []
    keys = frozenset(fqdn(name, net.dns_domain) for name in names)
    return [Reread(DnsSection.name, keys, networks=frozenset((network,)))]


def _record_key(
    topology: Topology, event: DnsRecordAdded | DnsRecordRemoved
) -> frozenset[str] | None:
    """The whole name a record event changed (the topology has folded it)."""
    network = topology.networks.get(event.network)
    if network is None:
        return None
    try:
        return frozenset((fqdn(relative_name(event.name, network.dns_domain), network.dns_domain),))
    except ValueError:
        return None


class DnsZoneSection:
    reacts_to: ClassVar[tuple[type[Event], ...]] = ()
    name: ClassVar[str] = "dns_zones"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def entries(self, host_id: str) -> dict[str, DnsZoneEntry]:
        found = {}
        for node in self.topology.nodes_of_host(host_id):
            network = self.topology.networks.get(node.network)
            if network is not None:
                found[network.dns_domain] = DnsZoneEntry(network=network.name)
        return dict(sorted(found.items()))

    def entry(self, host_id: str, key: str) -> DnsZoneEntry | None:
        return self.entries(host_id).get(key)

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        # Memberships and domains change only through snapshots.
        return ()
