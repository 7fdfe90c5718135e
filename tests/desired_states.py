"""Desired states for agent tests, written the way people think of them."""

from __future__ import annotations

from collections.abc import Iterable

from events.desired import (
    WIREGUARD,
    AddressEntry,
    DesiredState,
    FirewallEntry,
    InterfaceEntry,
    PeerEntry,
    RouteEntry,
    Sections,
)


def desired_state(
    *,
    host_id: str = "h",
    revision: int = 5,
    addresses: Iterable[str] = (),
    listen_port: int = 51820,
    mtu: int = 1420,
    key_epoch: int = 0,
    peers: Iterable[tuple[str, PeerEntry]] = (),
    routes: Iterable[str] = (),
    firewall: Iterable[tuple[str, tuple[str, ...]]] = (),
) -> DesiredState:
    return DesiredState(
        host_id=host_id,
        revision=revision,
        sections=Sections(
            interface={
                WIREGUARD: InterfaceEntry(listen_port=listen_port, mtu=mtu, key_epoch=key_epoch)
            },
            addresses={a: AddressEntry() for a in addresses},
            peers=dict(sorted(peers)),
            routes={r: RouteEntry() for r in routes},
            firewall={cidr: FirewallEntry(allow=allow) for cidr, allow in sorted(firewall)},
        ),
    )
