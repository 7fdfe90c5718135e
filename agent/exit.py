"""An exit node: this host's default route through an internet gateway.

Done the way wg-quick does it for `AllowedIPs = 0.0.0.0/0`, so that the
tunnel's own packets still leave through the underlay:

    ip rule add to BROKER lookup main               priority 32760   (each broker)
    ip rule add lookup main suppress_prefixlength 0 priority 32761
    ip rule add not fwmark 0xca6c lookup 51820      priority 32762
    ip route add default dev nm0 table 51820
    (and the WireGuard device's fwmark set to 0xca6c)

Everything unmarked that the main table would send by its default route goes
to table 51820 instead, i.e. into the tunnel; WireGuard's own UDP carries the
mark and takes the main table; routes more specific than a default (the LAN,
the overlay) still win; and the control plane's brokers stay on the underlay,
so the agent's connection survives the switch. Every rule and the route carry
the agent's routing protocol number (77): the agent reads back and removes
only those, and turning the exit off leaves the host's routing as it was.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any, Protocol

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.backend import BackendError
from agent.link import RTPROT_NETMESH

EXIT_TABLE = 51820
EXIT_MARK = 0xCA6C  # 51820, as wg-quick
PRIORITY_EXEMPT = 32760
PRIORITY_MAIN = 32761
PRIORITY_EXIT = 32762
_MAIN_TABLE = 254
_FIB_RULE_INVERT = 0x2


class ExitError(BackendError):
    pass


@dataclass(frozen=True, order=True)
class ExitRule:
    """One of the agent's routing rules: `exempt` (traffic to a broker stays on
    the main table), `main` (the main table's routes but its default) or
    `exit` (everything unmarked to the exit table)."""

    kind: str
    destination: str = ""  # for `exempt`: "ip/32"

    def __str__(self) -> str:
        match self.kind:
            case "exempt":
                return f"to {self.destination} lookup main"
            case "main":
                return "lookup main suppress_prefixlength 0"
        return f"not fwmark {EXIT_MARK:#x} lookup {EXIT_TABLE}"


@dataclass(frozen=True)
class ExitState:
    """The agent's rules as read back, and whether its exit table routes
    everything into the interface."""

    rules: frozenset[ExitRule] = frozenset()
    route: bool = False


def wanted_rules(exempt: tuple[str, ...]) -> frozenset[ExitRule]:
    return frozenset(
        {ExitRule("main"), ExitRule("exit"), *(ExitRule("exempt", cidr) for cidr in exempt)}
    )


class ExitControl(Protocol):
    async def read(self) -> ExitState: ...
    async def add_rule(self, rule: ExitRule) -> None: ...
    async def remove_rule(self, rule: ExitRule) -> None: ...
    async def add_route(self) -> None: ...
    async def remove_route(self) -> None: ...


class ExitRouting:
    """Rules and the exit table's route through rtnetlink, in the caller's
    network namespace."""

    def __init__(self, interface: str) -> None:
        self.interface = interface

    async def read(self) -> ExitState:
        ipr: Any = AsyncIPRoute()
        try:
            rules = set()
            for message in [m async for m in await ipr.rule("dump", family=socket.AF_INET)]:
                if message.get_attr("FRA_PROTOCOL") != RTPROT_NETMESH:
                    continue
                rule = _rule_of(message)
                if rule is not None:
                    rules.add(rule)
            index = await self._index(ipr)
            route = False
            if index is not None:
                try:
                    dump = await ipr.route("dump", table=EXIT_TABLE, family=socket.AF_INET)
                    routes = [m async for m in dump]
                    route = any(
                        m["dst_len"] == 0 and m.get_attr("RTA_OIF") == index for m in routes
                    )
                except NetlinkError:
                    route = False  # no such table yet
            return ExitState(rules=frozenset(rules), route=route)
        except NetlinkError as exc:
            raise ExitError(f"read routing rules: {exc}") from None
        finally:
            ipr.close()

    async def add_rule(self, rule: ExitRule) -> None:
        await self._rule("add", rule, ok=(17,))  # EEXIST

    async def remove_rule(self, rule: ExitRule) -> None:
        await self._rule("del", rule, ok=(2,))  # ENOENT

    async def add_route(self) -> None:
        await self._route("replace")

    async def remove_route(self) -> None:
        await self._route("del", ok=(3, 2))  # ESRCH, ENOENT

    async def _rule(self, command: str, rule: ExitRule, ok: tuple[int, ...]) -> None:
        args: dict[str, Any] = {"family": socket.AF_INET, "protocol": RTPROT_NETMESH}
        match rule.kind:
            case "exempt":
                network = ipaddress.ip_network(rule.destination)
                args |= {
                    "table": _MAIN_TABLE,
                    "priority": PRIORITY_EXEMPT,
                    "dst": str(network.network_address),
                    "dst_len": network.prefixlen,
                }
            case "main":
                args |= {"table": _MAIN_TABLE, "priority": PRIORITY_MAIN, "suppress_prefixlen": 0}
            case _:
                args |= {
                    "table": EXIT_TABLE,
                    "priority": PRIORITY_EXIT,
                    "fwmark": EXIT_MARK,
                    "fwmask": 0xFFFFFFFF,
                    "flags": _FIB_RULE_INVERT,
                }
        ipr: Any = AsyncIPRoute()
        try:
            await ipr.rule(command, **args)
        except NetlinkError as exc:
            if exc.code not in ok:
                raise ExitError(f"{command} rule {rule}: {exc}", retryable=False) from None
        finally:
            ipr.close()

    async def _route(self, command: str, ok: tuple[int, ...] = ()) -> None:
        ipr: Any = AsyncIPRoute()
        try:
            index = await self._index(ipr)
            if index is None:
                if command == "del":
                    return
                raise ExitError(f"no interface {self.interface}")
            await ipr.route(
                command,
                dst="0.0.0.0",
                dst_len=0,
                oif=index,
                table=EXIT_TABLE,
                proto=RTPROT_NETMESH,
                family=socket.AF_INET,
            )
        except NetlinkError as exc:
            if exc.code not in ok:
                raise ExitError(f"{command} default route table {EXIT_TABLE}: {exc}") from None
        finally:
            ipr.close()

    async def _index(self, ipr: Any) -> int | None:
        found = await ipr.link_lookup(ifname=self.interface)
        return int(found[0]) if found else None


def _rule_of(message: Any) -> ExitRule | None:
    priority = message.get_attr("FRA_PRIORITY")
    if priority == PRIORITY_EXIT:
        return ExitRule("exit")
    if priority == PRIORITY_MAIN:
        return ExitRule("main")
    if priority == PRIORITY_EXEMPT:
        dst = message.get_attr("FRA_DST")
        return ExitRule("exempt", f"{dst}/{message['dst_len']}") if dst else None
    return None


async def remove_all(control: ExitControl) -> None:
    """Take away every rule and route the agent made for an exit (`agent down`)."""
    state = await control.read()
    for rule in sorted(state.rules, key=lambda r: r.kind != "exit"):
        await control.remove_rule(rule)
    if state.route:
        await control.remove_route()


async def exempt_addresses(servers: tuple[str, ...]) -> tuple[str, ...]:
    """The IPv4 addresses (as /32) the broker URLs name, resolved now."""
    import asyncio
    from urllib.parse import urlsplit

    found: set[str] = set()
    loop = asyncio.get_running_loop()
    for url in servers:
        for part in url.split(","):
            host = urlsplit(part.strip() if "://" in part else f"nats://{part.strip()}").hostname
            if not host:
                continue
            try:
                infos = await loop.getaddrinfo(host, None, family=socket.AF_INET)
            except OSError:
                continue
            found.update(f"{info[4][0]}/32" for info in infos)
    return tuple(sorted(found))
