"""End to end with kernel WireGuard: kernel hosts and a wireguard-go host in one
mesh, real agents and `netmesh server` in network namespaces (tests/meshnet.py).

Needs the wireguard kernel module: skipped without it, and run by
tests/test_kernel_vm.py inside a VM with a real kernel. The helpers are those of
tests/test_e2e_agent.py, whose tests all run with kernel hosts too (`[mixed]`)."""

from __future__ import annotations

import functools

import pytest

from tests.meshnet import IFACE, NETMESH, Mesh, mesh_fixture  # noqa: F401
from tests.netns import ping, testnet_fixture, wait_until  # noqa: F401
from tests.test_e2e_agent import (
    REPAIR_WITHIN,
    Pinger,
    _addresses,
    _has_addresses,
    _has_peer,
    _lacks_peer,
    _log_size,
    _mesh_up,
    _peers,
    _restart_agent,
    _wait_log,
)

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("mesh", ["mixed"], indirect=True)
async def test_kernel_hosts_beside_wireguard_go(mesh: Mesh) -> None:
    """Kernel WireGuard on a (picked by `--backend auto`) and c beside wireguard-go
    on b, in one mesh: every pair pings; while a pings b without losing a packet, c
    rotates its key (a's and b's peers for c switch in place) and a's agent restarts
    (its kernel interface stays, untouched); then c's kernel interface drifts and is
    repaired (a peer removed, its address deleted, the link deleted).

    The backend-specific points of tests/test_e2e_agent.py in one mesh, cheap
    enough for the emulated VM of tests/test_kernel_vm.py."""
    _, nodes = await _mesh_up(mesh, ("a", "b", "c"))
    a, c = mesh.hosts["a"], mesh.hosts["c"]
    for name in ("a", "c"):  # kernel devices (a's agent chose it, `--backend auto`)
        assert await mesh.device_id(name) is not None
        assert await mesh.wireguard_go_pid(name) is None
    pinger = Pinger(a, nodes["b"]["address"])
    await pinger.start()

    pinger.mark("c rotates its key")
    old_key = nodes["c"]["public_key"]
    rotated = await c.run(
        *(NETMESH, "agent", "rotate-key", "--state-dir", str(mesh.tmp / "c")),
        beside=mesh.agents["c"].pid,
    )
    new_key = rotated.stdout.strip().rpartition(" ")[2]
    assert new_key and new_key != old_key, rotated.stdout
    for name in ("a", "b"):
        await wait_until(
            functools.partial(_has_peer, mesh, name, new_key),
            timeout=REPAIR_WITHIN + 5,
            message=f"{name} has c's new key",
        )
        assert await _lacks_peer(mesh, name, old_key)

    async def c_uses_new_key() -> bool:
        return (await mesh.wg("c", "public-key")).strip() == new_key

    await wait_until(c_uses_new_key, timeout=REPAIR_WITHIN + 5, message="c's device switched")
    for src, dst in (("a", "c"), ("c", "a"), ("b", "c")):
        assert await wait_until(
            functools.partial(ping, mesh.hosts[src], nodes[dst]["address"]),
            timeout=15,
            message=f"ping {src} -> {dst} after the rotation",
        )

    pinger.mark("restart agent a")
    await _restart_agent(mesh, "a")
    pinger.mark("agent a back")
    stats = await pinger.stop()
    assert stats.lost == 0, f"a -> b: {stats.lost} of {stats.transmitted} lost\n{pinger.timeline()}"

    # c's interface drifts: each change is repaired within about one resync.
    a_key = nodes["a"]["public_key"]
    desired_addresses = await _addresses(c)
    assert len(desired_addresses) == 1
    since = _log_size(mesh, "c")
    await c.run("wg", "set", IFACE, "peer", a_key, "remove", beside=mesh.agents["c"].pid)
    await wait_until(
        functools.partial(_has_peer, mesh, "c", a_key),
        timeout=REPAIR_WITHIN,
        interval=0.1,
        message="c's peer a back",
    )
    entry = await _wait_log(
        mesh,
        "c",
        since,
        lambda e: e.get("event") == "drift repair" and a_key in e.get("op", ""),
        timeout=2,
        message="peer drift logged",
    )
    assert f"endpoint {a.lan_address}:51820" in entry["op"], entry
    (address,) = desired_addresses
    await c.run("ip", "addr", "del", address, "dev", IFACE)
    await wait_until(
        functools.partial(_has_addresses, c, desired_addresses),
        timeout=REPAIR_WITHIN,
        interval=0.1,
        message="c's address back",
    )
    old_device = await mesh.device_id("c")
    await c.run("ip", "link", "del", IFACE)

    async def recreated() -> bool:
        device = await mesh.device_id("c")
        return (
            device not in (None, old_device)
            and await _has_addresses(c, desired_addresses)
            and a_key in await _peers(mesh, "c")
        )

    await wait_until(recreated, timeout=REPAIR_WITHIN + 3, interval=0.1, message="c recreated")
    dump = (await mesh.wg("c", "dump")).splitlines()[0].split("\t")
    assert dump[1] == new_key and dump[2] == "51820", (dump, mesh.log("agent-c")[-3000:])
    for src, dst in (("a", "c"), ("c", "b")):
        assert await wait_until(
            functools.partial(ping, mesh.hosts[src], nodes[dst]["address"]),
            timeout=15,
            message=f"ping {src} -> {dst} after the repair",
        )
