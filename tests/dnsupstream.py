"""A tiny DNS server standing in for a host's own resolver: it answers A
queries for the names it is given, NXDOMAIN for others, over UDP and TCP,
and counts the questions it was asked (to show which names reached it).

In process (`Upstream`, for loopback tests) or as a process in a test
namespace: `python -m tests.dnsupstream ADDRESS PORT NAME=IP...` (prints
"ready" once it listens, and each question it gets as "asked NAME").
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
from typing import Any

from dnslib import QTYPE, RCODE, RR, A, DNSRecord


class Upstream:
    def __init__(self, names: dict[str, str]) -> None:
        self.names = {k.lower().removesuffix("."): v for k, v in names.items()}
        self.asked: list[str] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    def reply(self, data: bytes) -> bytes:
        query = DNSRecord.parse(data)
        name = str(query.q.qname).lower().removesuffix(".")
        self.asked.append(name)
        print(f"asked {name}", flush=True)
        reply = query.reply()
        reply.header.aa = 0
        if name in self.names:
            if query.q.qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(name, QTYPE.A, ttl=60, rdata=A(self.names[name])))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return bytes(reply.pack())

    async def start(self, address: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        upstream = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
                self.transport.sendto(upstream.reply(data), addr)  # type: ignore[attr-defined]

        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(address, port))
        self._tcp = await asyncio.start_server(self._serve_tcp, address, port)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            (size,) = struct.unpack("!H", await reader.readexactly(2))
            out = self.reply(await reader.readexactly(size))
            writer.write(struct.pack("!H", len(out)) + out)
            await writer.drain()
        writer.close()

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()


async def _main(address: str, port: int, pairs: list[str]) -> None:
    upstream = Upstream(dict(pair.split("=", 1) for pair in pairs))
    await upstream.start(address, port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
