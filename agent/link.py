"""Link, addresses, MTU and routes of one interface, through rtnetlink (pyroute2).

Works in the network namespace of the calling process. Operations are idempotent
so that a reconcile loop can repeat them: adding what exists and removing what is
absent both succeed.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from typing import Any, Protocol

import msgspec
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.backend import BackendError

_MAIN_TABLE = 254
# Routes the agent adds carry this protocol number (unassigned in
# /etc/iproute2/rt_protos): it lists and removes only those, never a route
# someone else put on its interface.
RTPROT_NETMESH = 77
_RTN_UNICAST = 1
_RT_SCOPE_UNIVERSE = 0
_IFF_UP = 0x1

# Failures that a later attempt cannot fix (a bad argument, not a transient state).
_PERMANENT = frozenset({errno.EINVAL, errno.ERANGE, errno.EAFNOSUPPORT, errno.EPERM})


class LinkError(BackendError):
    """An rtnetlink operation failed; `code` is the errno (0 if none)."""

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message, retryable=code not in _PERMANENT)
        self.code = code


class LinkState(msgspec.Struct, frozen=True, kw_only=True):
    """What the kernel says about the interface.

    addresses: global-scope addresses as "ip/prefix" (host address kept, e.g.
        "10.0.0.1/24"), sorted as strings. Kernel-made IPv6 link-local (fe80::/10) and
        host-scope addresses are left out: nobody configured them.
    routes: destinations ("network/prefix", sorted as strings) of unicast routes in
        the main table whose output interface is this one and that the agent added
        (protocol RTPROT_NETMESH): not the kernel's own for the interface's
        addresses, not anyone else's.
    """

    index: int
    mtu: int
    up: bool  # administratively up (IFF_UP), regardless of carrier
    addresses: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()


def _netlink_error(action: str, exc: NetlinkError) -> LinkError:
    code = int(exc.code)
    return LinkError(f"{action}: {errno.errorcode.get(code, code)} ({exc})", code=code)


def _interface(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError as exc:
        raise LinkError(f"invalid address {cidr!r}", code=errno.EINVAL) from exc


def _network(cidr: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise LinkError(f"invalid route destination {cidr!r}", code=errno.EINVAL) from exc


class Link:
    """One interface by name. The netlink socket opens on first use; `close()` it."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._ipr: Any = None
        # pyroute2 matches answers to requests, but one request at a time keeps
        # error attribution simple and costs nothing at the agent's pace.
        self._lock = asyncio.Lock()

    async def exists(self) -> bool:
        async with self._lock:
            return await self._lookup() is not None

    async def state(self) -> LinkState:
        async with self._lock:
            index = await self._index()
            ipr = self._socket()
            try:
                links = await ipr.link("get", index=index)
                addresses = [
                    msg
                    async for msg in await ipr.addr("dump", index=index)
                    if msg["scope"] == _RT_SCOPE_UNIVERSE
                ]
                routes = [
                    msg
                    async for msg in await ipr.route("dump", table=_MAIN_TABLE)
                    if msg.get("oif") == index
                    and msg["type"] == _RTN_UNICAST
                    and msg["proto"] == RTPROT_NETMESH
                    and msg.get("table") == _MAIN_TABLE
                ]
            except NetlinkError as exc:
                raise _netlink_error(f"read {self.interface}", exc) from exc
        link = links[0]
        return LinkState(
            index=index,
            mtu=int(link.get("mtu")),
            up=bool(link["flags"] & _IFF_UP),
            addresses=tuple(
                sorted(
                    str(ipaddress.ip_interface(f"{msg.get('address')}/{msg['prefixlen']}"))
                    for msg in addresses
                    if msg.get("address") is not None
                )
            ),
            routes=tuple(sorted(_route_destination(msg) for msg in routes)),
        )

    async def kind(self) -> str | None:
        """The link's kind (`tun`, `wireguard`, `veth`...); None when it has none
        or does not exist."""
        async with self._lock:
            index = await self._lookup()
            if index is None:
                return None
            try:
                (link,) = await self._socket().link("get", index=index)
            except NetlinkError as exc:
                raise _netlink_error(f"read {self.interface}", exc) from exc
        info = link.get("IFLA_LINKINFO")
        kind = info.get("IFLA_INFO_KIND") if info is not None else None
        return str(kind) if kind else None

    async def set_mtu(self, mtu: int) -> None:
        await self._change(f"set mtu {mtu} on", "link", "set", mtu=mtu)

    async def set_up(self) -> None:
        await self._change("set up", "link", "set", state="up")

    async def add_address(self, cidr: str) -> None:
        address = _interface(cidr)
        tolerated = await self._change(
            f"add address {cidr} to",
            "addr",
            "add",
            ok=(errno.EEXIST,),
            address=str(address.ip),
            prefixlen=address.network.prefixlen,
        )
        # IPv6 keys addresses without the prefix: EEXIST may mean "same address,
        # other prefix", which is not what was asked for.
        if tolerated and str(address) not in (await self.state()).addresses:
            raise LinkError(
                f"add address {cidr} to {self.interface}: exists with another prefix",
                code=errno.EEXIST,
            )

    async def remove_address(self, cidr: str) -> None:
        address = _interface(cidr)
        await self._change(
            f"remove address {cidr} from",
            "addr",
            "del",
            ok=(errno.EADDRNOTAVAIL, errno.ESRCH, errno.ENOENT),
            address=str(address.ip),
            prefixlen=address.network.prefixlen,
        )

    async def add_route(self, cidr: str) -> None:
        destination = str(_network(cidr))
        tolerated = await self._change(
            f"add route {cidr} via",
            "route",
            "add",
            ok=(errno.EEXIST,),
            dst=destination,
            table=_MAIN_TABLE,
            proto=RTPROT_NETMESH,
        )
        # EEXIST may come from a route to the same destination via another
        # interface: that one is not ours to take over silently.
        if tolerated and destination not in (await self.state()).routes:
            raise LinkError(
                f"add route {cidr} via {self.interface}: exists via another interface",
                code=errno.EEXIST,
            )

    async def remove_route(self, cidr: str) -> None:
        await self._change(
            f"remove route {cidr} via",
            "route",
            "del",
            ok=(errno.ESRCH, errno.ENOENT),
            dst=str(_network(cidr)),
            table=_MAIN_TABLE,
            proto=RTPROT_NETMESH,
        )

    async def delete(self) -> None:
        """Delete the interface (idempotent)."""
        async with self._lock:
            index = await self._lookup()
            if index is None:
                return
            try:
                await self._socket().link("del", index=index)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise _netlink_error(f"delete {self.interface}", exc) from exc

    async def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _socket(self) -> Any:
        if self._ipr is None:
            # No netns argument: the socket belongs to the caller's namespace, and
            # pyroute2 creates no helper process.
            self._ipr = AsyncIPRoute()
        return self._ipr

    async def _lookup(self) -> int | None:
        # Looked up on every call: the interface may have been recreated with a
        # new index since the last one.
        indexes = await self._socket().link_lookup(ifname=self.interface)
        return int(indexes[0]) if indexes else None

    async def _index(self) -> int:
        index = await self._lookup()
        if index is None:
            raise LinkError(f"no interface {self.interface}", code=errno.ENODEV)
        return index

    async def _change(
        self, action: str, kind: str, command: str, *, ok: tuple[int, ...] = (), **args: Any
    ) -> int:
        """Run one request on this interface; the tolerated errno it met, or 0."""
        async with self._lock:
            index = await self._index()
            if kind == "route":
                args["oif"] = index
            else:
                args["index"] = index
            try:
                await getattr(self._socket(), kind)(command, **args)
            except NetlinkError as exc:
                if exc.code not in ok:
                    raise _netlink_error(f"{action} {self.interface}", exc) from exc
                return int(exc.code)
            return 0


def _route_destination(msg: Any) -> str:
    family = msg["family"]
    dst = msg.get("dst")
    if dst is None:
        dst = "0.0.0.0" if family == socket.AF_INET else "::"
    return str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))


class LinkControl(Protocol):
    """What the agent needs of a link: `Link` on a machine, `FakeLink` in tests."""

    interface: str

    async def exists(self) -> bool: ...
    async def state(self) -> LinkState: ...
    async def set_mtu(self, mtu: int) -> None: ...
    async def set_up(self) -> None: ...
    async def add_address(self, cidr: str) -> None: ...
    async def remove_address(self, cidr: str) -> None: ...
    async def add_route(self, cidr: str) -> None: ...
    async def remove_route(self, cidr: str) -> None: ...
    async def delete(self) -> None: ...
    async def close(self) -> None: ...
