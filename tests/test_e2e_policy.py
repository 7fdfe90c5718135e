"""Access policy on real tunnels: wireguard-go hosts in network namespaces,
their agents keeping peers and an nftables table as the policy says.

What must pass passes (a TCP listener answers on an allowed port, replies to
what a host opened come back, pings between an allowed pair never stop), and
what must be blocked is shown to fail, held for seconds: a denied port, a
denied host (it is not even a peer), a connection the other way round.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import pytest

from tests.meshnet import IFACE, NETMESH, Mesh, mesh_fixture  # noqa: F401
from tests.netns import Host, ping, testnet_fixture, wait_until  # noqa: F401
from tests.tcpprobe import SCRIPT
from tests.test_e2e_agent import Pinger, _mesh_up, _peers
from tests.test_e2e_dns import dig

pytestmark = pytest.mark.netns

# a: web, b: db, c: neither. Web may open 5432 and ping on db; everyone may
# ping web. c and b have no rule between them in either direction.
POLICY = """
// The issue's shape, trimmed to three hosts.
{
  rules: [
    {from: ["tag:web"], to: ["tag:db"], ports: ["5432/tcp", "icmp"]},
    {from: ["*"], to: ["tag:web"], ports: ["icmp"]},
  ],
  tests: [{from: "a", to: "b", accept: ["5432/tcp"], deny: ["22/tcp"]}],
}
"""
# The same, and ssh from web to db.
WITH_SSH = POLICY.replace('"5432/tcp", "icmp"]', '"5432/tcp", "22/tcp", "icmp"]').replace(
    'deny: ["22/tcp"]', 'deny: ["23/tcp"]'
)
HELD = 3.0  # seconds a denial must hold


async def _answers(host: Host, address: str, port: int) -> bool:
    result = await host.run(sys.executable, SCRIPT, "connect", address, str(port), check=False)
    return result.returncode == 0


async def _stays_refused(host: Host, address: str, port: int, *, held: float = HELD) -> None:
    """Every attempt to connect fails, for `held` seconds."""
    deadline = time.monotonic() + held
    attempts = 0
    while time.monotonic() < deadline:
        assert not await _answers(host, address, port), f"{host.name} reached {address}:{port}"
        attempts += 1
    assert attempts >= 2


async def _stays_unpingable(host: Host, address: str, *, held: float = HELD) -> None:
    result = await host.run(
        "ping", "-n", "-q", "-i", "0.2", "-W", "1", "-w", str(round(held)), address, check=False
    )
    assert " 0 received" in result.stdout, result.stdout


async def _nft_table(host: Host) -> str:
    return (await host.run("nft", "list", "table", "inet", "netmesh", check=False)).stdout


async def test_policy_is_enforced_by_peers_and_firewall_and_changes_without_a_drop(
    mesh: Mesh, tmp_path: Path
) -> None:
    _, nodes = await _mesh_up(mesh, ("a", "b", "c"))
    a, b, c = (mesh.hosts[n] for n in ("a", "b", "c"))
    address = {name: node["address"] for name, node in nodes.items()}
    key = {name: node["public_key"] for name, node in nodes.items()}
    await mesh.cli("node", "tag", "office/a", "web")
    await mesh.cli("node", "tag", "office/b", "db")
    for host, ports in ((b, ("5432", "22")), (a, ("8080",))):
        listener = await host.spawn(sys.executable, SCRIPT, "serve", *ports)
        assert listener.pid
    await wait_until(
        functools.partial(_answers, a, address["b"], 5432), timeout=10, message="listener on b"
    )
    await wait_until(
        functools.partial(_answers, b, address["a"], 8080), timeout=10, message="listener on a"
    )

    # Pings from web to db run through every change below.
    pinger = Pinger(a, address["b"])
    await pinger.start()
    policy = tmp_path / "policy.json5"
    policy.write_text(POLICY)
    pinger.mark("policy set")
    await mesh.cli("policy", "set", "office", str(policy))

    async def enforced() -> bool:
        return key["b"] not in await _peers(mesh, "c") and "dport" in await _nft_table(b)

    await wait_until(enforced, timeout=20, interval=0.2, message="policy enforced")
    # Allowed: web opens the database port; the answer comes back through
    # web's own firewall, which lets in nothing but pings (a reply passes).
    assert await _answers(a, address["b"], 5432)
    # Denied: another port on db, the other way round, and a host with no rule.
    await _stays_refused(a, address["b"], 22)
    await _stays_refused(b, address["a"], 8080)
    assert key["a"] in await _peers(mesh, "c") and key["c"] not in await _peers(mesh, "b")
    await _stays_unpingable(c, address["b"])
    assert await ping(c, address["a"]), "everyone may ping web"
    # Names follow what a host sees: c (asking its own server) gets web's
    # name, and b's does not exist for it.
    assert (await dig(c, address["c"], "a.office.internal", "+short")).strip() == address["a"]
    assert "status: NXDOMAIN" in await dig(c, address["c"], "b.office.internal")

    # A change of rules: ssh from web to db, applied without dropping the pair.
    pinger.mark("ssh allowed")
    policy.write_text(WITH_SSH)
    await mesh.cli("policy", "set", "office", str(policy))
    await wait_until(
        functools.partial(_answers, a, address["b"], 22), timeout=20, message="ssh allowed"
    )
    await _stays_refused(b, address["a"], 8080)

    # Cleared: the full mesh again.
    pinger.mark("cleared")
    await mesh.cli("policy", "clear", "office")
    await wait_until(
        functools.partial(ping, c, address["b"]), timeout=20, message="c reaches b again"
    )
    assert await _answers(b, address["a"], 8080)

    async def c_resolves_b() -> bool:
        answer = (await dig(c, address["c"], "b.office.internal", "+short")).strip()
        return bool(answer == address["b"])

    await wait_until(c_resolves_b, timeout=10, message="c resolves b again")
    stats = await pinger.stop()
    assert stats.lost == 0, pinger.timeline()


async def test_agent_down_removes_its_table_and_nothing_else(mesh: Mesh) -> None:
    await _mesh_up(mesh, ("a", "b"))
    a = mesh.hosts["a"]
    await a.run("nft", "add", "table", "inet", "other")
    await a.run(
        "nft", "add", "chain", "inet", "other", "input", "{ type filter hook input priority 10 ; }"
    )
    await a.run("nft", "add", "rule", "inet", "other", "input", "tcp", "dport", "9", "accept")
    await wait_until(
        lambda: _has_table(a), timeout=10, message="the agent's table is there beside ours"
    )
    await mesh.stop_agent("a")
    down = await a.run(
        *(NETMESH, "agent", "down", "--state-dir", str(mesh.tmp / "a"), "--interface", IFACE),
        beside=await mesh.wireguard_go_pid("a"),
    )
    assert down.returncode == 0, down.stderr
    assert not await _has_table(a)
    other = (await a.run("nft", "list", "table", "inet", "other")).stdout
    assert "tcp dport 9 accept" in other


async def _has_table(host: Host) -> bool:
    tables = (await host.run("nft", "list", "tables")).stdout
    return "table inet netmesh" in tables
