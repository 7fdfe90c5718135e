"""The `relays` section: on a relay host, the pairs it forwards.

Keyed by the pair ("HOSTA,HOSTB", host ids sorted); each entry gives the two
hosts and the port each sends to (controlplane/rules/relays.py opens pairs,
agent/relay.py forwards). The two hosts of a pair learn of it in their
`paths` section (the relay as their last candidate for each other).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

from events.desired import RelayEntry
from events.model import Event, NodeRemoved, RelayPairOpened, RelayRemoved
from projections.sections.base import Reread
from projections.topology import Network, RelayPair, Topology


def relay_entry(topology: Topology, pair: RelayPair) -> RelayEntry:
    names = tuple(
        host.name if (host := topology.hosts.get(h)) is not None else h for h in pair.hosts
    )
    return RelayEntry(hosts=pair.hosts, ports=pair.ports, names=(names[0], names[1]))


def relaying(topology: Topology, host_id: str) -> Iterator[tuple[Network, str]]:
    """The networks in which `host_id` is a relay, with its relay node's id."""
    for node in topology.nodes_of_host(host_id):
        network = topology.networks.get(node.network)
        if network is not None and node.node_id in network.relays:
            yield network, node.node_id


class RelaySection:
    name: ClassVar[str] = "relays"
    reacts_to: ClassVar[tuple[type[Event], ...]] = (RelayPairOpened, RelayRemoved, NodeRemoved)

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def entries(self, host_id: str) -> dict[str, RelayEntry]:
        found = {
            pair.key: relay_entry(self.topology, pair)
            for network, node_id in relaying(self.topology, host_id)
            for pair in network.pairs_via(node_id)
        }
        return dict(sorted(found.items()))

    def entry(self, host_id: str, key: str) -> RelayEntry | None:
        for network, node_id in relaying(self.topology, host_id):
            pair = network.relay_pairs.get(key)
            if pair is not None and pair.relay == node_id:
                return relay_entry(self.topology, pair)
        return None

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        match event:
            case RelayPairOpened(network=network_name, relay=relay):
                network = topology.networks.get(network_name)
                node = topology.nodes.get(relay)
                if network is None or node is None:
                    return ()
                key = ",".join(event.hosts)
                return (
                    Reread(RelaySection.name, frozenset((key,)), hosts=frozenset((node.host_id,))),
                )
            case RelayRemoved(network=network_name) | NodeRemoved(network=network_name):
                network = topology.networks.get(network_name)
                if network is None:
                    return ()
                return closed_rereads(topology, network, RelaySection.name)
        return ()


def closed_rereads(topology: Topology, network: Network, section: str) -> list[Reread]:
    """The relay hosts still there re-read the pairs the last removal closed
    (`section` "relays"), or each pair's hosts re-read each other ("paths")."""
    rereads = []
    for pair in network.closed_pairs:
        if section == RelaySection.name:
            node = topology.nodes.get(pair.relay)
            if node is not None:
                rereads.append(
                    Reread(section, frozenset((pair.key,)), hosts=frozenset((node.host_id,)))
                )
            continue
        rereads.extend(pair_rereads(topology, pair, section))
    return rereads


def pair_rereads(topology: Topology, pair: RelayPair, section: str) -> list[Reread]:
    """Each host of `pair` re-reads the other's key of `section`."""
    rereads = []
    for me, other in (pair.hosts, pair.hosts[::-1]):
        peer = topology.hosts.get(other)
        if peer is not None and me in topology.hosts:
            rereads.append(Reread(section, frozenset((peer.public_key,)), hosts=frozenset((me,))))
    return rereads
