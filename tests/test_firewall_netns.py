"""Real traffic through the agent's nftables table, in network namespaces.

Host a is the firewalled host; its `eth0` (on the test LAN) stands in for the
overlay interface. b is an allowed source, c a denied one. The table is put in
place by the firewall reconciler itself (the WireGuard parts are fakes here:
only the firewall is real)."""

from __future__ import annotations

import asyncio
import sys

import msgspec
import pytest
from nacl.public import PrivateKey

from agent.fake import FakeBackend, FakeLink, FakeMachine
from agent.firewall import NftFirewall
from agent.reconcile import PassResult, reconcile
from agent.statedir import private_key_b64, public_key_of
from events.desired import FirewallEntry
from tests.desired_states import desired_state
from tests.netns import (
    Host,
    TestNet,
    ping,
    testnet_fixture,  # noqa: F401  (the `testnet` fixture)
)

pytestmark = pytest.mark.netns

KEY = PrivateKey(bytes(range(32)))
ALLOWED, DENIED = 7001, 7002  # ports a listens on
B_LISTENS = 7100

# Echo servers on the ports given; "ready" once every port is bound.
SERVER = """
import socket, sys, threading
def echo(conn):
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)
def serve(listener):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()
listeners = []
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen()
    listeners.append(s)
print("ready", flush=True)
threads = [threading.Thread(target=serve, args=(s,), daemon=True) for s in listeners]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""

# Connect `tries` times (each with `timeout`), echo a line: one word per try.
PROBE = """
import socket, sys
host, port, tries, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
for _ in range(tries):
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"x\\n")
            print("ok" if s.recv(16) == b"x\\n" else "bad")
    except TimeoutError:
        print("timeout")
    except ConnectionRefusedError:
        print("refused")
    except OSError as exc:
        print(f"error-{exc.errno}")
"""

# One connection kept open: each line on stdin goes out, its echo comes back.
CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("connected", flush=True)
for line in sys.stdin:
    s.sendall(line.encode())
    print(s.recv(4096).decode().strip(), flush=True)
"""


async def probe(
    host: Host, address: str, port: int, tries: int = 1, timeout: float = 1.0
) -> list[str]:
    result = await host.run(
        sys.executable,
        "-c",
        PROBE,
        address,
        str(port),
        str(tries),
        str(timeout),
        timeout=tries * timeout + 10,
    )
    return result.stdout.split()


async def listen(host: Host, *ports: int) -> None:
    process = await host.spawn(
        sys.executable, "-c", SERVER, *map(str, ports), stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    assert await asyncio.wait_for(process.stdout.readline(), 10) == b"ready\n"


async def enforce(
    netns: str, machine: FakeMachine, entries: dict[str, FirewallEntry]
) -> PassResult:
    """One reconcile pass on host a: its eth0 is the overlay interface."""
    desired = desired_state()
    desired = msgspec.structs.replace(
        desired, sections=msgspec.structs.replace(desired.sections, firewall=entries)
    )
    result = await reconcile(
        desired,
        FakeBackend("eth0", machine),
        FakeLink("eth0", machine),
        firewall=NftFirewall(("ip", "netns", "exec", netns, "nft")),
        public_key=public_key_of(KEY),
        private_key=private_key_b64(KEY),
        previous={},
    )
    assert result.ok, result.errors()
    return result


async def test_allowed_denied_replies_and_a_replace_under_an_open_connection(
    testnet: TestNet,
) -> None:
    a = await testnet.add_host("a")
    b = await testnet.add_host("b")
    c = await testnet.add_host("c")
    await listen(a, ALLOWED, DENIED)
    await listen(b, B_LISTENS)
    await listen(c, B_LISTENS)
    # Without a firewall everything gets through: what fails later is its doing.
    assert await probe(b, a.lan_address, DENIED) == ["ok"]
    assert await probe(c, a.lan_address, ALLOWED) == ["ok"]

    machine = FakeMachine()
    policy = {f"{b.lan_address}/32": FirewallEntry(allow=(f"{ALLOWED}/tcp", "icmp"))}
    first = await enforce(a.netns, machine, policy)
    assert [
        str(op).split(":")[0] for o in first.outcomes if o.name == "firewall" for op in o.ops
    ] == ["replace firewall on eth0"]
    # Read back, the table is the one installed: the next pass does nothing to it.
    again = await enforce(a.netns, machine, policy)
    assert [o.ops for o in again.outcomes if o.name == "firewall"] == [()]

    assert await probe(b, a.lan_address, ALLOWED) == ["ok"]
    # A denied port and a denied source, tried for two seconds: every try fails.
    denied_port, denied_source = await asyncio.gather(
        probe(b, a.lan_address, DENIED, tries=4, timeout=0.5),
        probe(c, a.lan_address, ALLOWED, tries=4, timeout=0.5),
    )
    assert denied_port == ["timeout"] * 4
    assert denied_source == ["timeout"] * 4
    assert await ping(b, a.lan_address)  # icmp allowed for b
    assert not await ping(c, a.lan_address, timeout=0.5)
    # Replies to what a opens pass, even from c, which may open nothing to a.
    assert await probe(a, c.lan_address, B_LISTENS) == ["ok"]
    assert await ping(a, c.lan_address)
    # Other interfaces are not touched: a reaches its own denied port on lo.
    assert await probe(a, "127.0.0.1", DENIED) == ["ok"]

    # An open connection from b, then a replace that allows b nothing new.
    client = await b.spawn(
        sys.executable,
        "-c",
        CLIENT,
        a.lan_address,
        str(ALLOWED),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert client.stdin is not None and client.stdout is not None

    async def say(word: str) -> bytes:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(f"{word}\n".encode())
        await client.stdin.drain()
        return await asyncio.wait_for(client.stdout.readline(), 10)

    assert await asyncio.wait_for(client.stdout.readline(), 10) == b"connected\n"
    assert await say("before") == b"before\n"
    await enforce(
        a.netns, machine, {f"{c.lan_address}/32": FirewallEntry(allow=(f"{DENIED}/tcp",))}
    )
    assert await probe(c, a.lan_address, DENIED) == ["ok"]  # the new rules are in force
    assert await probe(b, a.lan_address, ALLOWED, tries=2, timeout=0.5) == ["timeout"] * 2
    assert await say("after") == b"after\n"  # and the established connection lives on

    # Removed: everything gets through again.
    await NftFirewall(("ip", "netns", "exec", a.netns, "nft")).remove()
    assert await probe(b, a.lan_address, DENIED) == ["ok"]
