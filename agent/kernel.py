"""WireGuardBackend for the Linux kernel module, through generic netlink (pyroute2).

The link itself is made and deleted through rtnetlink (`kind wireguard`); keys,
port and peers go through the `wireguard` generic-netlink family. The messages are
built and read by pure functions (`build_set_messages`, `parse_get`) so that their
encoding is tested on machines without the module.

We build the WG_CMD_SET_DEVICE messages ourselves from pyroute2's `wgmsg` NLA
classes instead of calling `AsyncWireGuard.set()`: that helper can replace a
peer's allowed IPs, but it sends one peer per message (N round trips per change),
reads its answer without matching the sequence number, and has no way to split a
change that does not fit one message. The kernel module parses its nested
attributes strictly (NLA_F_NESTED, exact lengths); pyroute2's `wgmsg` encodes them
as the kernel wants, which the tests check byte by byte.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import ipaddress
import os
import socket
from collections.abc import Iterable
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP_INTR, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_SET_DEVICE,
    WG_GENL_NAME,
    WG_GENL_VERSION,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    AsyncWireGuard,
    wgmsg,
)

from agent.backend import BackendError, DeviceState, ExistsByReading, PeerSpec, PeerState
from agent.link import Link
from agent.uapi import check_fwmark

__all__ = [
    "MAX_MESSAGE_BYTES",
    "KernelBackend",
    "build_set_messages",
    "kernel_wireguard_available",
    "parse_get",
]

# One set message stays within a page, as wg(8) does: small enough for any socket
# buffer, and an error answer (which echoes the request) stays small too.
MAX_MESSAGE_BYTES = 8192

_KEY_BYTES = 32

# Errors a later attempt cannot fix. EOPNOTSUPP: the interface is not WireGuard
# (or the kernel lacks the link kind); ENOENT here means no `wireguard` family.
_PERMANENT = frozenset(
    {errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP, errno.ENOENT, errno.ERANGE, errno.EAFNOSUPPORT}
)


# --- sizes on the wire -------------------------------------------------------
# Exact encoded sizes, so that messages can be split before they are encoded.


def _nla(payload: int) -> int:
    """An attribute's size: 4-byte header, payload padded to 4."""
    return 4 + (payload + 3) // 4 * 4


_NEST = 4  # a nested attribute's own header
_HEADERS = 16 + 4  # nlmsghdr + genlmsghdr
_REMOVE_SIZE = _NEST + _nla(_KEY_BYTES) + _nla(4)  # public key, flags


def _allowed_ip_size(version: int) -> int:
    return _NEST + _nla(2) + _nla(4 if version == 4 else 16) + _nla(1)


# --- validation --------------------------------------------------------------


def _key(key: str) -> str:
    """A base64 key, checked; pyroute2's key NLA decodes it to the 32 raw bytes."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BackendError(f"invalid key {key!r}: not base64", retryable=False) from exc
    if len(raw) != _KEY_BYTES:
        raise BackendError(f"invalid key {key!r}: not 32 bytes", retryable=False)
    return key


def _check_port(name: str, value: int) -> int:
    if not 0 <= value <= 65535:
        raise BackendError(f"{name} out of range: {value}", retryable=False)
    return value


def _endpoint(endpoint: str) -> tuple[dict[str, Any], int]:
    """{"addr", "port"} for pyroute2's sockaddr NLA, and its IP version."""
    host, sep, port = endpoint.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError as exc:
        raise BackendError(f"invalid endpoint {endpoint!r}", retryable=False) from exc
    # Digits only: int() would also take " 5", "+5" or "5\n".
    port_number = int(port) if port.isascii() and port.isdigit() else 0
    # Same forms as the UAPI backend: "ip:port" and "[v6]:port", no names, no zones
    # (the sockaddr we send has no scope id).
    if (
        not sep
        or bracketed != (address.version == 6)
        or not 1 <= port_number <= 65535
        or (isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None)
    ):
        raise BackendError(f"invalid endpoint {endpoint!r}", retryable=False)
    return {"addr": str(address), "port": port_number}, address.version


def _allowed_ip(cidr: str) -> tuple[list[Any], int]:
    """The attributes of one allowed IP, and their encoded size."""
    try:
        # Not strict, like `wg set`: host bits are dropped (the kernel would too).
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise BackendError(f"invalid allowed IP {cidr!r}", retryable=False) from exc
    family = socket.AF_INET if network.version == 4 else socket.AF_INET6
    attrs = [
        ["WGALLOWEDIP_A_FAMILY", family],
        ["WGALLOWEDIP_A_IPADDR", network.network_address.packed],
        ["WGALLOWEDIP_A_CIDR_MASK", network.prefixlen],
    ]
    return attrs, _allowed_ip_size(network.version)


# --- set ---------------------------------------------------------------------


def build_set_messages(
    interface: str,
    *,
    private_key: str | None = None,
    listen_port: int | None = None,
    fwmark: int | None = None,
    upsert_peers: tuple[PeerSpec, ...] = (),
    remove_peers: tuple[str, ...] = (),
) -> list[Any]:
    """The WG_CMD_SET_DEVICE messages (pyroute2 `wgmsg`, not yet encoded) for one change.

    Same meaning as `uapi.encode_set`: peers not named are left alone (no
    WGDEVICE_F_REPLACE_PEERS); an upserted peer keeps its session, its allowed IPs
    are replaced (WGPEER_F_REPLACE_ALLOWEDIPS), `endpoint=None` leaves its endpoint
    as it is, its keepalive is always set; removals use WGPEER_F_REMOVE_ME (the
    kernel ignores unknown peers). Device settings go first, then removals, then
    upserts. The empty list when there is nothing to change.

    Each message encodes to at most MAX_MESSAGE_BYTES. A peer whose allowed IPs do
    not fit continues in the next message without the replace flag (which would
    drop what the previous message added), as wg(8) does. Several messages are
    not one transaction: if one fails, the earlier ones stay applied.

    Raises BackendError(retryable=False) for malformed input, before anything is sent.
    """
    both = {peer.public_key for peer in upsert_peers}.intersection(remove_peers)
    if both:
        raise BackendError(f"peers both upserted and removed: {sorted(both)}", retryable=False)
    ifname_size = len(interface.encode())
    if not 1 <= ifname_size <= 15:
        raise BackendError(f"invalid interface name {interface!r}", retryable=False)

    device: list[Any] = []
    base = _HEADERS + _nla(ifname_size + 1) + _NEST
    used = base
    if private_key is not None:
        device.append(["WGDEVICE_A_PRIVATE_KEY", _key(private_key)])
        used += _nla(_KEY_BYTES)
    if listen_port is not None:
        device.append(["WGDEVICE_A_LISTEN_PORT", _check_port("listen_port", listen_port)])
        used += _nla(2)
    if fwmark is not None:
        device.append(["WGDEVICE_A_FWMARK", check_fwmark(fwmark)])
        used += _nla(4)

    batches: list[list[Any]] = [[]]  # the peer entries of each message

    def reserve(size: int) -> None:
        nonlocal used
        if used + size > MAX_MESSAGE_BYTES and batches[-1]:
            batches.append([])
            used = base
        used += size

    for public_key in remove_peers:
        reserve(_REMOVE_SIZE)
        attrs = [["WGPEER_A_PUBLIC_KEY", _key(public_key)], ["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME]]
        batches[-1].append({"attrs": attrs})

    for peer in upsert_peers:
        head: list[Any] = [
            ["WGPEER_A_PUBLIC_KEY", _key(peer.public_key)],
            ["WGPEER_A_FLAGS", WGPEER_F_REPLACE_ALLOWEDIPS],
        ]
        head_size = _NEST + _nla(_KEY_BYTES) + _nla(4)
        if peer.endpoint is not None:
            sockaddr, version = _endpoint(peer.endpoint)
            head.append(["WGPEER_A_ENDPOINT", sockaddr])
            head_size += _nla(16 if version == 4 else 28)  # sockaddr_in / sockaddr_in6
        keepalive = _check_port("persistent_keepalive", peer.persistent_keepalive)
        head.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", keepalive])
        head_size += _nla(2)
        ips = [_allowed_ip(cidr) for cidr in peer.allowed_ips]
        done = 0
        while True:
            # The head and at least one allowed IP go together.
            reserve(head_size + (_NEST + ips[done][1] if done < len(ips) else 0))
            entry = list(head)
            if done < len(ips):
                chunk = [{"attrs": ips[done][0]}]
                done += 1
                while done < len(ips) and used + ips[done][1] <= MAX_MESSAGE_BYTES:
                    chunk.append({"attrs": ips[done][0]})
                    used += ips[done][1]
                    done += 1
                entry.append(["WGPEER_A_ALLOWEDIPS", chunk])
            batches[-1].append({"attrs": entry})
            if done == len(ips):
                break
            head = [["WGPEER_A_PUBLIC_KEY", peer.public_key], ["WGPEER_A_FLAGS", 0]]
            head_size = _NEST + _nla(_KEY_BYTES) + _nla(4)
            batches.append([])
            used = base

    if not device and not batches[0]:
        return []
    messages = []
    for index, peers in enumerate(batches):
        msg = wgmsg()
        msg["cmd"] = WG_CMD_SET_DEVICE
        msg["version"] = WG_GENL_VERSION
        msg["attrs"].append(["WGDEVICE_A_IFNAME", interface])
        if index == 0:
            msg["attrs"].extend(device)
        if peers:
            msg["attrs"].append(["WGDEVICE_A_PEERS", peers])
        messages.append(msg)
    return messages


# --- get ---------------------------------------------------------------------


def _text_key(value: Any) -> str:
    # pyroute2 hands keys back as base64 bytes.
    text = value.decode("ascii") if isinstance(value, bytes) else str(value)
    return base64.b64encode(base64.b64decode(text, validate=True)).decode("ascii")


def _format_endpoint(value: Any) -> str:
    address = ipaddress.ip_address(value["addr"])
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"{host}:{int(value['port'])}"


def _format_allowed_ip(value: Any) -> str:
    # pyroute2 decodes the address as "0a:00:00:02".
    raw = bytes.fromhex(str(value.get_attr("WGALLOWEDIP_A_IPADDR")).replace(":", ""))
    family = value.get_attr("WGALLOWEDIP_A_FAMILY")
    expected = {socket.AF_INET: 4, socket.AF_INET6: 16}.get(family)
    if expected is None or len(raw) != expected:
        raise ValueError(f"allowed IP of family {family} with {len(raw)} address bytes")
    return f"{ipaddress.ip_address(raw)}/{int(value.get_attr('WGALLOWEDIP_A_CIDR_MASK'))}"


def parse_get(messages: Iterable[Any]) -> DeviceState:
    """The DeviceState in a WG_CMD_GET_DEVICE dump (decoded pyroute2 `wgmsg`s).

    The kernel puts device attributes in the first message only and may split a
    peer across messages: the continuation repeats the public key and carries only
    more allowed IPs, so peers are merged by key. Peers are sorted by public key and
    allowed IPs as strings, as the UAPI backend does. Raises BackendError when the
    answer is malformed, and a retryable one when the kernel flags the dump as
    interrupted (the device changed between its messages).
    """
    public_key: str | None = None
    listen_port = 0
    fwmark = 0
    peers: dict[str, dict[str, Any]] = {}
    try:
        for msg in messages:
            if msg["header"]["flags"] & NLM_F_DUMP_INTR:
                raise BackendError("WireGuard device changed while it was read")
            if (value := msg.get_attr("WGDEVICE_A_PUBLIC_KEY")) is not None:
                public_key = _text_key(value)
            if (value := msg.get_attr("WGDEVICE_A_LISTEN_PORT")) is not None:
                listen_port = int(value)
            if (value := msg.get_attr("WGDEVICE_A_FWMARK")) is not None:
                fwmark = int(value)
            for item in msg.get_attr("WGDEVICE_A_PEERS") or ():
                key = item.get_attr("WGPEER_A_PUBLIC_KEY")
                if key is None:
                    raise ValueError("peer without public key")
                peer = peers.setdefault(_text_key(key), {"allowed_ips": []})
                if (value := item.get_attr("WGPEER_A_ENDPOINT")) is not None:
                    peer["endpoint"] = _format_endpoint(value)
                value = item.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
                if value is not None:
                    peer["persistent_keepalive"] = int(value)
                if (value := item.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")) is not None:
                    peer["last_handshake"] = int(value["tv_sec"]) + int(value["tv_nsec"]) / 1e9
                if (value := item.get_attr("WGPEER_A_RX_BYTES")) is not None:
                    peer["rx_bytes"] = int(value)
                if (value := item.get_attr("WGPEER_A_TX_BYTES")) is not None:
                    peer["tx_bytes"] = int(value)
                for allowed in item.get_attr("WGPEER_A_ALLOWEDIPS") or ():
                    peer["allowed_ips"].append(_format_allowed_ip(allowed))
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise BackendError(f"malformed WireGuard netlink answer: {exc}") from exc
    states = [
        PeerState(public_key=key, **{**fields, "allowed_ips": tuple(sorted(fields["allowed_ips"]))})
        for key, fields in sorted(peers.items())
    ]
    return DeviceState(
        public_key=public_key, listen_port=listen_port, fwmark=fwmark, peers=tuple(states)
    )


# --- I/O ---------------------------------------------------------------------


def _netlink_error(action: str, exc: NetlinkError) -> BackendError:
    code = int(exc.code)
    # Linux's names (errno.errorcode says ENOTSUP for EOPNOTSUPP, the same number).
    name = "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode.get(code, str(code))
    # The kernel's own words (its extended ack), else the errno's text.
    text = exc.args[1] if len(exc.args) > 1 and exc.args[1] else os.strerror(code)
    return BackendError(f"{action}: {name} ({text})", retryable=code not in _PERMANENT)


async def _open_wireguard_socket() -> Any:
    """An AsyncWireGuard socket bound to the `wireguard` family; NetlinkError if absent."""
    wg = AsyncWireGuard()
    # pyroute2 logs a missing family at ERROR on the root logger; we report it ourselves.
    wg.module_err_level = "debug"
    try:
        await wg.setup_endpoint()  # binds and looks up the family id
    except BaseException:
        wg.close()
        raise
    return wg


async def kernel_wireguard_available() -> bool:
    """Whether the kernel's `wireguard` generic-netlink family is there.

    Async because pyroute2's sync sockets fail inside a running event loop. The
    lookup may autoload the module (the kernel requests `net-pf-16-proto-16-
    family-wireguard`), which a check of /sys/module would miss. The family is
    global, so the answer is the same in every network namespace. Never raises:
    any failure (no netlink, no module) means "not available".
    """
    try:
        wg = await _open_wireguard_socket()
    except Exception:  # whatever the reason, `auto` must fall back to userspace
        return False
    wg.close()
    return True


class KernelBackend(ExistsByReading):
    """One kernel WireGuard interface, in the caller's network namespace.

    The generic-netlink socket opens on first use and `close()` closes it; the
    interface stays up (a stopped agent keeps the network).
    """

    def __init__(self, interface: str, *, timeout: float = 10.0) -> None:
        self.interface = interface
        self._timeout = timeout
        self._wg: Any = None
        # One request at a time on the shared socket keeps errors attributable;
        # it also keeps two callers from opening two sockets.
        self._lock = asyncio.Lock()

    async def create(self) -> None:
        ipr = AsyncIPRoute()
        try:
            async with asyncio.timeout(self._timeout):
                await ipr.link("add", ifname=self.interface, kind="wireguard")
            return
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _netlink_error(f"create {self.interface}", exc) from exc
        except TimeoutError as exc:
            raise BackendError(f"create {self.interface}: rtnetlink timed out") from exc
        finally:
            ipr.close()
        # Idempotent, but only if what exists is a WireGuard interface we can read.
        try:
            await self.read()
        except BackendError as exc:
            raise BackendError(
                f"{self.interface} exists but is not usable as WireGuard: {exc}",
                retryable=exc.retryable,
            ) from exc

    async def destroy(self) -> None:
        link = Link(self.interface)
        try:
            await link.delete()  # idempotent; LinkError is a BackendError
        finally:
            await link.close()

    async def read(self) -> DeviceState:
        async with self._lock:
            messages = await self._request(f"read {self.interface}", self._dump)
        return parse_get(messages)

    async def configure(
        self,
        *,
        private_key: str | None = None,
        listen_port: int | None = None,
        fwmark: int | None = None,
        upsert_peers: tuple[PeerSpec, ...] = (),
        remove_peers: tuple[str, ...] = (),
    ) -> None:
        messages = build_set_messages(
            self.interface,
            private_key=private_key,
            listen_port=listen_port,
            fwmark=fwmark,
            upsert_peers=upsert_peers,
            remove_peers=remove_peers,
        )
        async with self._lock:
            for msg in messages:
                await self._request(f"configure {self.interface}", self._set, msg)

    async def close(self) -> None:
        # Only the socket: the interface and its configuration stay.
        if self._wg is not None:
            self._wg.close()
            self._wg = None

    async def _dump(self, wg: Any) -> list[Any]:
        return [msg async for msg in await wg.info(self.interface)]

    async def _set(self, wg: Any, msg: Any) -> list[Any]:
        # The answer is the ack; a failure raises NetlinkError while it is read.
        flags = NLM_F_REQUEST | NLM_F_ACK
        return [answer async for answer in await wg.nlm_request(msg, wg.prid, flags)]

    async def _request(self, action: str, call: Any, *args: Any) -> list[Any]:
        try:
            async with asyncio.timeout(self._timeout):
                if self._wg is None:
                    self._wg = await _open_wireguard_socket()
                result: list[Any] = await call(self._wg, *args)
                return result
        except NetlinkError as exc:
            if self._wg is None and exc.code == errno.ENOENT:
                raise BackendError(
                    f"{action}: no {WG_GENL_NAME} kernel module", retryable=False
                ) from exc
            if exc.code == errno.ENODEV:
                raise BackendError(f"{action}: no such interface") from exc
            raise _netlink_error(action, exc) from exc
        except TimeoutError as exc:
            # The answer may still arrive on this socket: start afresh next time.
            await self.close()
            raise BackendError(f"{action}: netlink request timed out") from exc
        except OSError as exc:
            await self.close()
            raise BackendError(f"{action}: netlink socket error: {exc}") from exc
