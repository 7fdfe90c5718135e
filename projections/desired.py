"""Where a host's WireGuard configuration comes from: `desired_for`.

A host is in one or more networks (one node each) and has one WireGuard
interface. Its desired state: an address per node (with the network's prefix, so
the connected route covers the network), and one peer per other host it shares
a network with, allowed the addresses of that host's nodes in the shared
networks. Pure: the same topology gives the same state.
"""

from __future__ import annotations

import ipaddress

from events.desired import DesiredState, PeerConfig
from projections.topology import Host, Topology


def peer_endpoint(host: Host) -> str | None:
    """The first endpoint candidate, with the host's listen port unless it names one."""
    for candidate in host.endpoints:
        if not candidate:
            continue
        try:
            ip = ipaddress.ip_address(candidate)
        except ValueError:
            return candidate  # already "ip:port" / "[v6]:port"
        return f"[{ip}]:{host.listen_port}" if ip.version == 6 else f"{ip}:{host.listen_port}"
    return None


def desired_for(topology: Topology, host_id: str, revision: int) -> DesiredState | None:
    """The state host `host_id` should have; None for an unknown host.

    A host in no network (its last node removed) gets an empty state: no
    addresses, no peers. That is how its agent learns to let go.
    """
    host = topology.hosts.get(host_id)
    if host is None:
        return None
    nodes = topology.nodes_of_host(host_id)
    addresses: list[str] = []
    mtu = 0
    allowed: dict[str, list[str]] = {}
    keepalive: dict[str, int] = {}
    for node in nodes:
        network = topology.networks.get(node.network)
        if network is None:
            continue
        prefix = ipaddress.ip_network(network.cidr).prefixlen
        addresses.append(f"{node.address}/{prefix}")
        mtu = network.mtu if mtu == 0 else min(mtu, network.mtu)
        for other in topology.nodes_of_network(node.network):
            if other.host_id == host_id:
                continue
            max_prefix = 32 if ipaddress.ip_address(other.address).version == 4 else 128
            allowed.setdefault(other.host_id, []).append(f"{other.address}/{max_prefix}")
            previous = keepalive.get(other.host_id)
            keepalive[other.host_id] = (
                network.keepalive if previous is None else min(previous, network.keepalive)
            )
    peers = []
    for peer_id in sorted(allowed):
        peer = topology.hosts.get(peer_id)
        if peer is None:
            continue
        peers.append(
            PeerConfig(
                public_key=peer.public_key,
                allowed_ips=tuple(sorted(allowed[peer_id])),
                endpoint=peer_endpoint(peer),
                persistent_keepalive=keepalive[peer_id],
                name=peer.name,
            )
        )
    return DesiredState(
        host_id=host_id,
        revision=revision,
        addresses=tuple(sorted(addresses)),
        listen_port=host.listen_port,
        mtu=mtu or 1420,
        peers=tuple(peers),
    )
