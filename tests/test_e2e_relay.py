"""The relay forwarder end to end: two wireguard-go hosts behind symmetric
NATs (no direct path: each NAT gives a new mapping per destination and drops
what nobody asked for) reach each other through a relay host running only the
forwarder (agent/relay.py; no control plane: the devices are set with `wg`).

Proven by traffic: ping passes through the relay; a plain-text marker sent
inside the tunnel arrives, and is never in what the relay forwards (a capture
on the relay's wire that does see the same marker sent in the clear); the
relay entry removed, ping fails (held 3 s)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from agent.statedir import private_key_b64, public_key_of
from tests.netns import (
    Driver,
    Host,
    TestNet,
    testnet_fixture,  # noqa: F401  (the `testnet` fixture)
    wait_until,
)

pytestmark = pytest.mark.netns

PORTS = (45001, 45002)
MARKER = b"NETMESH-PLAINTEXT-MARKER-7f3a"

# A capture on the relay's eth0 (AF_PACKET, both directions) until stdin
# closes: how many UDP datagrams to or from the relay ports it saw, and how
# many datagrams held the marker, on those ports and elsewhere.
_CAPTURE = r"""
import json, select, socket, struct, sys
ports, marker = {int(p) for p in sys.argv[1].split(",")}, sys.argv[2].encode()
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
seen = {"relayed": 0, "relayed_bytes": 0, "marker_relayed": 0, "marker_elsewhere": 0}
print("ready", flush=True)
while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if sys.stdin in ready:
        break
    frame = s.recv(65535)
    if frame[12:14] != b"\x08\x00" or frame[23] != 17:
        continue
    ihl = (frame[14] & 15) * 4
    sport, dport = struct.unpack("!HH", frame[14 + ihl : 18 + ihl])
    payload = frame[22 + ihl :]
    if sport in ports or dport in ports:
        seen["relayed"] += 1
        seen["relayed_bytes"] += len(payload)
        seen["marker_relayed"] += marker in payload
    else:
        seen["marker_elsewhere"] += marker in payload
print(json.dumps(seen), flush=True)
"""

# Receives one UDP datagram on the overlay and prints it.
_RECEIVE = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind((sys.argv[1], int(sys.argv[2])))\n"
    "print('ready', flush=True)\n"
    "print(s.recv(65535).decode(), flush=True)\n"
)
_SEND = (
    "import socket, sys\n"
    "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto("
    "sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))\n"
)


async def wireguard_host(
    host: Host,
    key: PrivateKey,
    address: str,
    peer: PrivateKey,
    peer_ip: str,
    endpoint: str,
    tmp: Path,
) -> int:
    """A wireguard-go device wg0 in `host` with one peer at `endpoint`; its pid."""
    process = await host.spawn(
        "wireguard-go", "-f", "wg0", env={"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
    )
    pid = process.pid

    async def up() -> bool:
        return (await host.run("wg", "show", "wg0", beside=pid, check=False)).returncode == 0

    await wait_until(up, timeout=10, message=f"wg0 in {host.name}")
    key_file = tmp / f"{host.name}.key"
    key_file.write_text(private_key_b64(key) + "\n")
    key_file.chmod(0o600)
    await host.run(
        "wg", "set", "wg0", "private-key", str(key_file), "listen-port", "51820",
        "peer", public_key_of(peer), "allowed-ips", f"{peer_ip}/32",
        "endpoint", endpoint, "persistent-keepalive", "1",
        beside=pid,
    )  # fmt: skip
    await host.run("ip", "addr", "add", f"{address}/24", "dev", "wg0", beside=pid)
    await host.run("ip", "link", "set", "wg0", "up", beside=pid)
    return pid


async def replies(host: Host, address: str, seconds: int) -> int:
    """Echo replies `host` gets from `address` pinging it 5 times a second for `seconds`."""
    result = await host.run(
        "ping", "-n", "-q", "-i", "0.2", "-W", "1", "-w", str(seconds), address,
        check=False, timeout=seconds + 10,
    )  # fmt: skip
    for part in result.stdout.replace("\n", ",").split(","):
        if part.strip().endswith("received"):
            return int(part.split()[0])
    raise AssertionError(f"no ping summary: {result.stdout!r} {result.stderr!r}")


async def relay_status(forwarder: Driver) -> list[dict[str, object]]:
    return await forwarder.call("fw", "status")  # type: ignore[no-any-return]


async def test_two_hosts_behind_symmetric_nats_talk_through_the_relay_which_reads_nothing(
    testnet: TestNet, tmp_path: Path
) -> None:
    relay = await testnet.add_host("relay")
    router_a = await testnet.add_router("ra", "192.168.71", nat="symmetric")
    router_b = await testnet.add_router("rb", "192.168.72", nat="symmetric")
    a = await testnet.add_behind_nat(router_a, "a")
    b = await testnet.add_behind_nat(router_b, "b")

    forwarder = await relay.driver()
    await forwarder.new("fw", "agent.relay:Forwarder")
    entry = {"hosts": ["host-a", "host-b"], "ports": list(PORTS), "names": ["a", "b"]}
    await forwarder.call("fw", "open", key="host-a,host-b", entry=entry)

    capture = await relay.spawn(
        sys.executable, "-c", _CAPTURE, ",".join(map(str, PORTS)), MARKER.decode(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert capture.stdout is not None and capture.stdin is not None
    assert (await asyncio.wait_for(capture.stdout.readline(), 10)).strip() == b"ready"

    key_a, key_b = PrivateKey.generate(), PrivateKey.generate()
    # a sends to the relay's first port, b to its second.
    relay_ip = relay.lan_address
    await wireguard_host(
        a, key_a, "10.71.0.1", key_b, "10.71.0.2", f"{relay_ip}:{PORTS[0]}", tmp_path
    )
    pid_b = await wireguard_host(
        b, key_b, "10.71.0.2", key_a, "10.71.0.1", f"{relay_ip}:{PORTS[1]}", tmp_path
    )

    # Through the relay, both ways.
    assert await wait_until(lambda: replies(a, "10.71.0.2", 1), timeout=30, message="a -> b")
    assert await replies(b, "10.71.0.1", 2) > 0
    # Full-size packets too (1420 bytes inside: a 1452-byte datagram, no multiple of 16).
    big = await a.run("ping", "-n", "-q", "-c", "3", "-s", "1392", "-M", "do", "10.71.0.2")
    assert " 0% packet loss" in big.stdout, big.stdout
    # The relay learned each side at its NAT's public address (the routers'), nothing else.
    (pair,) = await relay_status(forwarder)
    sides = pair["sides"]
    assert isinstance(sides, list)
    assert sides[0]["address"].startswith(f"{router_a.lan_address}:")
    assert sides[1]["address"].startswith(f"{router_b.lan_address}:")
    assert sides[0]["forwarded"] > 0 and sides[1]["forwarded"] > 0
    assert sides[0]["dropped_junk"] == 0 and sides[1]["dropped_junk"] == 0
    # b sees a at the relay's port for a (WireGuard's roaming kept it there).
    shown = (await b.run("wg", "show", "wg0", "endpoints", beside=pid_b)).stdout
    assert f"{relay_ip}:{PORTS[1]}" in shown

    # A marker inside the tunnel arrives, and the relay never carries it readable.
    receiver = await b.spawn(
        sys.executable, "-c", _RECEIVE, "10.71.0.2", "7777", beside=pid_b,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert receiver.stdout is not None
    assert (await asyncio.wait_for(receiver.stdout.readline(), 10)).strip() == b"ready"
    await a.run(sys.executable, "-c", _SEND, "10.71.0.2", "7777", MARKER.decode())
    received = await asyncio.wait_for(receiver.stdout.readline(), 10)
    assert received.strip() == MARKER
    # The control: the same marker in the clear to the relay is seen by the capture.
    await a.run(sys.executable, "-c", _SEND, relay_ip, "9", MARKER.decode())

    # The entry removed: its ports closed, and nothing passes (held 3 s).
    await forwarder.call("fw", "close_pair", key="host-a,host-b")
    assert await relay_status(forwarder) == []
    assert await replies(a, "10.71.0.2", 3) == 0

    capture.stdin.close()
    seen = json.loads(await asyncio.wait_for(capture.stdout.readline(), 10))
    assert seen["relayed"] > 10, seen
    assert seen["marker_elsewhere"] >= 1, seen  # the capture would have seen it
    assert seen["marker_relayed"] == 0, seen
    await forwarder.close()
