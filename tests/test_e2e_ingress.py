"""An external client on real tunnels: a device without the agent brings up
the configuration `netmesh client create` printed with the real `wg-quick up`
(wireguard-go as its userspace WireGuard), through an ingress gateway.

What must pass passes: the client pings mesh nodes (its gateway and another
member), a member pings the client and resolves its name, the client reaches
a LAN host behind an egress gateway on another host, and the gateway's DNS
answers the client.
After `client remove` none of it does, held for seconds.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import pytest

from tests.meshnet import Mesh, mesh_fixture  # noqa: F401
from tests.netns import Host, ping, testnet_fixture, wait_until  # noqa: F401
from tests.tcpprobe import SCRIPT
from tests.test_e2e_agent import AGENT_ARGS, _in_sync
from tests.test_e2e_gateway import PORT, _hello, _stays_unreachable

pytestmark = pytest.mark.netns

LAN = "192.168.79"
HELD = 3.0


async def _unreachable_for_a_while(host: Host, address: str) -> None:
    deadline = time.monotonic() + HELD
    attempts = 0
    while time.monotonic() < deadline:
        assert not await ping(host, address), f"{host.name} reached {address}"
        attempts += 1
    assert attempts >= 2


async def _office(mesh: Mesh) -> dict[str, dict[str, str]]:
    """Server, network office, agents a and b in sync, b an ingress gateway."""
    if mesh.backends:
        pytest.skip("the client's side is wg-quick; the gateways' backends are tested elsewhere")
    await mesh.start_server()
    await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
    token = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
    for name in ("a", "b"):
        await mesh.start_agent(name, token, AGENT_ARGS)
    await wait_until(lambda: _in_sync(mesh, ("a", "b")), timeout=60, message="agents in sync")
    await mesh.cli("gateway", "ingress", "add", "office/b")
    return {n["name"]: n for n in await mesh.cli_json("node", "list")}


async def _wg_quick_up(phone: Host, conf: Path, tmp_path: Path) -> None:
    """`wg-quick up conf` in `phone`, with wireguard-go; wg-quick hands a DNS
    line to resolvconf: the one here records what it got (resolvconf.in)."""
    tmp_path.mkdir(exist_ok=True)
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    (shims / "resolvconf").write_text(f'#!/bin/sh\ncat > "{tmp_path}/resolvconf.in"\n')
    (shims / "resolvconf").chmod(0o755)
    up = await phone.spawn(
        "sh", "-c", f'exec "$@" >{tmp_path}/wg-quick.log 2>&1', "sh",
        "env", f"PATH={shims}:{os.environ['PATH']}",
        "WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go",
        "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1",
        "wg-quick", "up", str(conf),
    )  # fmt: skip
    assert await up.wait() == 0, (tmp_path / "wg-quick.log").read_text()


async def test_a_wg_quick_client_reaches_the_mesh_and_a_lan_until_it_is_removed(
    mesh: Mesh, tmp_path: Path
) -> None:
    nodes = await _office(mesh)
    a_address, b_address = nodes["a"]["address"], nodes["b"]["address"]
    lan = await mesh.net.add_behind(mesh.hosts["a"], "site", LAN)
    assert (await lan.spawn(sys.executable, SCRIPT, "serve", str(PORT))).pid
    await mesh.cli("gateway", "egress", "add", "office/a", "--range", f"{LAN}.0/24")

    conf = tmp_path / "phone.conf"  # wg-quick names the interface after the file
    await mesh.cli(
        "client", "create", "phone", "--network", "office", "--via", "b", "--output", str(conf)
    )
    (client,) = await mesh.cli_json("client", "list")
    phone = await mesh.net.add_host("phone")
    await _wg_quick_up(phone, conf, tmp_path)
    assert (tmp_path / "resolvconf.in").read_text().strip() == (
        f"nameserver {b_address}\nsearch office.internal"
    )

    # Through its gateway b: b itself, the member a, the LAN behind a.
    for address in (b_address, a_address):
        assert await wait_until(
            functools.partial(ping, phone, address), timeout=30, message=f"phone -> {address}"
        )
    seen = await wait_until(
        lambda: _hello(phone, f"{LAN}.2"), timeout=20, message="phone reaches the LAN"
    )
    assert seen == f"ok {PORT} from {LAN}.1", "masqueraded by a, the LAN's gateway"
    assert await wait_until(
        functools.partial(ping, mesh.hosts["a"], client["address"]),
        timeout=20,
        message="a member reaches the client",
    )
    answer = await phone.run("dig", "+short", "+time=2", f"@{b_address}", "a.office.internal")
    assert answer.stdout.strip() == a_address
    # And the client has a name of its own, on every member.
    answer = await mesh.hosts["a"].run(
        "dig", "+short", "+time=2", f"@{a_address}", "phone.office.internal"
    )
    assert answer.stdout.strip() == client["address"]

    # The gateway's status names the client among its peers, with a handshake.
    async def handshake_reported() -> bool:
        shown = await mesh.cli_json("node", "show", "office/b")
        peers = (shown.get("status") or {}).get("peers", [])
        return any(p["name"] == "client phone" and p["connected"] for p in peers)

    await wait_until(handshake_reported, timeout=20, message="the client in b's status")

    await mesh.cli("client", "remove", "office/phone")

    async def withdrawn() -> bool:
        return not await ping(phone, b_address) and not await ping(phone, a_address)

    await wait_until(withdrawn, timeout=20, message="the client is cut off")
    await _unreachable_for_a_while(phone, a_address)
    await _unreachable_for_a_while(mesh.hosts["a"], client["address"])
    await _stays_unreachable(phone, f"{LAN}.2")
    assert client["public_key"] not in await mesh.wg("b", "peers")


INTERNET = "198.51.100"


async def test_a_full_tunnel_client_reaches_the_internet_through_its_gateway(
    mesh: Mesh, tmp_path: Path
) -> None:
    """`--full-tunnel` through an ingress gateway that is an internet
    gateway: the client's default route is the tunnel (wg-quick's own policy
    routing), and what it sends to the internet leaves masqueraded by b."""
    nodes = await _office(mesh)
    b = mesh.hosts["b"]
    internet = await mesh.net.add_behind(b, "internet", INTERNET)
    await b.run("ip", "route", "add", "default", "via", f"{INTERNET}.2")
    assert (await internet.spawn(sys.executable, SCRIPT, "serve", str(PORT))).pid
    await mesh.cli("gateway", "egress", "add", "office/b", "--range", "0.0.0.0/0")
    conf = tmp_path / "laptop.conf"
    await mesh.cli(
        "client", "create", "laptop", "--network", "office", "--via", "b",
        "--full-tunnel", "--no-dns", "--output", str(conf),
    )  # fmt: skip
    laptop = await mesh.net.add_host("laptop")
    await _stays_unreachable(laptop, f"{INTERNET}.2")  # no route there of its own
    await _wg_quick_up(laptop, conf, tmp_path)
    seen = await wait_until(
        lambda: _hello(laptop, f"{INTERNET}.2"), timeout=30, message="the laptop's way out"
    )
    assert seen == f"ok {PORT} from {INTERNET}.1", "masqueraded by its gateway"
    assert await wait_until(
        functools.partial(ping, laptop, nodes["a"]["address"]), timeout=20, message="and the mesh"
    )


async def test_under_a_policy_the_gateway_forwards_to_a_client_only_what_the_rules_allow(
    mesh: Mesh, tmp_path: Path
) -> None:
    """Two clients of one gateway, a policy naming them by address: a member
    the policy lets reach the phone does; the other client, whose packets
    the gateway would forward into the network, does not reach the phone
    (the phone's forward entry is exclusive), though its tunnel works."""
    nodes = await _office(mesh)
    await mesh.cli("node", "tag", "office/a", "ops")
    configs = {}
    for name in ("phone", "tab"):
        configs[name] = tmp_path / f"{name}.conf"
        await mesh.cli(
            "client", "create", name, "--network", "office", "--via", "b",
            "--no-dns", "--output", str(configs[name]),
        )  # fmt: skip
    address = {c["name"]: c["address"] for c in await mesh.cli_json("client", "list")}
    policy = tmp_path / "policy.json5"
    policy.write_text(
        "{rules: [\n"
        f'  {{from: ["tag:ops"], to: ["b", "{address["phone"]}/32"]}},\n'
        f'  {{from: ["{address["tab"]}/32"], to: ["b"]}},\n'
        "]}\n"
    )
    await mesh.cli("policy", "set", "office", str(policy))
    hosts = {}
    for name in ("phone", "tab"):
        hosts[name] = await mesh.net.add_host(name)
        await _wg_quick_up(hosts[name], configs[name], tmp_path / name)
    b_address = nodes["b"]["address"]
    assert await wait_until(
        functools.partial(ping, hosts["tab"], b_address), timeout=30, message="tab's tunnel"
    )
    assert await wait_until(
        functools.partial(ping, mesh.hosts["a"], address["phone"]),
        timeout=30,
        message="a reaches the phone, as its rule says",
    )
    await _unreachable_for_a_while(hosts["tab"], address["phone"])
