"""End to end: hosts behind NATs (issue 14). The lab (tests/netns.py): the test
LAN plays the internet; `add_router` makes a home router with a LAN of its own,
masquerading with nftables in its namespace, endpoint-independent or symmetric.

- the lab itself: an endpoint-independent NAT keeps one mapping (its source
  port) for every destination, a symmetric one makes one per destination, and
  neither lets in what nobody inside asked for;
- real `netmesh server` and agents (wireguard-go): a host behind a NAT reaches,
  and is reached from, a public host and a host behind another NAT (their
  public mappings, seen by peers and reported as signed `endpoint.seen`, are
  offered to the others, and both ends punch through); two hosts behind the
  same NAT talk over their LAN addresses.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from agent.nat import RETRY_DIRECT, TRY_FOR
from tests.meshnet import IFACE, Mesh
from tests.netns import Host, TestNet, ping, testnet_fixture, wait_until  # noqa: F401

pytestmark = pytest.mark.netns

AGENT_ARGS = ("--resync-interval", "1")

# A UDP receiver on port argv[1]: first sends a datagram to each ip:port of
# argv[3:] (opening its NAT's mapping), then prints the source of the first
# datagram it gets, as ip:port, or "nothing" after argv[2] seconds.
_RECEIVE = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('0.0.0.0', int(sys.argv[1])))\n"
    "for d in sys.argv[3:]:\n"
    "    ip, port = d.rsplit(':', 1)\n"
    "    s.sendto(b'out', (ip, int(port)))\n"
    "print('ready', flush=True)\n"
    "s.settimeout(float(sys.argv[2]))\n"
    "try:\n"
    "    _, (ip, port) = s.recvfrom(100)\n"
    "    print(f'{ip}:{port}', flush=True)\n"
    "except TimeoutError:\n"
    "    print('nothing', flush=True)\n"
)
# A UDP sender: from one source port to each destination ip:port in turn.
_SEND = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.bind(('0.0.0.0', int(sys.argv[1])))\n"
    "for d in sys.argv[2:]:\n"
    "    ip, port = d.rsplit(':', 1)\n"
    "    s.sendto(b'hello', (ip, int(port)))\n"
)


async def _receiver(
    host: Host, port: int, wait: float, *first_to: str
) -> asyncio.subprocess.Process:
    process = await host.spawn(
        sys.executable,
        "-c",
        _RECEIVE,
        str(port),
        str(wait),
        *first_to,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert (await asyncio.wait_for(process.stdout.readline(), 10)).strip() == b"ready"
    return process


async def _received_from(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 20)
    return line.decode().strip()


async def _sources(sender: Host, receivers: list[Host], port: int = 40000) -> list[str]:
    """Where each of `receivers` saw one datagram from `sender`'s port `port` come from."""
    listening = [await _receiver(r, 9999, 5) for r in receivers]
    destinations = [f"{r.lan_address}:9999" for r in receivers]
    await sender.run(sys.executable, "-c", _SEND, str(port), *destinations)
    return [await _received_from(p) for p in listening]


async def test_lab_nat_kinds(testnet: TestNet) -> None:
    one = await testnet.add_host("one")
    two = await testnet.add_host("two")
    home = await testnet.add_router("home", "192.168.1")
    office = await testnet.add_router("office", "192.168.2", nat="symmetric")
    h = await testnet.add_behind_nat(home, "h")
    s = await testnet.add_behind_nat(office, "s")

    # Endpoint-independent: one mapping, its source port kept, for both destinations.
    assert await _sources(h, [one, two]) == [f"{home.lan_address}:40000"] * 2
    # Symmetric: a mapping per destination (random ports: they differ, or nearly
    # never agree by chance: 1 in ~64k, in which case the test says so).
    seen = await _sources(s, [one, two])
    assert {x.rpartition(":")[0] for x in seen} == {office.lan_address}
    assert seen[0] != seen[1], seen
    # Unsolicited: nothing gets in, not even to the mapping just opened, from
    # a host it was not sent to (held 5 s).
    listening = await _receiver(h, 40001, 5, f"{one.lan_address}:9")
    await two.run(sys.executable, "-c", _SEND, "9", f"{home.lan_address}:40001")
    assert await _received_from(listening) == "nothing"
    # ... while the host it was sent to gets in (a reply).
    listening = await _receiver(h, 40002, 5, f"{one.lan_address}:9")
    await one.run(sys.executable, "-c", _SEND, "9", f"{home.lan_address}:40002")
    assert await _received_from(listening) == f"{one.lan_address}:9"


# -- the mesh across NATs ------------------------------------------------------------


async def _nat_mesh(testnet: TestNet, tmp_path: Path) -> Mesh:
    """cp and `pub` on the internet; `a1`, `a2` behind router `r1`, `c` behind
    `r2` (both endpoint-independent)."""
    mesh = Mesh(testnet, tmp_path)
    mesh.cp = await testnet.add_host("cp")
    mesh.hosts["pub"] = await testnet.add_host("pub")
    r1 = await testnet.add_router("r1", "192.168.1")
    r2 = await testnet.add_router("r2", "192.168.2")
    mesh.hosts["r1"], mesh.hosts["r2"] = r1, r2
    mesh.hosts["a1"] = await testnet.add_behind_nat(r1, "a1")
    mesh.hosts["a2"] = await testnet.add_behind_nat(r1, "a2")
    mesh.hosts["c"] = await testnet.add_behind_nat(r2, "c")
    return mesh


async def _endpoints(mesh: Mesh, name: str) -> dict[str, str]:
    """Peer public key -> the endpoint `name`'s device uses for it."""
    lines = (await mesh.wg(name, "endpoints")).splitlines()
    return dict(line.split("\t") for line in lines if "\t" in line)


async def _seen_events(mesh: Mesh) -> list[dict[str, Any]]:
    _, out, _ = await mesh.cli("events", "log", "--json")
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in events if e["type"] == "host.endpoint_seen"]


async def test_hosts_behind_nats_reach_each_other(testnet: TestNet, tmp_path: Path) -> None:
    mesh = await _nat_mesh(testnet, tmp_path)
    names = ("pub", "a1", "a2", "c")
    await mesh.start_server()
    await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
    token = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
    for name in names:
        # Each announces what it sees on its own interfaces: behind a NAT, a
        # private address nobody outside its LAN can reach.
        await mesh.start_agent(name, token, AGENT_ARGS)
    nodes = await wait_until(
        functools.partial(_joined, mesh, names), timeout=60, interval=0.3, message="joined"
    )
    keys = {n["name"]: n["public_key"] for n in nodes.values()}
    for src, dst in itertools.permutations(names, 2):
        try:
            await wait_until(
                functools.partial(ping, mesh.hosts[src], nodes[dst]["address"]),
                timeout=60,
                message=f"ping {src} -> {dst}",
            )
        except TimeoutError:
            raise AssertionError(
                f"ping {src} -> {dst}\n{mesh.log('agent-' + src)}\n{mesh.log('agent-' + dst)}"
            ) from None

    r1, r2 = mesh.hosts["r1"].lan_address, mesh.hosts["r2"].lan_address
    # The public host reaches them at their mappings: r1's for a1 and a2 (both
    # use port 51820: one of them got another), r2's for c (its port kept).
    at_pub = await _endpoints(mesh, "pub")
    assert at_pub[keys["c"]] == f"{r2}:51820"
    assert at_pub[keys["a1"]].rpartition(":")[0] == r1
    assert at_pub[keys["a2"]].rpartition(":")[0] == r1
    assert at_pub[keys["a1"]] != at_pub[keys["a2"]]
    # Across NATs: each at the other's public mapping, the same one the public
    # host sees (endpoint-independent: one mapping for every destination).
    assert (await _endpoints(mesh, "c"))[keys["a1"]] == at_pub[keys["a1"]]
    assert (await _endpoints(mesh, "c"))[keys["a2"]] == at_pub[keys["a2"]]
    assert (await _endpoints(mesh, "a1"))[keys["c"]] == f"{r2}:51820"
    # Behind the same NAT: over the LAN, not through the router.
    assert (await _endpoints(mesh, "a2"))[keys["a1"]] == f"{mesh.hosts['a1'].lan_address}:51820"
    assert (await _endpoints(mesh, "a1"))[keys["a2"]] == f"{mesh.hosts['a2'].lan_address}:51820"

    # Status says how each peer is reached, with its last handshake.
    async def paths_of(name: str) -> dict[str, tuple[str | None, bool]] | None:
        shown = await mesh.cli_json("node", "show", f"office/{name}")
        peers = {p["name"]: (p["path"], p["connected"]) for p in shown["status"]["peers"]}
        return peers if all(connected for _, connected in peers.values()) else None

    at_c = await wait_until(
        functools.partial(paths_of, "c"), timeout=20, message="c's peers connected"
    )
    assert at_c == {
        "pub": ("direct", True),
        "a1": ("direct, nat", True),
        "a2": ("direct, nat", True),
    }
    at_a2 = await wait_until(
        functools.partial(paths_of, "a2"), timeout=20, message="a2's peers connected"
    )
    assert (
        at_a2 is not None
        and at_a2["a1"] == ("direct", True)
        and at_a2["c"] == ("direct, nat", True)
    )
    # The audit log says where each was seen (signed host commands).
    seen = {(e["data"]["host_id"], e["data"]["endpoint"]) for e in await _seen_events(mesh)}
    hosts = {n["name"]: n["host_id"] for n in nodes.values()}
    assert (hosts["c"], f"{r2}:51820") in seen
    assert (hosts["a1"], at_pub[keys["a1"]]) in seen
    assert not any(h == hosts["pub"] for h, _ in seen)  # public: never seen elsewhere


async def _joined(mesh: Mesh, names: tuple[str, ...]) -> dict[str, dict[str, Any]] | None:
    nodes = {n["name"]: n for n in await mesh.cli_json("node", "list")}
    return nodes if all(name in nodes for name in names) else None


assert IFACE  # the interface the helpers read


async def test_behind_a_symmetric_nat_only_public_hosts_are_reached(
    testnet: TestNet, tmp_path: Path
) -> None:
    """A symmetric NAT gives every destination its own mapping: what the public
    host saw is no use to anyone else, so a host behind another NAT cannot
    reach it directly (with no relay in the network): shown to fail for
    longer than every candidate takes to be tried."""
    mesh = Mesh(testnet, tmp_path)
    mesh.cp = await testnet.add_host("cp")
    mesh.hosts["pub"] = await testnet.add_host("pub")
    r2 = await testnet.add_router("r2", "192.168.2")
    r3 = await testnet.add_router("r3", "192.168.3", nat="symmetric")
    mesh.hosts["c"] = await testnet.add_behind_nat(r2, "c")
    mesh.hosts["s"] = await testnet.add_behind_nat(r3, "s")
    names = ("pub", "c", "s")
    await mesh.start_server()
    await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
    token = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
    for name in names:
        await mesh.start_agent(name, token, AGENT_ARGS)
    nodes = await wait_until(
        functools.partial(_joined, mesh, names), timeout=60, interval=0.3, message="joined"
    )
    for src, dst in [("s", "pub"), ("pub", "s"), ("c", "pub"), ("pub", "c")]:
        assert await wait_until(
            functools.partial(ping, mesh.hosts[src], nodes[dst]["address"]),
            timeout=60,
            message=f"ping {src} -> {dst}",
        )
    keys = {n["name"]: n["public_key"] for n in nodes.values()}
    # c has s's candidates (its mapping towards pub first) and tries them all...
    hosts = {nodes[n]["host_id"] for n in ("c", "s")}

    async def both_seen() -> bool:
        return hosts <= {e["data"]["host_id"] for e in await _seen_events(mesh)}

    await wait_until(both_seen, timeout=30, interval=0.5, message="s and c seen")
    # ... in vain, for two rounds of both candidates (held 2 x 2 x TRY_FOR).
    for _ in range(4):
        assert not await ping(mesh.hosts["c"], nodes["s"]["address"], count=15, timeout=1)
        assert not await ping(mesh.hosts["s"], nodes["c"]["address"], count=1, timeout=1)
    at_c = await _endpoints(mesh, "c")
    assert at_c[keys["s"]].rpartition(":")[0] in {r3.lan_address, mesh.hosts["s"].lan_address}


# -- relays ---------------------------------------------------------------------------


async def _relay_lab(testnet: TestNet, tmp_path: Path) -> Mesh:
    """cp, the relay `rl` and `p` on the internet; `c` behind an
    endpoint-independent NAT (router `r2`), `s` behind a symmetric one (`r3`)."""
    mesh = Mesh(testnet, tmp_path)
    mesh.cp = await testnet.add_host("cp")
    mesh.hosts["rl"] = await testnet.add_host("rl")
    mesh.hosts["p"] = await testnet.add_host("p")
    mesh.hosts["r2"] = await testnet.add_router("r2", "192.168.2")
    mesh.hosts["r3"] = await testnet.add_router("r3", "192.168.3", nat="symmetric")
    mesh.hosts["c"] = await testnet.add_behind_nat(mesh.hosts["r2"], "c")
    mesh.hosts["s"] = await testnet.add_behind_nat(mesh.hosts["r3"], "s")
    return mesh


async def _continuous_ping(host: Host, address: str, seconds: int) -> asyncio.subprocess.Process:
    """ping every 0.2 s for `seconds` (its summary on stdout at the end)."""
    return await host.spawn(
        "ping", "-n", "-q", "-i", "0.2", "-w", str(seconds), address,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _lost(process: asyncio.subprocess.Process) -> tuple[int, int]:
    """(sent, answered) from a finished ping's summary."""
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    line = next(x for x in out.decode().splitlines() if "transmitted" in x)
    sent, answered = (int(word) for word in line.replace(",", " ").split() if word.isdigit())
    return sent, answered


async def test_relays_carry_what_cannot_go_direct_and_take_over_a_cut_path(
    testnet: TestNet, tmp_path: Path
) -> None:
    """s (symmetric NAT) and c (another NAT) cannot punch through: after their
    agents give up on every direct path, they ask for a relay and ping each
    other through it; the relay forwards their datagrams as they are. Then the
    direct path p <-> c is cut on c's router under a continuous ping: it fails
    over to the relay within the bound (TRY_FOR after the first unanswered
    datagram, plus a pass), and comes back to direct once the cut is gone."""
    mesh = await _relay_lab(testnet, tmp_path)
    names = ("rl", "p", "c", "s")
    await mesh.start_server()
    await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
    token = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
    for name in names:
        await mesh.start_agent(name, token, AGENT_ARGS)
    nodes = await wait_until(
        functools.partial(_joined, mesh, names), timeout=60, interval=0.3, message="joined"
    )
    keys = {n["name"]: n["public_key"] for n in nodes.values()}
    hosts = {n["name"]: n["host_id"] for n in nodes.values()}
    # A host behind a NAT cannot relay; a public one can (refusals: one line, exit 1).
    await wait_until(functools.partial(_seen, mesh, hosts["c"]), timeout=60, message="c seen")
    code, _, err = await mesh.cli("relay", "add", "office/c", check=False)
    assert code == 1 and "seen behind a NAT" in err and len(err.strip().splitlines()) == 1
    await mesh.cli("relay", "add", "office/rl", "--ports", "53000-53099")

    # s <-> c: through the relay, both ways, once their agents gave up on direct.
    for src, dst in (("s", "c"), ("c", "s")):
        try:
            await wait_until(
                functools.partial(ping, mesh.hosts[src], nodes[dst]["address"]),
                timeout=120,
                interval=1,
                message=f"ping {src} -> {dst} through the relay",
            )
        except TimeoutError:
            raise AssertionError(
                f"{src} -> {dst}\n{mesh.log('agent-' + src)[-6000:]}"
                f"\n{mesh.log('agent-' + dst)[-6000:]}"
            ) from None
    relay_ip = mesh.hosts["rl"].lan_address
    assert (await _endpoints(mesh, "c"))[keys["s"]].rpartition(":")[0] == relay_ip
    assert (await _endpoints(mesh, "s"))[keys["c"]].rpartition(":")[0] == relay_ip
    (relay,) = await mesh.cli_json("relay", "list")
    assert [sorted(pair["hosts"]) for pair in relay["pairs"]] == [["c", "s"]]
    opened = [e for e in await _events(mesh) if e["type"] == "relay.pair_opened"]
    assert len(opened) == 1 and opened[0]["data"]["asked_by"] in {hosts["c"], hosts["s"]}

    async def path(viewer: str, peer: str) -> str | None:
        shown = await mesh.cli_json("node", "show", f"office/{viewer}")
        found = {x["name"]: x for x in shown["status"]["peers"]}.get(peer)
        return found["path"] if found and found["connected"] else None

    assert await wait_until(
        lambda: _is(path("c", "s"), "relay rl"), timeout=20, message="c says s is relayed"
    )

    # p <-> c: direct (hole punched), then cut on c's router under a ping.
    assert await wait_until(
        functools.partial(ping, mesh.hosts["p"], nodes["c"]["address"]), timeout=60
    )
    assert (await _endpoints(mesh, "p"))[keys["c"]].rpartition(":")[0] != relay_ip
    pinging = await _continuous_ping(mesh.hosts["p"], nodes["c"]["address"], 60)
    p_ip = mesh.hosts["p"].lan_address
    cut = (
        "table inet lab_cut {\n chain forward {\n"
        "  type filter hook forward priority -10; policy accept;\n"
        f"  ip saddr {p_ip} udp dport != 53 drop\n  ip daddr {p_ip} udp sport != 53 drop\n"
        " }\n}\n"
    )
    await mesh.hosts["r2"].run("sh", "-c", f"printf '{cut}' | nft -f -")
    sent, answered = await _lost(pinging)
    lost_seconds = (sent - answered) * 0.2
    print(f"failover: {sent - answered} of {sent} pings lost ({lost_seconds:.1f} s)")
    assert answered > 0 and lost_seconds <= TRY_FOR + 10, (sent, answered)
    assert (await _endpoints(mesh, "p"))[keys["c"]].rpartition(":")[0] == relay_ip
    assert await ping(mesh.hosts["p"], nodes["c"]["address"], count=5, timeout=1)
    # While cut, no datagram of theirs passes the router directly (the relay carries all).
    # Back: the cut gone, direct is tried again at the next multiple of RETRY_DIRECT.
    await mesh.hosts["r2"].run("nft", "delete", "table", "inet", "lab_cut")
    restored = time.monotonic()

    async def direct_again() -> bool:
        at = (await _endpoints(mesh, "p"))[keys["c"]].rpartition(":")[0]
        return at not in {relay_ip, ""} and await ping(mesh.hosts["p"], nodes["c"]["address"])

    await wait_until(direct_again, timeout=3 * RETRY_DIRECT, interval=1, message="direct again")
    print(f"back to direct {time.monotonic() - restored:.1f} s after the cut was lifted")


async def _is(value: Awaitable[object], expected: object) -> bool:
    return (await value) == expected


async def _events(mesh: Mesh) -> list[dict[str, Any]]:
    _, out, _ = await mesh.cli("events", "log", "--json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def _seen(mesh: Mesh, host_id: str) -> bool:
    return any(e["data"]["host_id"] == host_id for e in await _seen_events(mesh))
