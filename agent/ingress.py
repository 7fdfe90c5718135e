"""External clients as WireGuard peers, on an ingress gateway (pure).

The `clients` section lists the clients this host takes in: each is a peer
allowed only its own address, with no endpoint (the client dials in and keeps
its NAT mapping open; WireGuard learns where it is from its packets) and no
keepalive from this side. `with_clients` gives the desired state the peers
reconciler enforces: the control plane's peers and these together. A client
key that is also a peer's (the control plane refuses that) stays the peer.
"""

from __future__ import annotations

import msgspec

from events.desired import DesiredState, PeerEntry


def with_clients(desired: DesiredState) -> DesiredState:
    clients = desired.sections.clients
    if not clients:
        return desired
    peers = dict(desired.sections.peers)
    for key, client in clients.items():
        peers.setdefault(key, PeerEntry(allowed_ips=(client.address,), name=client.name))
    sections = msgspec.structs.replace(desired.sections, peers=peers)
    return msgspec.structs.replace(desired, sections=sections)
