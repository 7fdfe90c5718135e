"""The `interface` section: the host's WireGuard listen port, MTU and key epoch.

One entry (`WIREGUARD`). The MTU is the smallest of the host's networks' (one
interface carries them all); a host in no network keeps its port and the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from events.desired import WIREGUARD, InterfaceEntry
from events.model import Event, HostEndpointObserved, HostKeyRotationRequested, NetworkUpdated
from projections.sections.base import Reread
from projections.topology import Topology

DEFAULT_MTU = 1420
_ENTRY = frozenset({WIREGUARD})


class InterfaceSection:
    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        HostEndpointObserved,
        HostKeyRotationRequested,
        NetworkUpdated,
    )
    name: ClassVar[str] = "interface"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def entries(self, host_id: str) -> dict[str, InterfaceEntry]:
        entry = self.entry(host_id, WIREGUARD)
        return {WIREGUARD: entry} if entry is not None else {}

    def entry(self, host_id: str, key: str) -> InterfaceEntry | None:
        host = self.topology.hosts.get(host_id)
        if host is None or key != WIREGUARD:
            return None
        mtus = [
            network.mtu
            for node in self.topology.nodes_of_host(host_id)
            if (network := self.topology.networks.get(node.network)) is not None
        ]
        return InterfaceEntry(
            listen_port=host.listen_port,
            mtu=min(mtus) if mtus else DEFAULT_MTU,
            key_epoch=host.key_epoch,
        )

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        match event:
            case HostEndpointObserved(host_id=host_id) | HostKeyRotationRequested(host_id=host_id):
                return (Reread(InterfaceSection.name, _ENTRY, hosts=frozenset((host_id,))),)
            case NetworkUpdated(network=network, mtu=mtu) if mtu is not None:
                # Each member's MTU is the smallest of its networks'.
                return (Reread(InterfaceSection.name, _ENTRY, networks=frozenset((network,))),)
        return ()
