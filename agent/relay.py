"""The relay reconciler: forward two hosts' WireGuard datagrams as they are,
from the `relays` section (protocol 7) of a relay host's desired state.

A relay holds no key and decrypts nothing: end-to-end encryption is kept.
For a pair `RelayEntry(hosts=(a, b), ports=(pa, pb))`, host a's WireGuard
sends to RELAY:pa and host b's to RELAY:pb. A datagram arriving on pa tells
where a is (its NAT's mapping: the relay learns it from the source address)
and goes out of the socket bound to pb, to where b's last datagram came from;
so b sees it come from RELAY:pb, the endpoint it has for a, and WireGuard's
roaming keeps both ends consistent. Until a side's address is known, the
datagrams for it are dropped (counted).

Only datagrams shaped like WireGuard messages (`is_wireguard`) are forwarded
or move a learned address: stray junk on a relay port changes nothing. A
forged datagram of the right shape from another source does move it (the
relay cannot check WireGuard's MACs without the keys): that can only cut the
pair's path until the real side speaks again, never read it.

`plan_relays` is pure (wanted entries vs pairs open now -> typed ops that
print themselves); `Forwarder` is the machine's side: a UDP socket per port,
bound on every IPv4 address (0.0.0.0), in the agent's event loop, read by an
asyncio `DatagramProtocol` (loop="protocol") or drained in batches into one
buffer (loop="drain", the default: see bench/relay.py for what each costs).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from agent.backend import BackendError
from events.desired import DesiredState, RelayEntry

# WireGuard's message types (the first byte; the next three are reserved, zero)
# and their sizes: a handshake initiation, a response, a cookie reply, and
# transport data (16 bytes of header and a 16-byte tag around the payload: a
# keepalive is 32 bytes). The payload is padded to a multiple of 16 but never
# beyond the device's MTU, which the relay does not know: a full-size packet
# at the usual MTU of 1420 is a 1452-byte datagram, not a multiple of 16.
INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT = 1, 2, 3, 4
_FIXED_SIZES = {INITIATION: 148, RESPONSE: 92, COOKIE_REPLY: 64}
_TRANSPORT_MIN = 32
# The largest UDP payload over IPv4; WireGuard's own are far below (MTU).
MAX_DATAGRAM = 65507


def is_wireguard(data: bytes | memoryview) -> bool:
    """Whether `data` has the shape of a WireGuard message: a known type,
    three zero reserved bytes, and that type's size. Says nothing of its
    authenticity (only the peers' keys can)."""
    size = len(data)
    if size < 4 or data[1] or data[2] or data[3]:
        return False
    kind = data[0]
    if kind == TRANSPORT:
        return size >= _TRANSPORT_MIN
    return _FIXED_SIZES.get(kind) == size


# -- the pure part ------------------------------------------------------------


@dataclass(frozen=True)
class RelayState:
    """The pairs forwarded now (key -> the entry they were opened for)."""

    open: Mapping[str, RelayEntry] = field(default_factory=dict)


def _label(entry: RelayEntry) -> str:
    names = [n or h for n, h in zip(entry.names, entry.hosts, strict=True)]
    return f"{names[0]} (port {entry.ports[0]}) <-> {names[1]} (port {entry.ports[1]})"


@dataclass(frozen=True)
class OpenRelay:
    key: str
    entry: RelayEntry

    def __str__(self) -> str:
        return f"relay {_label(self.entry)}"


@dataclass(frozen=True)
class CloseRelay:
    key: str
    entry: RelayEntry  # as it was opened (for the message)

    def __str__(self) -> str:
        return f"stop relaying {_label(self.entry)}"


RelayOp = OpenRelay | CloseRelay


def plan_relays(wanted: Mapping[str, RelayEntry], actual: RelayState | None) -> list[RelayOp]:
    """Close first, then open, each in key order: a pair whose entry changed
    (its ports, its hosts) is closed and opened again, and a port given from
    one pair to another is free again before it is bound. A pair open as
    wanted is left alone (its learned addresses and counters kept). `actual`
    None: the agent has no relay control (only a state without relays needs
    none). An empty plan touches nothing."""
    have = actual.open if actual is not None else {}
    ops: list[RelayOp] = [
        CloseRelay(key, entry) for key, entry in sorted(have.items()) if wanted.get(key) != entry
    ]
    ops += [
        OpenRelay(key, entry) for key, entry in sorted(wanted.items()) if have.get(key) != entry
    ]
    return ops


def plan_relay_section(desired: DesiredState, actual: RelayState | None) -> list[RelayOp]:
    return plan_relays(desired.sections.relays, actual)


# -- what is counted and shown ------------------------------------------------


class SideStatus(msgspec.Struct, kw_only=True):
    """One side of a pair: what arrived from it on its port."""

    host: str
    name: str
    port: int
    address: str | None  # "ip:port" its last datagram came from (None: not heard yet)
    forwarded: int  # datagrams from it sent on to the other side
    forwarded_bytes: int
    dropped_unknown: int  # from it, while the other side's address was unknown
    dropped_junk: int  # arrived on its port, not shaped like WireGuard
    send_errors: int  # sends to it that the kernel refused


class PairStatus(msgspec.Struct, kw_only=True):
    key: str
    sides: tuple[SideStatus, SideStatus]
    error: str | None = None  # why it is not forwarded (a port it cannot bind)


# -- the machine's side -------------------------------------------------------


class RelayError(BackendError):
    pass


class RelayControl(Protocol):
    async def read(self) -> RelayState: ...

    async def open(self, key: str, entry: RelayEntry) -> None:
        """Raises RelayError (a port that cannot be bound: nothing of the pair stays open)."""
        ...

    async def close_pair(self, key: str) -> None: ...

    def status(self) -> list[PairStatus]: ...

    async def close(self) -> None:
        """The agent stops: every port closed."""
        ...


@dataclass
class _Counters:
    forwarded: int = 0
    forwarded_bytes: int = 0
    dropped_unknown: int = 0
    dropped_junk: int = 0
    send_errors: int = 0


Address = tuple[str | bytes, int]


class _Endpoint(Protocol):
    """One side's bound socket: sends to that side, closes."""

    def send(self, data: bytes | memoryview, to: Address) -> None: ...

    async def close(self) -> None:
        """Returns once the socket is closed (its port free)."""
        ...


class _Pair:
    def __init__(self, key: str, entry: RelayEntry) -> None:
        self.key = key
        self.entry = entry
        self.endpoints: list[_Endpoint] = []
        self.addresses: list[Address | None] = [None, None]
        self.counters = (_Counters(), _Counters())

    def received(self, side: int, data: bytes | memoryview, addr: Address) -> None:
        counters = self.counters[side]
        if not is_wireguard(data):
            counters.dropped_junk += 1
            return
        self.addresses[side] = addr
        other = 1 - side
        destination = self.addresses[other]
        if destination is None or len(self.endpoints) < 2:
            counters.dropped_unknown += 1
            return
        self.endpoints[other].send(data, destination)
        counters.forwarded += 1
        counters.forwarded_bytes += len(data)

    async def close(self) -> None:
        endpoints, self.endpoints = self.endpoints, []
        for endpoint in endpoints:
            await endpoint.close()

    def status(self, error: str | None = None) -> PairStatus:
        sides = []
        for i in (0, 1):
            c = self.counters[i]
            address = self.addresses[i]
            sides.append(
                SideStatus(
                    host=self.entry.hosts[i],
                    name=self.entry.names[i],
                    port=self.entry.ports[i],
                    address=f"{address[0]!s}:{address[1]}" if address else None,
                    forwarded=c.forwarded,
                    forwarded_bytes=c.forwarded_bytes,
                    dropped_unknown=c.dropped_unknown,
                    dropped_junk=c.dropped_junk,
                    send_errors=c.send_errors,
                )
            )
        return PairStatus(key=self.key, sides=(sides[0], sides[1]), error=error)


class _Port(asyncio.DatagramProtocol):
    """loop="protocol": asyncio's datagram transport, one datagram per wakeup."""

    def __init__(self, pair: _Pair, side: int) -> None:
        self.pair = pair
        self.side = side
        self.transport: asyncio.DatagramTransport | None = None
        # The socket is closed on the loop's next turn after close(): a port
        # is free again only once this is done.
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.pair.received(self.side, data, addr)

    def error_received(self, exc: Exception) -> None:
        # A send from this socket was refused (ICMP unreachable, no route):
        # counted against the side it was sent to, that is this one.
        self.pair.counters[self.side].send_errors += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, data: bytes | memoryview, to: Address) -> None:
        if self.transport is not None:
            self.transport.sendto(data, to)

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            await self.closed


# Datagrams one drain takes from a socket before the loop serves the others.
_DRAIN_BATCH = 64


class _DrainPort:
    """loop="drain": a non-blocking socket read until empty at each wakeup
    into one preallocated buffer, and sent straight from it (a full send
    buffer drops the datagram, as a router's full queue would: WireGuard and
    what it carries cope). Fewer wakeups and no copy per datagram."""

    def __init__(self, pair: _Pair, side: int, sock: socket.socket) -> None:
        self.pair = pair
        self.side = side
        self.sock = sock
        self.buffer = bytearray(MAX_DATAGRAM)
        self.view = memoryview(self.buffer)
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        receive, view, pair, side = self.sock.recvfrom_into, self.view, self.pair, self.side
        for _ in range(_DRAIN_BATCH):
            try:
                size, addr = receive(self.buffer)
            except BlockingIOError:
                return
            except OSError:
                # An ICMP error for an earlier send from this socket, to this side.
                pair.counters[side].send_errors += 1
                continue
            pair.received(side, view[:size], addr)

    def send(self, data: bytes | memoryview, to: Address) -> None:
        try:
            self.sock.sendto(data, to)
        except OSError:
            self.pair.counters[self.side].send_errors += 1

    async def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


LOOPS = ("drain", "protocol")
# Each port's receive buffer (SO_RCVBUF; the kernel caps it at
# net.core.rmem_max). The default (~208 KiB) can overflow in the bursts a
# pair's TCP window makes while Python forwards the previous datagrams: in one
# run of bench/relay.py iperf3 made 319 Mbit/s through the relay with it and
# 430 with 4 MiB; in another the two were within the machine's noise.
RECEIVE_BUFFER = 4 * 1024 * 1024


class Forwarder:
    """The real thing: UDP sockets, two per pair, in this process. `bind` is
    the address the ports are bound on (every IPv4 address; tests use
    loopback); `loop` how they are read (see `_DrainPort`, `_Port`) and
    `receive_buffer` their SO_RCVBUF, both measured by bench/relay.py."""

    def __init__(
        self, bind: str = "0.0.0.0", loop: str = "drain", receive_buffer: int = RECEIVE_BUFFER
    ) -> None:
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}")
        self.bind = bind
        self.loop = loop
        self.receive_buffer = receive_buffer  # 0: the system's default
        self._pairs: dict[str, _Pair] = {}
        # Pairs whose last opening failed, and why (for status).
        self._failed: dict[str, tuple[RelayEntry, str]] = {}

    async def read(self) -> RelayState:
        return RelayState({key: pair.entry for key, pair in self._pairs.items()})

    async def open(self, key: str, entry: RelayEntry) -> None:
        await self.close_pair(key)
        pair = _Pair(key, entry)
        try:
            for side, port in enumerate(entry.ports):
                pair.endpoints.append(await self._bind(pair, side, port))
        except OSError as exc:
            await pair.close()
            why = f"cannot bind UDP port {port}: {exc.strerror or exc}"
            self._failed[key] = (entry, why)
            raise RelayError(why, retryable=True) from None
        self._failed.pop(key, None)
        self._pairs[key] = pair

    async def _bind(self, pair: _Pair, side: int, port: int) -> _Endpoint:
        """Raises OSError."""
        if self.loop == "protocol":
            transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _Port(pair, side), local_addr=(self.bind, port), family=socket.AF_INET
            )
            if self.receive_buffer:
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            return protocol
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.receive_buffer:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            sock.bind((self.bind, port))
        except OSError:
            sock.close()
            raise
        return _DrainPort(pair, side, sock)

    async def close_pair(self, key: str) -> None:
        self._failed.pop(key, None)
        pair = self._pairs.pop(key, None)
        if pair is not None:
            await pair.close()

    def status(self) -> list[PairStatus]:
        shown = [pair.status() for pair in self._pairs.values()]
        shown += [
            _Pair(key, entry).status(error=why)
            for key, (entry, why) in self._failed.items()
            if key not in self._pairs
        ]
        return sorted(shown, key=lambda s: s.key)

    async def close(self) -> None:
        for key in list(self._pairs):
            await self.close_pair(key)
        self._failed.clear()


async def carry_out(control: RelayControl | None, ops: list[RelayOp]) -> tuple[int, str] | None:
    """Carry out every op, each on its own: a pair whose port cannot be
    bound does not keep the others from being forwarded. Returns None, or
    (index of the first op that failed, why every failed one did)."""
    if control is None:
        return (0, "no relay control to apply to") if ops else None
    failures: list[tuple[int, str]] = []
    for i, op in enumerate(ops):
        try:
            match op:
                case OpenRelay(key=key, entry=entry):
                    await control.open(key, entry)
                case CloseRelay(key=key):
                    await control.close_pair(key)
        except BackendError as exc:
            failures.append((i, f"{op}: {exc}" if failures else str(exc)))
    if not failures:
        return None
    return failures[0][0], "; ".join(why for _, why in failures)
