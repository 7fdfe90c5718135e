"""Names on real hosts: agents (wireguard-go) in network namespaces serve DNS
on their overlay addresses and point the host's resolver at it for the
network's domain, through a resolv.conf of each host's own (bound over
/etc/resolv.conf in its mount namespace; tests/netns.py).

Resolved through the host's C library (`getent hosts`, which reads that
file) and asked of the server directly (`dig`, UDP and TCP): a node's name
right after it joins and not after it is removed, a custom record, a name
unknown in the domain (NXDOMAIN), other names through the host's own
resolver (a DNS server this test runs in a namespace of its own, which never
hears the overlay's names), and the host's resolv.conf byte for byte as it
was once the agent stops, and after `agent down` of an agent that died.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.meshnet import IFACE, Mesh, mesh_fixture  # noqa: F401
from tests.netns import TIME_SCALE, Host, testnet_fixture, wait_until  # noqa: F401
from tests.test_e2e_agent import _mesh_up

pytestmark = pytest.mark.netns

UPSTREAM = str(Path(__file__).with_name("dnsupstream.py"))
EXTERNAL = ("example.test", "198.51.100.7")  # only the test's upstream knows it


async def getent(mesh: Mesh, name: str, target: str) -> str | None:
    """The address the C library of host `name` resolves `target` to (None:
    it does not), beside its agent (its mount namespace, its resolv.conf)."""
    host = mesh.hosts[name]
    if name in mesh.agents:
        result = await host.run(
            "getent", "ahostsv4", target, beside=mesh.agents[name].pid, check=False
        )
        return result.stdout.split()[0] if result.returncode == 0 else None
    # No agent: a process of its own, with the host's resolv.conf bound all the same.
    process = await host.spawn("getent", "ahostsv4", target, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), 30 * TIME_SCALE)
    return out.decode().split()[0] if process.returncode == 0 else None


async def dig(host: Host, server: str, target: str, *options: str) -> str:
    result = await host.run(
        "dig", f"@{server}", target, "+time=2", "+tries=2", *options, check=False
    )
    return result.stdout


async def resolves_to(mesh: Mesh, name: str, target: str, address: str | None) -> bool:
    return await getent(mesh, name, target) == address


class Heard:
    """The names the upstream was asked, as it prints them."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.names: list[str] = []
        self.task = asyncio.create_task(self._read(process))

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            if line.startswith(b"asked "):
                self.names.append(line.decode().split()[1])


async def start_upstream(mesh: Mesh) -> tuple[Host, asyncio.subprocess.Process]:
    """A resolver of the hosts' own, in a namespace of its own on the LAN."""
    host = await mesh.net.add_host("up")
    process = await host.spawn(
        sys.executable,
        UPSTREAM,
        host.lan_address,
        "53",
        f"{EXTERNAL[0]}={EXTERNAL[1]}",
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    async with asyncio.timeout(20 * TIME_SCALE):
        assert (await process.stdout.readline()).strip() == b"ready"
    return host, process


async def test_names_resolve_on_every_host_and_the_resolver_is_given_back(mesh: Mesh) -> None:
    upstream, upstream_process = await start_upstream(mesh)
    originals = {}
    for name in ("a", "b", "c"):
        # Each host's own configuration, as a machine would have it: its
        # resolver, a search list, an option (no final newline: kept as is).
        original = (
            f"# {name}'s resolver\nnameserver {upstream.lan_address}\n"
            "search example.net\noptions timeout:1 attempts:2"
        ).encode()
        mesh.hosts[name].resolv_conf.write_bytes(original)
        originals[name] = original
    heard = Heard(upstream_process)
    _, nodes = await _mesh_up(mesh, ("a", "b"))
    a, b = mesh.hosts["a"], mesh.hosts["b"]
    address_a, address_b = nodes["a"]["address"], nodes["b"]["address"]

    # Right after the join: each host's C library finds the other by name.
    await wait_until(
        functools.partial(resolves_to, mesh, "a", "b.office.internal", address_b),
        timeout=20,
        message="b.office.internal from a",
    )
    assert await getent(mesh, "b", "a.office.internal") == address_a
    block = a.resolv_conf.read_bytes()
    assert block.startswith(b"# netmesh: begin") and block.endswith(originals["a"])
    assert f"nameserver {address_a}\n".encode() in block

    # The server itself, over UDP and TCP; NXDOMAIN for a name unknown in the domain.
    assert (await dig(a, address_a, "b.office.internal", "+short")).strip() == address_b
    assert (await dig(b, address_b, "a.office.internal", "+tcp", "+short")).strip() == address_a
    assert "status: NXDOMAIN" in await dig(a, address_a, "nope.office.internal")
    assert await getent(mesh, "a", "nope.office.internal") is None

    # Other names: through the host's own resolver, as before.
    assert await getent(mesh, "a", EXTERNAL[0]) == EXTERNAL[1]
    assert (await dig(a, address_a, EXTERNAL[0], "+tcp", "+short")).strip() == EXTERNAL[1]

    # A custom record, then a node joining: both resolve on a, waited for.
    await mesh.cli("dns", "add", "office", "files", "--a", "10.66.0.200")
    await wait_until(
        functools.partial(resolves_to, mesh, "a", "files.office.internal", "10.66.0.200"),
        timeout=20,
        message="files.office.internal from a",
    )
    token = (await mesh.cli("key", "create", "--network", "office"))[1].strip()
    await mesh.start_agent("c", token, ("--resync-interval", "2"))
    address_c = await wait_until(
        functools.partial(getent, mesh, "a", "c.office.internal"),
        timeout=30,
        message="c.office.internal from a after c joined",
    )
    (node_c,) = [n for n in await mesh.cli_json("node", "list") if n["name"] == "c"]
    assert address_c == node_c["address"]

    # Removed: its name stops resolving (on a, and on b).
    await mesh.cli("node", "remove", "office/c")
    await wait_until(
        functools.partial(resolves_to, mesh, "a", "c.office.internal", None),
        timeout=20,
        message="c.office.internal gone from a",
    )
    assert "status: NXDOMAIN" in await dig(b, address_b, "c.office.internal")

    await mesh.stop_agent("c")
    # The overlay's names never went to the host's resolver (those with the
    # search list's suffix, tried after an NXDOMAIN, are other names); the
    # other name did.
    assert EXTERNAL[0] in heard.names
    assert not {name for name in heard.names if name.endswith(".office.internal")}, heard.names

    # a stops (SIGTERM), b dies (SIGKILL): both leave the resolver pointed at
    # them, as they leave the interface; other names still resolve at once
    # (the stopped server's address refuses queries: the C library moves on).
    await mesh.stop_agent("a")
    killed = mesh.agents.pop("b")
    killed.kill()
    await killed.wait()
    for name in ("a", "b"):
        assert mesh.hosts[name].resolv_conf.read_bytes() != originals[name]
        started = time.monotonic()
        assert await getent(mesh, name, EXTERNAL[0]) == EXTERNAL[1]
        assert time.monotonic() - started < 1.0  # no resolver timeout on the way
        assert await getent(mesh, name, f"{name}.office.internal") is None
    upstream_process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(heard.task, 10)

    # `agent down` gives each its resolv.conf back, byte for byte.
    for name in ("a", "b"):
        down = await mesh.hosts[name].spawn(
            mesh.netmesh,
            "agent",
            "down",
            "--state-dir",
            str(mesh.tmp / name),
            "--interface",
            IFACE,
            stdout=asyncio.subprocess.PIPE,
        )
        await asyncio.wait_for(down.communicate(), 30 * TIME_SCALE)
        assert down.returncode == 0
        assert mesh.hosts[name].resolv_conf.read_bytes() == originals[name]
    # And c, removed before it stopped, had given its own back already.
    assert mesh.hosts["c"].resolv_conf.read_bytes() == originals["c"]
