"""IPv4 forwarding on the interfaces an egress gateway forwards between.

Linux decides whether to forward an IPv4 packet by the interface it came in
on (`net.ipv4.conf.<if>.forwarding`): a gateway needs it on the overlay
interface (members' packets towards a range) and on each interface a range is
reached through (the replies coming back). The agent switches on only those,
never `net.ipv4.ip_forward` (every interface), records what each was before it
changed it (in the state directory, so a restarted agent still knows), and
puts each back when no range needs it any more or on `agent down`.

An interface switched on for the gateway would otherwise forward anything
arriving on it: the firewall's forward chain drops what it forwards that is
not to or from the overlay (agent/firewall.py, "guarded" interfaces), so the
host routes nothing it did not route before but the gateway's traffic.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.backend import BackendError
from agent.statedir import atomic_write

_CONF = Path("/proc/sys/net/ipv4/conf")
ORIGINALS_FILE = "forwarding.json"


class ForwardingError(BackendError):
    """A setting that cannot be read or written."""


@dataclass(frozen=True)
class ForwardingState:
    """What the forwarding planner needs: per range, the interface it is
    reached through (absent: no route); per interface, whether it forwards;
    and what the agent found on each interface before it switched it on."""

    route_interfaces: dict[str, str] = field(default_factory=dict)
    forwarding: dict[str, bool] = field(default_factory=dict)
    originals: dict[str, bool] = field(default_factory=dict)


class ForwardingControl(Protocol):
    async def read(self, ranges: tuple[str, ...], interface: str) -> ForwardingState: ...
    async def enable(self, interface: str) -> None: ...
    async def restore(self, interface: str) -> None: ...
    async def restore_all(self) -> None: ...


class SysctlForwarding:
    """The real one: /proc/sys of the calling process's network namespace,
    routes looked up with rtnetlink, originals in `state_dir`."""

    def __init__(self, state_dir: Path, conf: Path = _CONF) -> None:
        self.path = state_dir / ORIGINALS_FILE
        self.conf = conf

    async def read(self, ranges: tuple[str, ...], interface: str) -> ForwardingState:
        routes = await _route_interfaces(ranges) if ranges else {}
        originals = self._originals()
        names = {interface, *routes.values(), *originals}
        values = {}
        for name in sorted(names):
            value = self._get(name)
            if value is not None:
                values[name] = value
        return ForwardingState(route_interfaces=routes, forwarding=values, originals=originals)

    async def enable(self, interface: str) -> None:
        originals = self._originals()
        current = self._get(interface)
        if current is None:
            raise ForwardingError(f"no interface {interface} to forward on")
        if interface not in originals:
            # Recorded before the change: a crash between the two leaves a
            # record of a value not changed yet, which restores to itself.
            originals[interface] = current
            self._save(originals)
        self._set(interface, True)

    async def restore(self, interface: str) -> None:
        originals = self._originals()
        if interface not in originals:
            return
        if self._get(interface) is not None:  # an interface gone took its setting along
            self._set(interface, originals[interface])
        del originals[interface]
        self._save(originals)

    async def restore_all(self) -> None:
        for interface in sorted(self._originals()):
            await self.restore(interface)

    def _originals(self) -> dict[str, bool]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ForwardingError(f"cannot read {self.path}: {exc}") from None
        return {str(k): bool(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    def _save(self, originals: dict[str, bool]) -> None:
        if not originals:
            self.path.unlink(missing_ok=True)
            return
        atomic_write(self.path, json.dumps(originals, sort_keys=True).encode())

    def _get(self, interface: str) -> bool | None:
        try:
            return (self.conf / interface / "forwarding").read_text().strip() == "1"
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ForwardingError(f"cannot read forwarding of {interface}: {exc}") from None

    def _set(self, interface: str, on: bool) -> None:
        try:
            (self.conf / interface / "forwarding").write_text("1" if on else "0")
        except OSError as exc:
            raise ForwardingError(f"cannot set forwarding of {interface}: {exc}") from None


async def _route_interfaces(ranges: tuple[str, ...]) -> dict[str, str]:
    """The interface the main routing table sends each range's first address
    out of (ranges without a route are left out)."""
    found: dict[str, str] = {}
    ipr: Any = AsyncIPRoute()
    try:
        names: dict[int, str] = {}
        for cidr in ranges:
            network = ipaddress.ip_network(cidr)
            try:
                if network.prefixlen == 0:
                    # The internet: whatever the main table's default route says
                    # (asking for 0.0.0.0 itself would name the loopback).
                    answer = [
                        m
                        async for m in await ipr.route("dump", table=254, family=socket.AF_INET)
                        if m["dst_len"] == 0
                    ]
                else:
                    answer = await ipr.route("get", dst=str(network.network_address))
            except NetlinkError:
                continue  # unreachable: nothing to forward to
            async for message in _messages(answer):
                index = message.get("oif")
                if index is None:
                    continue
                if index not in names:
                    links = [link async for link in _messages(await ipr.link("get", index=index))]
                    names[index] = links[0].get("ifname") if links else ""
                if names[index]:
                    found[cidr] = names[index]
                break
    finally:
        ipr.close()
    return found


async def _messages(answer: Any) -> Any:
    """pyroute2's async answers are async iterators or lists, by version."""
    if hasattr(answer, "__aiter__"):
        async for message in answer:
            yield message
    else:
        for message in answer:
            yield message
        await asyncio.sleep(0)
