"""Split DNS through a real systemd-resolved: the agent's resolvectl path
(agent/resolver.py `Resolved`) end to end, not as a command sequence on a fake.

Hosts `a` and `b` each run Debian's systemd-resolved 252 with a system bus of
its own, inside the host's namespaces (tests/resolvedhost.py); each agent runs
beside them, so it finds /run/systemd/resolve and resolvectl and takes the
resolved path. The hosts' own resolver is a DNS server the test runs on the
LAN (tests/dnsupstream.py): a's resolved takes it from a's resolv.conf (a
"foreign" file); b's has it as resolved.conf's `DNS=`, and b's resolv.conf
names the stub, 127.0.0.53, as most machines with resolved have it (so b's C
library, `getent`, resolves through resolved).

Shown: the overlay interface gets the agent's server as its per-link DNS
server and `~office.internal` as its routing domain, and is no default route;
`resolvectl query` and the stub at 127.0.0.53 answer the other node's name
from the agent (over nm0), an unknown name in the domain is NXDOMAIN there,
other names still go to the upstream, which never hears the overlay's names;
the hosts' resolv.conf is never written. Taken back: a removed node's agent
reverts the link while the interface stays (`resolvectl revert`); a stopped
agent leaves it pointed, and `agent down` takes it back with the interface;
then `resolvectl status` and resolved's upstreams are as before.
"""

from __future__ import annotations

import asyncio
import functools
import signal
from pathlib import Path

import pytest

from tests.meshnet import IFACE, Mesh
from tests.netns import TIME_SCALE, TestNet, testnet_fixture, wait_until  # noqa: F401
from tests.resolvedhost import STUB_RESOLV_CONF, Resolved, resolved_unavailable
from tests.test_e2e_agent import AGENT_ARGS, _in_sync
from tests.test_e2e_dns import EXTERNAL, Heard, dig, start_upstream

pytestmark = pytest.mark.netns

DOMAIN = "office.internal"


@pytest.fixture(name="mesh")
async def resolved_mesh_fixture(testnet: TestNet, tmp_path: Path) -> Mesh:
    reason = resolved_unavailable()
    if reason is not None:
        pytest.skip(reason)
    m = Mesh(testnet, tmp_path)
    m.cp = await testnet.add_host("cp")
    for name in ("a", "b"):
        m.hosts[name] = await testnet.add_host(name)
    return m


async def query(resolved: Resolved, name: str) -> tuple[str | None, str]:
    """(the IPv4 address resolved answers for `name` or None, its output)."""
    result = await resolved.resolvectl("query", "-4", "--cache=no", name, check=False)
    if result.returncode != 0:
        return None, result.stdout + result.stderr
    # "b.office.internal: 10.66.0.2                     -- link: nm0"
    first = result.stdout.splitlines()[0]
    return first.partition(":")[2].split()[0], result.stdout


async def answers(resolved: Resolved, name: str, address: str | None) -> str | None:
    found, output = await query(resolved, name)
    return output if found == address else None


async def link_settings(resolved: Resolved) -> tuple[list[str], list[str]] | None:
    """(per-link DNS servers, domains) of IFACE as resolved reports them."""
    dns = await resolved.resolvectl("dns", IFACE, check=False)
    domain = await resolved.resolvectl("domain", IFACE, check=False)
    if dns.returncode or domain.returncode or not dns.stdout:
        return None
    return dns.stdout.partition(":")[2].split(), domain.stdout.partition(":")[2].split()


async def settings_are(
    resolved: Resolved, wanted: tuple[list[str], list[str]]
) -> tuple[list[str], list[str]] | None:
    settings = await link_settings(resolved)
    return settings if settings == wanted else None


async def link_gone(resolved: Resolved) -> bool:
    # (`resolvectl status nm0` of a missing link says so on stderr, exit 0.)
    return f"({IFACE})" not in (await resolved.resolvectl("status")).stdout


async def getent(resolved: Resolved, name: str) -> str | None:
    """The address the C library of resolved's host finds for `name` (None: none)."""
    result = await resolved.host.run("getent", "ahostsv4", name, beside=resolved.pid, check=False)
    return result.stdout.split()[0] if result.returncode == 0 else None


async def upstream_file(resolved: Resolved) -> str:
    result = await resolved.host.run("cat", "/run/systemd/resolve/resolv.conf", beside=resolved.pid)
    return result.stdout


async def agent_down(mesh: Mesh, name: str, resolved: Resolved) -> None:
    down = await mesh.hosts[name].spawn(
        mesh.netmesh,
        "agent",
        "down",
        "--state-dir",
        str(mesh.tmp / name),
        "--interface",
        IFACE,
        beside=resolved.pid,
        env=resolved.env(),
        stdout=asyncio.subprocess.PIPE,
    )
    await asyncio.wait_for(down.communicate(), 30 * TIME_SCALE)
    assert down.returncode == 0


async def test_split_dns_through_a_real_systemd_resolved(mesh: Mesh) -> None:
    upstream, upstream_process = await start_upstream(mesh)
    heard = Heard(upstream_process)
    try:
        await _scenario(mesh, upstream.lan_address, heard)
        upstream_process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(heard.task, 10)
    finally:
        heard.task.cancel()  # before cleanup reads the upstream's output


async def _scenario(mesh: Mesh, upstream: str, heard: Heard) -> None:
    # a: resolv.conf names the upstream (resolved takes it from there, "foreign");
    # b: resolv.conf names resolved's stub, the upstream is in resolved.conf.
    originals = {
        "a": f"# a's resolver\nnameserver {upstream}\noptions timeout:1".encode(),
        "b": STUB_RESOLV_CONF.encode(),
    }
    resolveds, status_before, upstreams_before = {}, {}, {}
    for name in ("a", "b"):
        host = mesh.hosts[name]
        host.resolv_conf.write_bytes(originals[name])
        resolved = await Resolved.start(
            host,
            mesh.tmp / f"resolved-{name}",
            mesh.tmp / f"resolved-{name}.log",
            dns=upstream if name == "b" else None,
        )
        resolveds[name] = resolved
        # The upstream is resolved's; asked once, it is resolved's current server.
        assert (await query(resolved, EXTERNAL[0]))[0] == EXTERNAL[1]
        status_before[name] = (await resolved.resolvectl("status")).stdout
        upstreams_before[name] = await upstream_file(resolved)
        assert f"nameserver {upstream}" in upstreams_before[name]
    ra, rb = resolveds["a"], resolveds["b"]
    b = mesh.hosts["b"]

    await mesh.start_server()
    await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
    token = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
    for name in ("a", "b"):
        resolved = resolveds[name]
        await mesh.start_agent(name, token, AGENT_ARGS, beside=resolved.pid, env=resolved.env())
    await wait_until(
        lambda: _in_sync(mesh, ("a", "b")), timeout=60, interval=0.3, message="agents in sync"
    )
    nodes = {n["name"]: n for n in await mesh.cli_json("node", "list")}
    address = {name: nodes[name]["address"] for name in ("a", "b")}

    # Each agent's per-link settings, as resolved itself reports them.
    for name, resolved in resolveds.items():
        await wait_until(
            functools.partial(settings_are, resolved, ([address[name]], [f"~{DOMAIN}"])),
            timeout=20,
            message=f"resolved's DNS settings on {IFACE} of {name}",
        )
        link_status = (await resolved.resolvectl("status", IFACE)).stdout
        assert "-DefaultRoute" in link_status, link_status

    # The other's name through resolved, sent over nm0 to the host's agent; and
    # through the stub, as the C library of a host using it would ask.
    output = await wait_until(
        functools.partial(answers, ra, f"b.{DOMAIN}", address["b"]),
        timeout=20,
        message=f"b.{DOMAIN} through a's resolved",
    )
    assert output is not None and f"link: {IFACE}" in output, output
    assert await getent(rb, f"a.{DOMAIN}") == address["a"]  # b's C library, through the stub
    assert (await dig(b, "127.0.0.53", f"a.{DOMAIN}", "+short")).strip() == address["a"]
    assert (await dig(b, "127.0.0.53", f"a.{DOMAIN}", "+tcp", "+short")).strip() == address["a"]
    # Unknown inside the domain: the agent's NXDOMAIN (the upstream is never asked).
    missing, output = await query(ra, f"nope.{DOMAIN}")
    assert missing is None and "not found" in output.lower(), output
    assert "status: NXDOMAIN" in await dig(b, "127.0.0.53", f"nope.{DOMAIN}")
    assert await getent(rb, f"nope.{DOMAIN}") is None
    # Other names: to the host's upstream, as before (not over nm0).
    found, output = await query(ra, EXTERNAL[0])
    assert found == EXTERNAL[1] and f"link: {IFACE}" not in output, output
    assert (await dig(b, "127.0.0.53", EXTERNAL[0], "+short")).strip() == EXTERNAL[1]
    assert await getent(rb, EXTERNAL[0]) == EXTERNAL[1]
    # The resolved path was taken: no host's resolv.conf ever had a block.
    for name in ("a", "b"):
        assert mesh.hosts[name].resolv_conf.read_bytes() == originals[name]
    assert not [n for n in heard.names if n.endswith(DOMAIN)], heard.names

    # a removed from the network: its agent reverts the link, which stays.
    await mesh.cli("node", "remove", "office/a")
    await wait_until(
        functools.partial(settings_are, ra, ([], [])),
        timeout=20,
        message=f"a's {IFACE} reverted in resolved",
    )
    assert not await link_gone(ra)
    assert (await query(ra, f"b.{DOMAIN}"))[0] is None  # asked upstream now: unknown there
    assert (await query(ra, EXTERNAL[0]))[0] == EXTERNAL[1]

    # b stopped: its link stays pointed at it (as the file path leaves its
    # block); `agent down` takes it back with the interface.
    await mesh.stop_agent("b")
    assert await link_settings(rb) == ([address["b"]], [f"~{DOMAIN}"])
    await agent_down(mesh, "b", rb)
    await mesh.stop_agent("a")
    await agent_down(mesh, "a", ra)
    for name, resolved in resolveds.items():
        await wait_until(
            functools.partial(link_gone, resolved),
            timeout=10,
            message=f"{IFACE} of {name} gone from resolved",
        )
        assert (await resolved.resolvectl("status")).stdout == status_before[name]
        assert await upstream_file(resolved) == upstreams_before[name]
        assert mesh.hosts[name].resolv_conf.read_bytes() == originals[name]
        assert resolved.process.returncode is None, f"systemd-resolved of {name} exited"
    assert (await query(rb, f"a.{DOMAIN}"))[0] is None
    assert await getent(rb, EXTERNAL[0]) == EXTERNAL[1]
    assert f"b.{DOMAIN}" in heard.names  # after a's removal, not before
