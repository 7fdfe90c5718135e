"""The `firewall` section: what may arrive at a host on the overlay, keyed by
source CIDR, each entry the ports allowed from there.

A network without a policy lets its whole range in (one entry, its CIDR,
"any"); a network with one lets in what its rules allow towards this host's
node: each source member's address (/32 or /128) and each CIDR source,
with the union of the ports of the rules that allow it. A host in several
networks gets the union. The agent drops whatever no entry allows, and
accepts replies to what the host opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from events.desired import FirewallEntry
from events.model import (
    Event,
    NodeJoined,
    NodeRemoved,
    NodeTagged,
    NodeUntagged,
    PolicySet,
)
from events.policy import ALL_TRAFFIC, Ports
from projections.access import canonical_ports
from projections.sections.base import Reread
from projections.sections.policy import moved
from projections.topology import Topology


class FirewallSection:
    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        NodeJoined,
        NodeRemoved,
        NodeTagged,
        NodeUntagged,
        PolicySet,
    )
    name: ClassVar[str] = "firewall"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def _allowed(self, host_id: str) -> dict[str, set[Ports]]:
        found: dict[str, set[Ports]] = {}
        for node in self.topology.nodes_of_host(host_id):
            network = self.topology.networks.get(node.network)
            if network is None:
                continue
            if network.access is None:
                found.setdefault(network.cidr, set()).update(ALL_TRAFFIC)
                continue
            for cidr, ports in network.access.firewall(node.node_id).items():
                found.setdefault(cidr, set()).update(ports)
        return found

    def entries(self, host_id: str) -> dict[str, FirewallEntry]:
        return {
            cidr: FirewallEntry(allow=canonical_ports(ports))
            for cidr, ports in sorted(self._allowed(host_id).items())
            if ports
        }

    def entry(self, host_id: str, key: str) -> FirewallEntry | None:
        ports: set[Ports] = set()
        for node in self.topology.nodes_of_host(host_id):
            network = self.topology.networks.get(node.network)
            if network is None:
                continue
            if network.access is None:
                if key == network.cidr:
                    ports.update(ALL_TRAFFIC)
            else:
                ports |= network.access.firewall_entry(node.node_id, key)
        return FirewallEntry(allow=canonical_ports(ports)) if ports else None

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        # Joins, departures and policy changes to or from none reconfigure the
        # host concerned (a snapshot); in a network without a policy nobody
        # else's firewall moves. Under a policy, destinations re-read their
        # sources' addresses.
        return [
            Reread(FirewallSection.name, m.sources.cidrs | m.ranges, hosts=m.destinations.hosts)
            for m in moved(topology, event)
            if m.destinations.hosts and (m.sources.cidrs or m.ranges)
        ]
