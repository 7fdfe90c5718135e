"""The `peers` section: every other host the host shares a network with, keyed
by public key, allowed the addresses of that host's nodes in the shared networks.

A peer's entry may depend on who looks (the viewer): through which networks
it is seen. For a viewer in a single network it depends only on the peer and
that network, so within a batch N viewers of one network share N entries
instead of computing N x N.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import ClassVar

from events.desired import PeerEntry
from events.model import (
    Event,
    HostEndpointObserved,
    HostKeyRotated,
    HostRegistered,
    NetworkUpdated,
    NodeJoined,
    NodeRemoved,
    NodeTagged,
    NodeUntagged,
    PolicySet,
)
from projections.sections.addresses import prefixes
from projections.sections.base import Reread
from projections.sections.policy import moved, policy_of, viewers
from projections.topology import Host, Topology


def peer_endpoint(host: Host) -> str | None:
    """The first endpoint candidate, with the host's listen port unless it names one."""
    return endpoint_of(host.endpoints, host.listen_port)


@functools.lru_cache(maxsize=65536)
def endpoint_of(endpoints: tuple[str, ...], listen_port: int) -> str | None:
    """The first of `endpoints` as "ip:port" (`listen_port` where it names none)."""
    # Cached: a snapshot of N peers would parse N addresses otherwise.
    for candidate in endpoints:
        if not candidate:
            continue
        try:
            ip = ipaddress.ip_address(candidate)
        except ValueError:
            return candidate  # already "ip:port" / "[v6]:port"
        return f"[{ip}]:{listen_port}" if ip.version == 6 else f"{ip}:{listen_port}"
    return None


class PeerSection:
    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        NodeJoined,
        NodeRemoved,
        HostRegistered,
        HostEndpointObserved,
        HostKeyRotated,
        NetworkUpdated,
        NodeTagged,
        NodeUntagged,
        PolicySet,
    )
    name: ClassVar[str] = "peers"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._through: dict[tuple[str, str], PeerEntry | None] = {}
        self._rosters: dict[str, list[tuple[str, str, PeerEntry]]] = {}

    def entries(self, host_id: str) -> dict[str, PeerEntry]:
        only = self._only_network(host_id)
        if only is not None:
            index = policy_of(self.topology, only)
            if index is None:
                return {key: entry for h, key, entry in self._roster(only) if h != host_id}
            # Only the members it sees: in time proportional to them, not
            # to the network (a join under a policy costs what it changes).
            node_id = next(iter(self.topology.nodes_by_host[host_id]))
            found = {}
            for seen in index.visible(node_id):
                peer = self.topology.hosts.get(self.topology.nodes[seen].host_id)
                entry = self._through_network(peer, only) if peer is not None else None
                if peer is not None and entry is not None:
                    found[peer.public_key] = entry
            return dict(sorted(found.items()))
        others = {
            n.host_id
            for network in self.topology.networks_of_host(host_id)
            for n in self.topology.nodes_of_network(network)
        }
        found = {}
        for other in others:
            peer = self.topology.hosts.get(other)
            if peer is not None and other != host_id:
                entry = self._seen_by(host_id, peer)
                if entry is not None:
                    found[peer.public_key] = entry
        return dict(sorted(found.items()))

    def entry(self, host_id: str, key: str) -> PeerEntry | None:
        peer_id = self.topology.host_by_public_key.get(key)
        peer = self.topology.hosts.get(peer_id) if peer_id is not None else None
        if peer is None or peer.host_id == host_id:
            return None
        only = self._only_network(host_id)
        if only is not None and policy_of(self.topology, only) is None:
            return self._through_network(peer, only)
        return self._seen_by(host_id, peer)

    def _seen_by(self, host_id: str, peer: Host) -> PeerEntry | None:
        """`peer` through the networks it shares with `host_id` whose policy
        (if any) lets one of the two reach the other."""
        topology = self.topology
        mine = {topology.nodes[n].network: n for n in topology.nodes_by_host.get(host_id, ())}
        shared = set()
        for node_id in topology.nodes_by_host.get(peer.host_id, ()):
            network = topology.nodes[node_id].network
            if network not in mine:
                continue
            index = policy_of(topology, network)
            if index is None or index.sees(mine[network], node_id):
                shared.add(network)
        return _entry(topology, peer, shared)

    def _only_network(self, host_id: str) -> str | None:
        node_ids = self.topology.nodes_by_host.get(host_id, ())
        if len(node_ids) != 1:
            return None
        return self.topology.nodes[next(iter(node_ids))].network

    def _through_network(self, peer: Host, network: str) -> PeerEntry | None:
        cached = (peer.host_id, network)
        if cached not in self._through:
            self._through[cached] = _entry(self.topology, peer, {network})
        return self._through[cached]

    def _roster(self, network: str) -> list[tuple[str, str, PeerEntry]]:
        """(host, public key, entry) of every member of a network, by public key."""
        if network not in self._rosters:
            roster = []
            for host_id in {n.host_id for n in self.topology.nodes_of_network(network)}:
                peer = self.topology.hosts.get(host_id)
                entry = self._through_network(peer, network) if peer is not None else None
                if peer is not None and entry is not None:
                    roster.append((host_id, peer.public_key, entry))
            roster.sort(key=lambda item: item[1])
            self._rosters[network] = roster
        return self._rosters[network]

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        match event:
            case (
                NodeJoined(host_id=host_id, network=network)
                | NodeRemoved(host_id=host_id, network=network)
            ):
                networks = frozenset((network,))
            case HostRegistered(host_id=host_id) | HostEndpointObserved(host_id=host_id):
                networks = frozenset(topology.networks_of_host(host_id))
            case HostKeyRotated(host_id=host_id, public_key=key, previous_key=previous):
                # Peers drop the old key and take the new one, in place.
                keys = frozenset((key, previous))
                return PeerSection.to_viewers(topology, host_id, keys, set())
            case NetworkUpdated(network=network, keepalive=keepalive) if keepalive is not None:
                # Every member's entry as seen through this network changes.
                return PeerSection._everyone_in(topology, network)
            case NodeTagged() | NodeUntagged() | PolicySet():
                # Between two policies, or a member's tags: who sees whom moved.
                return PeerSection._policy_moves(topology, event)
            case _:
                return ()
        host = topology.hosts.get(host_id)
        if host is None or not networks:
            return ()
        keys = frozenset((host.public_key,))
        if isinstance(event, (NodeJoined, NodeRemoved)):
            if policy_of(topology, event.network) is not None:
                # Under a policy, only the members that see the node learn of
                # it (or of its departure); it learns of them by a snapshot.
                return PeerSection._policy_moves(topology, event)
            return (Reread(PeerSection.name, keys, networks=networks, owner=host_id),)
        return PeerSection.to_viewers(topology, host_id, keys, networks)

    @staticmethod
    def to_viewers(
        topology: Topology, host_id: str, keys: frozenset[str], networks: set[str] | frozenset[str]
    ) -> Sequence[Reread]:
        """Everyone who sees `host_id` re-reads `keys`: every member of its
        networks without a policy (`networks` only, when given), the members
        its policies let see it in the others."""
        open_networks = set()
        hosts: set[str] = set()
        for node in topology.nodes_of_host(host_id):
            if networks and node.network not in networks:
                continue
            seen = viewers(topology, node.network, node.node_id)
            if seen is None:
                open_networks.add(node.network)
            else:
                hosts |= seen
        rereads = []
        if open_networks:
            rereads.append(
                Reread(PeerSection.name, keys, networks=frozenset(open_networks), owner=host_id)
            )
        hosts.discard(host_id)
        if hosts:
            rereads.append(Reread(PeerSection.name, keys, hosts=frozenset(hosts)))
        return rereads

    @staticmethod
    def _policy_moves(topology: Topology, event: Event) -> Sequence[Reread]:
        """Both ends of every relation the event moved re-read each other."""
        rereads = []
        for m in moved(topology, event):
            if m.sources.keys and m.destinations.hosts:
                rereads.append(Reread(PeerSection.name, m.sources.keys, hosts=m.destinations.hosts))
            if m.destinations.keys and m.sources.hosts:
                rereads.append(Reread(PeerSection.name, m.destinations.keys, hosts=m.sources.hosts))
        return rereads

    @staticmethod
    def _everyone_in(topology: Topology, network: str) -> Sequence[Reread]:
        """Every member's entry re-read by whoever sees it: in a network
        without a policy every member, under one only its viewers (a host
        must not learn, even as a removal, the key of one it may not see)."""
        networks = frozenset((network,))
        policed = policy_of(topology, network) is not None
        rereads = []
        for node in topology.nodes_of_network(network):
            host = topology.hosts.get(node.host_id)
            if host is None:
                continue
            keys = frozenset((host.public_key,))
            if not policed:
                rereads.append(
                    Reread(PeerSection.name, keys, networks=networks, owner=host.host_id)
                )
                continue
            seen = viewers(topology, network, node.node_id) or frozenset()
            if seen - {host.host_id}:
                rereads.append(Reread(PeerSection.name, keys, hosts=seen - {host.host_id}))
        return rereads


def _entry(topology: Topology, peer: Host, networks: set[str]) -> PeerEntry | None:
    """`peer` as seen through `networks`: its addresses in them, the smallest
    keepalive of them; None when it has a node in none of them."""
    allowed = []
    keepalive: int | None = None
    for node in topology.nodes_of_host(peer.host_id):
        network = topology.networks.get(node.network)
        if node.network not in networks or network is None:
            continue
        allowed.append(f"{node.address}/{prefixes(network.cidr)[1]}")
        keepalive = network.keepalive if keepalive is None else min(keepalive, network.keepalive)
    if not allowed:
        return None
    return PeerEntry(
        allowed_ips=tuple(sorted(allowed)),
        endpoint=peer_endpoint(peer),
        persistent_keepalive=keepalive or 0,
        name=peer.name,
    )
