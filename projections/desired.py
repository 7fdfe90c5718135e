"""Where a host's WireGuard configuration comes from, and what to send when it moves.

A host is in one or more networks (one node each) and has one WireGuard
interface. Its desired state: an address per node (with the network's prefix, so
the connected route covers the network), and one peer per other host it shares
a network with, allowed the addresses of that host's nodes in the shared
networks.

`desired_for` derives a whole state (a snapshot); `DesiredChanges` collects what
a batch of events touched and `messages` turns it into one snapshot or delta per
host whose revision moved. A change touching k hosts costs O(k) here: a host
joining a network of N gives N-1 one-peer deltas and one snapshot. Pure: the
same topology gives the same messages.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

from events.desired import DesiredDelta, DesiredMessage, DesiredState, InterfaceConfig, PeerConfig
from projections.topology import Host, Network, Topology, Touched


def peer_endpoint(host: Host) -> str | None:
    """The first endpoint candidate, with the host's listen port unless it names one."""
    return _endpoint(host.endpoints, host.listen_port)


@functools.lru_cache(maxsize=65536)
def _endpoint(endpoints: tuple[str, ...], listen_port: int) -> str | None:
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


def _host_prefix(network: Network) -> tuple[int, int]:
    """(network prefix length, host prefix length) of a network's addresses."""
    return _prefixes(network.cidr)


@functools.lru_cache(maxsize=1024)
def _prefixes(cidr: str) -> tuple[int, int]:
    net = ipaddress.ip_network(cidr)
    return net.prefixlen, net.max_prefixlen


def interface_for(topology: Topology, host_id: str) -> InterfaceConfig | None:
    """The interface settings of a host; None for an unknown host."""
    host = topology.hosts.get(host_id)
    if host is None:
        return None
    addresses = []
    mtu = 0
    for node in topology.nodes_of_host(host_id):
        network = topology.networks.get(node.network)
        if network is None:
            continue
        addresses.append(f"{node.address}/{_host_prefix(network)[0]}")
        mtu = network.mtu if mtu == 0 else min(mtu, network.mtu)
    return InterfaceConfig(
        addresses=tuple(sorted(addresses)),
        listen_port=host.listen_port,
        mtu=mtu or 1420,
        key_epoch=host.key_epoch,
    )


def peer_for(topology: Topology, host_id: str, peer_id: str) -> PeerConfig | None:
    """Host `peer_id` as a peer of host `host_id`; None when they share no network."""
    peer = topology.hosts.get(peer_id)
    if peer is None or peer_id == host_id:
        return None
    shared = topology.networks_of_host(host_id) & topology.networks_of_host(peer_id)
    return _peer_entry(topology, peer, shared)


def _peer_entry(topology: Topology, peer: Host, networks: set[str]) -> PeerConfig | None:
    """`peer` as seen through `networks`: its addresses in them, the smallest
    keepalive of them; None when it has a node in none of them."""
    allowed = []
    keepalive: int | None = None
    for node in topology.nodes_of_host(peer.host_id):
        network = topology.networks.get(node.network)
        if node.network not in networks or network is None:
            continue
        allowed.append(f"{node.address}/{_host_prefix(network)[1]}")
        keepalive = network.keepalive if keepalive is None else min(keepalive, network.keepalive)
    if not allowed:
        return None
    return PeerConfig(
        public_key=peer.public_key,
        allowed_ips=tuple(sorted(allowed)),
        endpoint=peer_endpoint(peer),
        persistent_keepalive=keepalive or 0,
        name=peer.name,
    )


@dataclass
class PeerCache:
    """Peer entries computed once per batch: for a host in a single network, a
    peer's entry depends only on the peer and that network, so N hosts of one
    network share N entries instead of computing N x N."""

    topology: Topology
    _single: dict[tuple[str, str], PeerConfig | None] = field(default_factory=dict)
    _rosters: dict[str, list[tuple[str, PeerConfig]]] = field(default_factory=dict)

    def only_network(self, host_id: str) -> str | None:
        node_ids = self.topology.nodes_by_host.get(host_id, ())
        if len(node_ids) != 1:
            return None
        return self.topology.nodes[next(iter(node_ids))].network

    def _network_entry(self, peer_id: str, network_name: str) -> PeerConfig | None:
        key = (peer_id, network_name)
        if key not in self._single:
            peer = self.topology.hosts.get(peer_id)
            self._single[key] = (
                _peer_entry(self.topology, peer, {network_name}) if peer is not None else None
            )
        return self._single[key]

    def peer(self, host_id: str, peer_id: str) -> PeerConfig | None:
        if peer_id == host_id:
            return None
        network = self.only_network(host_id)
        if network is None:
            return peer_for(self.topology, host_id, peer_id)
        return self._network_entry(peer_id, network)

    def roster(self, network_name: str) -> list[tuple[str, PeerConfig]]:
        """(host, entry) of every member of a network, sorted by public key."""
        if network_name not in self._rosters:
            members = {n.host_id for n in self.topology.nodes_of_network(network_name)}
            entries = [
                (h, e) for h in members if (e := self._network_entry(h, network_name)) is not None
            ]
            entries.sort(key=lambda item: item[1].public_key)
            self._rosters[network_name] = entries
        return self._rosters[network_name]


def desired_for(
    topology: Topology, host_id: str, revision: int | None = None, cache: PeerCache | None = None
) -> DesiredState | None:
    """The whole state host `host_id` should have; None for an unknown host.

    A host in no network (its last node removed) gets an empty state: no
    addresses, no peers. That is how its agent learns to let go. `revision`
    defaults to the host's revision in the topology.
    """
    interface = interface_for(topology, host_id)
    if interface is None:
        return None
    cache = cache or PeerCache(topology)
    only = cache.only_network(host_id)
    if only is not None:
        peers = tuple(entry for h, entry in cache.roster(only) if h != host_id)
    else:
        others = {
            n.host_id
            for network in topology.networks_of_host(host_id)
            for n in topology.nodes_of_network(network)
        }
        found = (peer_for(topology, host_id, other) for other in others)
        peers = tuple(sorted((p for p in found if p is not None), key=lambda p: p.public_key))
    return DesiredState.of(
        host_id, topology.revision_of(host_id) if revision is None else revision, interface, peers
    )


@dataclass
class DesiredChanges:
    """What a batch of events did to desired states, accumulated event by event."""

    reconfigured: set[str] = field(default_factory=set)
    interfaces: set[str] = field(default_factory=set)
    # network -> hosts whose entry every member of the network must re-read
    peers_by_network: dict[str, set[str]] = field(default_factory=dict)
    # host -> public keys it had before (rotated away): peers drop them
    retired_keys: dict[str, set[str]] = field(default_factory=dict)

    def add(self, touched: Touched) -> None:
        self.reconfigured |= touched.reconfigured
        self.interfaces |= touched.interfaces
        for host_id, network in touched.peer_changes:
            self.peers_by_network.setdefault(network, set()).add(host_id)
        for host_id, key in touched.retired_keys:
            self.retired_keys.setdefault(host_id, set()).add(key)

    def __bool__(self) -> bool:
        return bool(self.reconfigured or self.interfaces or self.peers_by_network)

    def candidates(self, topology: Topology) -> dict[str, set[str]]:
        """Hosts that may need a message -> the peers whose entries they must re-read."""
        out: dict[str, set[str]] = {h: set() for h in self.reconfigured | self.interfaces}
        for network, changed in self.peers_by_network.items():
            for host_id in changed:
                out.setdefault(host_id, set())
            for node_id in topology.nodes_by_network.get(network, ()):
                member = topology.nodes[node_id].host_id
                out.setdefault(member, set()).update(changed - {member})
        return out


def messages(
    topology: Topology,
    changes: DesiredChanges,
    published: dict[str, int],
    *,
    snapshots_only: bool = False,
) -> list[DesiredMessage]:
    """One message per host whose revision moved past `published` (host ->
    revision its subject is at): a snapshot for a new or reconfigured host
    (or for every host with `snapshots_only`, the full-state baseline), a delta
    for the others. Sorted by host."""
    cache = PeerCache(topology)
    out: list[DesiredMessage] = []
    for host_id, peer_ids in sorted(changes.candidates(topology).items()):
        if host_id not in topology.hosts:
            continue
        revision = topology.revision_of(host_id)
        base = published.get(host_id)
        if base is not None and base >= revision:
            continue
        if base is None or snapshots_only or host_id in changes.reconfigured:
            state = desired_for(topology, host_id, revision, cache)
            assert state is not None
            out.append(state)
            continue
        upsert: list[PeerConfig] = []
        remove: list[str] = []
        for peer_id in sorted(peer_ids):
            entry = cache.peer(host_id, peer_id)
            if entry is not None:
                upsert.append(entry)
            elif peer_id in topology.hosts:
                remove.append(topology.hosts[peer_id].public_key)
            remove.extend(sorted(changes.retired_keys.get(peer_id, ())))
        out.append(
            DesiredDelta(
                host_id=host_id,
                revision=revision,
                base=base,
                interface=interface_for(topology, host_id)
                if host_id in changes.interfaces
                else None,
                upsert=tuple(upsert),
                remove=tuple(remove),
            )
        )
    return out
