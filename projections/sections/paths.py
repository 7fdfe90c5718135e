"""The `paths` section: how to reach a peer behind a NAT, keyed by its public key.

A host behind a NAT announces its private address; once a peer saw where its
packets come from (`host.endpoint_seen`, controlplane/rules/nat.py), every
viewer gets the endpoints to try, best first (the agent tries them in turn,
agent/nat.py):

- a viewer behind the same public address (the same NAT): the peer's LAN
  addresses first (traffic stays on the LAN, no hairpin through the router),
  then the public mapping;
- anyone else: the public mapping first, then the LAN addresses.

A peer nobody saw behind a NAT has no entry: it is reached at its `peers`
endpoint, as before. A pair of hosts a relay forwards between (protocol 7,
controlplane/rules/relays.py) has an entry both ways, whether or not either
was seen behind a NAT: its `relay` is where on the relay this viewer sends,
tried once the candidates (or the `peers` endpoint) fail.

Which peers a viewer has an entry for follows the `peers` section (its
policy included): the rereads are the peers section's, plus a host seen anew
re-reading its own peers (whether it shares their NAT moved), plus the
relays' rules below.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import ClassVar

import msgspec

from events.desired import PathEntry
from events.model import (
    Event,
    HostEndpointObserved,
    HostEndpointSeen,
    HostKeyRotated,
    NodeRemoved,
    RelayPairOpened,
    RelayRemoved,
)
from projections.sections.base import Reread
from projections.sections.peers import PeerSection, endpoint_of, peer_endpoint
from projections.sections.relays import closed_rereads, pair_rereads, relaying
from projections.topology import Host, RelayPair, Topology, pair_key


def endpoint_ip(endpoint: str) -> str:
    """The address of "ip", "ip:port" or "[v6]:port"."""
    try:
        return str(ipaddress.ip_address(endpoint))
    except ValueError:
        return endpoint.rpartition(":")[0].removeprefix("[").removesuffix("]")


def path_candidates(viewer: Host | None, peer: Host) -> tuple[str, ...]:
    """The endpoints `viewer` should try for `peer`, best first (empty: none
    beyond the peers section's)."""
    if not peer.seen:
        return ()
    announced = (endpoint_of((a,), peer.listen_port) for a in peer.endpoints)
    lan = tuple(e for e in announced if e and e != peer.seen)
    same_nat = (
        viewer is not None
        and bool(viewer.seen)
        and endpoint_ip(viewer.seen) == endpoint_ip(peer.seen)
    )
    return (*lan, peer.seen) if same_nat else (peer.seen, *lan)


class PathSection:
    name: ClassVar[str] = "paths"
    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        *PeerSection.reacts_to,
        HostEndpointSeen,
        RelayPairOpened,
        RelayRemoved,
    )

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.peers = PeerSection(topology)
        self._pairs_near: dict[str, bool] = {}

    def entries(self, host_id: str) -> dict[str, PathEntry]:
        found = {}
        for key in self.peers.entries(host_id):
            entry = self._path(host_id, key)
            if entry is not None:
                found[key] = entry
        return found

    def entry(self, host_id: str, key: str) -> PathEntry | None:
        if self.peers.entry(host_id, key) is None:
            return None
        return self._path(host_id, key)

    def _near_pairs(self, host_id: str) -> bool:
        """Whether a network of `host_id` has relayed pairs (cached for the
        batch: a snapshot asks once per peer)."""
        near = self._pairs_near.get(host_id)
        if near is None:
            near = self._pairs_near[host_id] = any(
                network.relay_pairs
                for node in self.topology.nodes_of_host(host_id)
                if (network := self.topology.networks.get(node.network)) is not None
            )
        return near

    def _path(self, host_id: str, key: str) -> PathEntry | None:
        peer_id = self.topology.host_by_public_key.get(key)
        peer = self.topology.hosts.get(peer_id) if peer_id is not None else None
        if peer is None:
            return None
        candidates = path_candidates(self.topology.hosts.get(host_id), peer)
        relayed = (
            relayed_pair(self.topology, host_id, peer.host_id)
            if self._near_pairs(host_id)
            else None
        )
        if relayed is None:
            return PathEntry(candidates=candidates) if candidates else None
        pair, relay_host, relay_name = relayed
        relay_at = peer_endpoint(relay_host)
        if relay_at is None:
            return PathEntry(candidates=candidates) if candidates else None
        direct = candidates or tuple(e for e in (peer_endpoint(peer),) if e)
        return PathEntry(
            candidates=direct,
            relay=f"{_with_port(relay_at, pair.port_for(host_id))}",
            relay_node=relay_name,
        )

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        """The peers section's rereads, narrowed to the keys of hosts seen
        behind a NAT (no one else has an entry: nothing to send), plus a host
        seen anew re-reading its own peers (whether it shares their NAT moved)."""
        if isinstance(event, RelayPairOpened):
            network = topology.networks.get(event.network)
            pair = network.relay_pairs.get(pair_key(*event.hosts)) if network else None
            return pair_rereads(topology, pair, PathSection.name) if pair is not None else ()
        if isinstance(event, RelayRemoved):
            network = topology.networks.get(event.network)
            return closed_rereads(topology, network, PathSection.name) if network else ()
        if isinstance(event, HostEndpointSeen):
            host = topology.hosts.get(event.host_id)
            if host is None:
                return ()
            keys = frozenset((host.public_key,))
            rereads = list(PeerSection.to_viewers(topology, host.host_id, keys, set()))
            own = frozenset(PeerSection(topology).entries(host.host_id))
            rereads.append(Reread(PeerSection.name, own, hosts=frozenset((host.host_id,))))
        else:
            rereads = list(PeerSection.rereads(topology, event))
        relayed = _relay_rereads(topology, event)
        # A key rotated away is no longer its host's: it goes as the host goes.
        rotated = {event.previous_key: event.host_id} if isinstance(event, HostKeyRotated) else {}
        narrowed = []
        for reread in rereads:
            keys = frozenset(k for k in reread.keys if _seen(topology, k, rotated))
            if keys:
                narrowed.append(
                    msgspec.structs.replace(reread, section=PathSection.name, keys=keys)
                )
        return [*narrowed, *relayed]


def _relay_rereads(topology: Topology, event: Event) -> list[Reread]:
    """A removed node's closed pairs (their hosts share another network, or
    it was their relay), and a relay's new endpoint, re-read by their hosts."""
    if isinstance(event, NodeRemoved):
        network = topology.networks.get(event.network)
        return closed_rereads(topology, network, PathSection.name) if network else []
    if isinstance(event, HostEndpointObserved):
        return [
            reread
            for network, node_id in relaying(topology, event.host_id)
            for pair in network.pairs_via(node_id)
            for reread in pair_rereads(topology, pair, PathSection.name)
        ]
    return []


def relayed_pair(topology: Topology, a: str, b: str) -> tuple[RelayPair, Host, str] | None:
    """The pair of hosts a and b if a relay forwards between them: with the
    relay's host and node name."""
    key = pair_key(a, b)
    for node in topology.nodes_of_host(a):
        network = topology.networks.get(node.network)
        pair = network.relay_pairs.get(key) if network is not None else None
        if pair is None:
            continue
        relay = topology.nodes.get(pair.relay)
        host = topology.hosts.get(relay.host_id) if relay is not None else None
        if relay is not None and host is not None:
            return pair, host, relay.name
    return None


def _with_port(endpoint: str, port: int) -> str:
    """`endpoint` ("ip:port" or "[v6]:port") with another port."""
    ip = endpoint_ip(endpoint)
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _seen(topology: Topology, key: str, rotated: dict[str, str]) -> bool:
    """Whether the host of public key `key` was seen behind a NAT."""
    host_id = topology.host_by_public_key.get(key) or rotated.get(key)
    host = topology.hosts.get(host_id) if host_id is not None else None
    return host is not None and (bool(host.seen) or _relayed(topology, host.host_id))


def _relayed(topology: Topology, host_id: str) -> bool:
    """Whether a relay forwards between `host_id` and some peer."""
    for node_id in topology.nodes_by_host.get(host_id, ()):
        network = topology.networks.get(topology.nodes[node_id].network)
        if network is not None and any(host_id in p.hosts for p in network.relay_pairs.values()):
            return True
    return False
