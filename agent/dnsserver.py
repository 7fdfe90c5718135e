"""The host's DNS server: asyncio, on the overlay addresses, port 53, UDP and TCP.

It answers the names of its zone (agent/dnszone.py) and forwards every other
query, as it came, to the host's own resolvers (`upstreams`), returning their
answer as it comes back. Whatever arrives, the server stays up: bytes that do
not parse get FORMERR (or nothing), a failing upstream SERVFAIL, and a flood
is bounded (queries in flight, TCP connections, idle time).

Sockets are bound with IP_FREEBIND: the overlay address may be added in the
same pass, and an IPv6 address is unusable until duplicate address detection
ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, cast

import structlog
from dnslib import QTYPE, RCODE, DNSRecord

from agent.backend import BackendError
from agent.dnszone import Zone, answer, reply_to_garbage, truncated

log = structlog.get_logger("netmesh.agent.dns")

DNS_PORT = 53
MAX_IN_FLIGHT = 512  # queries being answered or forwarded at once; more are dropped
MAX_TCP_CLIENTS = 64
TCP_IDLE = 10.0  # seconds a TCP client may take to send its next message
FORWARD_TIMEOUT = 2.0  # per upstream
_UDP_PLAIN = 512  # the answer size a client without EDNS can take
_IP_FREEBIND = 15  # <linux/in.h>
_IPV6_FREEBIND = 78  # <linux/in6.h>


class DnsServeError(BackendError):
    """An address the server could not bind (in use, not permitted)."""


class DnsServer:
    def __init__(
        self,
        upstreams: Callable[[], Sequence[str]],
        *,
        port: int = DNS_PORT,
        upstream_port: int = DNS_PORT,
        forward_timeout: float = FORWARD_TIMEOUT,
    ) -> None:
        self.zone = Zone()
        self.port = port
        self.upstream_port = upstream_port
        self._upstreams = upstreams
        self._forward_timeout = forward_timeout
        self._udp: dict[str, asyncio.DatagramTransport] = {}
        self._tcp: dict[str, asyncio.Server] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_clients: set[asyncio.StreamWriter] = set()
        self.dropped = 0  # queries dropped because too many were in flight

    @property
    def listening(self) -> tuple[str, ...]:
        return tuple(sorted(self._udp))

    async def serve(self, addresses: Sequence[str], zone: Zone) -> None:
        """Answer `zone` on exactly `addresses` from now on. Raises
        DnsServeError when an address cannot be bound (the others are)."""
        self.zone = zone
        for address in set(self._udp) - set(addresses):
            self._unbind(address)
        failed = []
        for address in sorted(set(addresses) - set(self._udp)):
            try:
                await self._bind(address)
            except OSError as exc:
                self._unbind(address)
                failed.append(f"{address} port {self.port}: {exc.strerror or exc}")
        if failed:
            raise DnsServeError(f"cannot serve DNS on {'; '.join(failed)}")

    async def close(self) -> None:
        for address in list(self._udp):
            self._unbind(address)
        for client in list(self._tcp_clients):
            client.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _bind(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        udp = _socket(address, socket.SOCK_DGRAM, self.port)
        transport, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        self._udp[address] = transport
        tcp = _socket(address, socket.SOCK_STREAM, self.port)
        self._tcp[address] = await asyncio.start_server(self._serve_tcp, sock=tcp, backlog=64)

    def _unbind(self, address: str) -> None:
        udp = self._udp.pop(address, None)
        if udp is not None:
            udp.close()
        tcp = self._tcp.pop(address, None)
        if tcp is not None:
            tcp.close()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self.dropped += 1
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resolve(self, data: bytes, *, tcp: bool) -> bytes | None:
        """The bytes to send back for the message `data`; None: send nothing."""
        try:
            query = DNSRecord.parse(data)
        except Exception:  # dnslib raises more than DNSError on garbage
            return reply_to_garbage(data)
        if query.header.qr:
            return None  # a reply, not a query
        try:
            reply = answer(self.zone, query)
        except Exception as exc:  # a bug must cost one answer, not the server
            log.warning("dns answer failed", error=repr(exc))
            return _failure(query, RCODE.SERVFAIL)
        if reply is not None:
            return bytes(reply.pack()) if tcp else truncated(reply, _udp_limit(query))
        return await self._forward(data, query, tcp=tcp)

    async def _forward(self, data: bytes, query: DNSRecord, *, tcp: bool) -> bytes:
        mine = set(self._udp)
        for upstream in self._upstreams():
            if upstream in mine:
                continue  # ourselves (our own line in the host's resolver configuration)
            try:
                async with asyncio.timeout(self._forward_timeout):
                    ask = _ask_tcp if tcp else _ask_udp
                    found = await ask(upstream, self.upstream_port, data)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                continue
            if len(found) >= 2 and found[:2] == data[:2]:
                return found
        return _failure(query, RCODE.SERVFAIL)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tcp_clients) >= MAX_TCP_CLIENTS:
            writer.close()
            return
        self._tcp_clients.add(writer)
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(size)
                out = await self.resolve(data, tcp=True)
                if out is None:
                    break
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            self._tcp_clients.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A datagram transport, though not a DatagramTransport subclass (3.11's selector loop).
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.server.spawn(self._answer(data, addr))

    async def _answer(self, data: bytes, addr: tuple[Any, ...]) -> None:
        out = await self.server.resolve(data, tcp=False)
        if out is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for an earlier answer: nothing to do


def _socket(address: str, kind: socket.SocketKind, port: int) -> socket.socket:
    v6 = ":" in address
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    try:
        sock.setblocking(False)
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_FREEBIND, 1)
        else:
            sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    return sock


def _udp_limit(query: DNSRecord) -> int:
    """The largest UDP answer the client takes (its EDNS size, if it sent one)."""
    for extra in query.ar:
        if extra.rtype == QTYPE.OPT:
            return max(_UDP_PLAIN, min(int(extra.rclass), 4096))
    return _UDP_PLAIN


def _failure(query: DNSRecord, rcode: int) -> bytes:
    reply = query.reply()
    reply.header.aa = 0
    reply.header.rcode = rcode
    return bytes(reply.pack())


async def _ask_udp(upstream: str, port: int, data: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[bytes] = loop.create_future()

    class Ask(asyncio.DatagramProtocol):
        def datagram_received(self, reply: bytes, addr: tuple[Any, ...]) -> None:
            if not answered.done() and reply[:2] == data[:2]:
                answered.set_result(reply)

        def error_received(self, exc: Exception) -> None:
            if not answered.done():
                answered.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(Ask, remote_addr=(upstream, port))
    try:
        transport.sendto(data)
        return await answered
    finally:
        transport.close()


async def _ask_tcp(upstream: str, port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(upstream, port)
    try:
        writer.write(struct.pack("!H", len(data)) + data)
        await writer.drain()
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(size)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
