"""The `addresses` section: one interface address per node of the host, with
its network's prefix (so the connected route covers the network).

Addresses change only with memberships, and a host whose memberships change
gets a snapshot: this section has no rereads of its own.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import ClassVar

from events.desired import AddressEntry
from events.model import Event
from projections.sections.base import Reread
from projections.topology import Topology


@functools.lru_cache(maxsize=1024)
def prefixes(cidr: str) -> tuple[int, int]:
    """(network prefix length, host prefix length) of a network's addresses."""
    net = ipaddress.ip_network(cidr)
    return net.prefixlen, net.max_prefixlen


class AddressSection:
    reacts_to: ClassVar[tuple[type[Event], ...]] = ()
    name: ClassVar[str] = "addresses"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def entries(self, host_id: str) -> dict[str, AddressEntry]:
        found = {}
        for node in self.topology.nodes_of_host(host_id):
            network = self.topology.networks.get(node.network)
            if network is not None:
                found[f"{node.address}/{prefixes(network.cidr)[0]}"] = AddressEntry(
                    network=network.name
                )
        return dict(sorted(found.items()))

    def entry(self, host_id: str, key: str) -> AddressEntry | None:
        return self.entries(host_id).get(key)

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        return ()
