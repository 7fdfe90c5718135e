"""TCP listeners and probes for data-plane tests, run inside test hosts.

    python tests/tcpprobe.py serve PORT...          # answer "ok <port>" on each
    python tests/tcpprobe.py connect ADDRESS PORT   # exit 0 if it answered
    python tests/tcpprobe.py hello ADDRESS PORT     # print the greeting (it names our address)

`connect` exits 1 when the connection is refused or times out (a firewall's
drop), 2 when it connected but got no answer.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

SCRIPT = str(Path(__file__).resolve())


async def serve(ports: list[int]) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("sockname")[1]
        peer = writer.get_extra_info("peername")[0]
        # Echo lines after the greeting: one connection can carry data both
        # before and after a firewall change. The greeting says whom it saw
        # (what a NAT on the way made of the source).
        writer.write(f"ok {port} from {peer}\n".encode())
        await writer.drain()
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
        writer.close()

    servers = [await asyncio.start_server(answer, "0.0.0.0", port) for port in ports]
    print("listening", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def connect(address: str, port: int, timeout: float, *, show: bool = False) -> int:
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            greeting = sock.recv(64)
    except OSError:
        return 1
    if show:
        print(greeting.decode(errors="replace").strip(), flush=True)
    return 0 if greeting.startswith(b"ok") else 2


def main() -> int:
    command, *args = sys.argv[1:]
    if command == "serve":
        asyncio.run(serve([int(p) for p in args]))
        return 0
    if command in ("connect", "hello"):
        timeout = float(args[2]) if len(args) > 2 else 1.0
        return connect(args[0], int(args[1]), timeout, show=command == "hello")
    print(__doc__, file=sys.stderr)
    return 64


if __name__ == "__main__":
    sys.exit(main())
