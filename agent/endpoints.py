"""Where peers can reach this host: its global addresses, unless told."""

from __future__ import annotations

import ipaddress

from pyroute2 import AsyncIPRoute


async def detect_endpoints(exclude: str) -> list[str]:
    """Global unicast IPv4 addresses of this machine, except on `exclude` (our
    own WireGuard interface), loopback and link-local. Private addresses are
    kept: in a LAN or a VPC they are exactly what peers use."""
    found: list[str] = []
    async with AsyncIPRoute() as ipr:
        names = {}
        async for link in await ipr.link("dump"):
            names[link["index"]] = link.get("ifname")
        async for msg in await ipr.addr("dump", family=2):
            if names.get(msg["index"]) == exclude:
                continue
            address = msg.get("address")
            if address is None:
                continue
            ip = ipaddress.ip_address(address)
            if ip.is_loopback or ip.is_link_local or ip.is_multicast:
                continue
            found.append(str(ip))
    return sorted(set(found))
