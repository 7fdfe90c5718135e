"""`--wait` end to end: `netmesh server` and real agents (wireguard-go) in
network namespaces, on the guarded TLS broker. A command with --wait returns
only once every member's real interface has the change; with one agent
stopped it exits 3 after the timeout, naming that host as offline."""

from __future__ import annotations

import pytest

from tests.meshnet import IFACE, Mesh, mesh_fixture  # noqa: F401
from tests.netns import testnet_fixture  # noqa: F401
from tests.test_e2e_agent import _mesh_up

pytestmark = pytest.mark.netns


async def mtu(mesh: Mesh, name: str) -> str:
    link = (await mesh.hosts[name].run("ip", "link", "show", IFACE)).stdout
    return link.split(" mtu ", 1)[1].split()[0]


async def test_wait_on_real_agents_and_a_stopped_one(mesh: Mesh) -> None:
    await _mesh_up(mesh, ("a", "b", "c"))
    rc, out, err = await mesh.cli("network", "update", "office", "--mtu", "1380", "--wait", "30")
    assert rc == 0 and out.startswith("updated network office: mtu 1380"), err
    assert err.startswith("converged in ") and ": 3 host(s) applied it" in err, err
    # Asked right away, not waited for: --wait returned only once it was so.
    assert [await mtu(mesh, name) for name in ("a", "b", "c")] == ["1380"] * 3

    await mesh.stop_agent("c")
    rc, out, err = await mesh.cli(
        "network", "update", "office", "--mtu", "1300", "--wait", "3", check=False
    )
    assert rc == 3, (out, err)
    assert out.startswith("updated network office: mtu 1300")
    (line,) = err.strip().splitlines()
    assert line.startswith("Error: not converged within 3 s: 1 of 3 host(s) have not applied it: c")
    assert "c (offline: no agent connected; applied #" in line
    assert [await mtu(mesh, name) for name in ("a", "b")] == ["1300"] * 2
    assert await mtu(mesh, "c") == "1380"  # its agent is gone: nothing changed it
    rc, out, err = await mesh.cli("status", "--wait", "2", check=False)
    assert rc == 3 and "c (offline" in err, err
