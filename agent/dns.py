"""The DNS reconciler: the host's DNS server and the host's resolver pointed
at it (split DNS), from the `dns` and `dns_zones` sections.

`plan_dns` (pure) compares what is served and configured (`DnsState`) with
the desired state: the server answers the zone on every overlay address while
the host has zones, and the host's resolver sends the zones' domains to the
first of them; with no zones, nothing is served and the resolver is given back.
`AgentDns` is the machine's side (agent/dnsserver.py, agent/resolver.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from agent.dnsserver import DnsServer
from agent.dnszone import Zone
from agent.resolver import ResolverControl, ResolverError, Routing, servers_of
from events.desired import DesiredState


@dataclass(frozen=True)
class DnsState:
    """What the server serves and what of ours the resolver holds."""

    listening: tuple[str, ...] = ()  # addresses the server answers on
    zone: Zone = field(default_factory=Zone)
    routing: Routing | None = None  # None: the host's resolver is as it was


@dataclass(frozen=True)
class ServeDns:
    addresses: tuple[str, ...]
    zone: Zone

    def __str__(self) -> str:
        if not self.addresses:
            return "stop serving DNS"
        return (
            f"serve DNS on {', '.join(self.addresses)} port 53: "
            f"{len(self.zone.names)} name(s) in {', '.join(self.zone.domains)}"
        )


@dataclass(frozen=True)
class PointResolver:
    routing: Routing

    def __str__(self) -> str:
        domains = ", ".join(self.routing.domains)
        return f"point the host's resolver at {self.routing.server} for {domains}"


@dataclass(frozen=True)
class RestoreResolver:
    def __str__(self) -> str:
        return "give the host's resolver back as it was"


DnsOp = ServeDns | PointResolver | RestoreResolver


class DnsControl(Protocol):
    async def read(self) -> DnsState: ...

    async def serve(self, addresses: tuple[str, ...], zone: Zone) -> None:
        """Raises BackendError."""
        ...

    async def point(self, routing: Routing) -> None:
        """Raises BackendError."""
        ...

    async def restore(self) -> None:
        """Raises BackendError."""
        ...

    async def close(self) -> None:
        """The agent stops: nothing served any more (the resolver stays as it is)."""
        ...


def desired_dns(desired: DesiredState) -> tuple[tuple[str, ...], Zone, Routing | None]:
    """(addresses to serve on, the zone, the resolver's routing) a state asks for."""
    zones = desired.sections.dns_zones
    if not zones:
        return (), Zone(), None
    addresses = tuple(sorted(a.split("/")[0] for a in desired.sections.addresses))
    server = servers_of(sorted(desired.sections.addresses))
    zone = Zone.of(desired.sections.dns, zones)
    routing = Routing(server, tuple(sorted(zones))) if server is not None else None
    return addresses, zone, routing


def plan_dns(desired: DesiredState, actual: DnsState | None) -> list[DnsOp]:
    """Serve first, then point the resolver (never at a server not yet
    answering); with nothing to serve, give the resolver back first. `actual`
    None: the agent has no DNS control (only a state without zones needs none)."""
    addresses, zone, routing = desired_dns(desired)
    have = actual if actual is not None else DnsState()
    ops: list[DnsOp] = []
    if routing is None and have.routing is not None:
        ops.append(RestoreResolver())
    if have.listening != addresses or have.zone != zone:
        ops.append(ServeDns(addresses, zone))
    if routing is not None and have.routing != routing:
        ops.append(PointResolver(routing))
    return ops


class AgentDns:
    """The real thing: the asyncio server and the host's resolver."""

    def __init__(self, resolver: ResolverControl, server: DnsServer | None = None) -> None:
        self.resolver = resolver
        self.server = server or DnsServer(resolver.upstreams)

    async def read(self) -> DnsState:
        try:
            routing = await self.resolver.read()
        except ResolverError:
            # Unreadable: planned as not pointed, so the apply says why, as
            # this reconciler's failure, not the whole pass's.
            routing = None
        return DnsState(self.server.listening, self.server.zone, routing)

    async def serve(self, addresses: tuple[str, ...], zone: Zone) -> None:
        await self.server.serve(addresses, zone)

    async def point(self, routing: Routing) -> None:
        await self.resolver.point(routing)

    async def restore(self) -> None:
        await self.resolver.restore()

    async def close(self) -> None:
        """The agent stops: its server with it. The resolver stays pointed at
        the overlay address, as the interface stays up (a restart then
        changes nothing on the machine): meanwhile that address refuses
        queries, so the C library and resolved move on at once. `agent down`
        gives the resolver back."""
        await self.server.close()
