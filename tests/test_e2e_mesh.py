"""End to end, real parts: `netmesh server` (embedded nats-server) and three
`netmesh agent up` with wireguard-go, each in its own network namespace on a
private LAN. The CLI drives it as an admin would."""

from __future__ import annotations

import functools
import itertools

import pytest

from tests.meshnet import Mesh, mesh_fixture  # noqa: F401
from tests.netns import (
    ping,
    testnet_fixture,  # noqa: F401
    wait_until,
)

pytestmark = pytest.mark.netns


async def test_three_hosts_mesh_remove_and_server_rebuild(mesh: Mesh) -> None:
    await mesh.start_server()
    await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
    token = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
    assert token.startswith("nmt1.")
    for name in mesh.hosts:
        await mesh.start_agent(name, token)
    await wait_until(mesh.all_in_sync, timeout=60, interval=0.3, message="three agents in sync")

    nodes = {n["name"]: n for n in await mesh.cli_json("node", "list")}
    assert set(nodes) == {"a", "b", "c"}
    overlay = {name: n["address"] for name, n in nodes.items()}
    assert len(set(overlay.values())) == 3
    for src, dst in itertools.permutations(mesh.hosts, 2):
        ok = await wait_until(
            functools.partial(ping, mesh.hosts[src], overlay[dst]),
            timeout=20,
            message=f"ping {src} -> {dst}",
        )
        assert ok

    # Remove c: a and b drop the peer, and c becomes unreachable over the overlay.
    c_key = nodes["c"]["public_key"]
    await mesh.cli("node", "remove", "office/c")
    for name in ("a", "b"):
        await wait_until(
            functools.partial(_lacks_peer, mesh, name, c_key),
            timeout=30,
            message=f"{name} drops c",
        )
    assert not await ping(mesh.hosts["a"], overlay["c"], timeout=1)
    assert await ping(mesh.hosts["a"], overlay["b"])
    # c got its last desired state (no peers) before the broker cut it off,
    # and is refused when it tries to come back.
    await wait_until(
        functools.partial(_lacks_peer, mesh, "c", nodes["a"]["public_key"]),
        timeout=30,
        message="c drops its peers",
    )
    await wait_until(
        lambda: any(
            e.get("event") == "the broker refuses this host; keeping the last desired state"
            for e in mesh.log_entries("agent-c")
        ),
        timeout=30,
        message="c disconnected and refused",
    )

    # Restart the server with its read model deleted: agents see nothing change.
    await wait_until(mesh.all_in_sync, timeout=30, interval=0.3, message="in sync after remove")
    before = {name: await mesh.wg(name, "dump") for name in ("a", "b")}
    revisions = {r["name"]: r["applied_revision"] for r in await mesh.cli_json("status")}
    await mesh.stop_server()
    (mesh.tmp / "cp" / "readmodel.sqlite3").unlink()
    await mesh.start_server()
    rows = await wait_until(mesh.all_in_sync, timeout=60, interval=0.3, message="in sync again")
    assert {r["name"]: r["applied_revision"] for r in rows} == revisions
    for name in ("a", "b"):
        assert _config(await mesh.wg(name, "dump")) == _config(before[name])
    assert await ping(mesh.hosts["a"], overlay["b"])

    # The agents are still connected after the restart: a new change reaches them.
    await mesh.cli("node", "remove", "office/b")
    await wait_until(
        lambda: _lacks_peer(mesh, "a", nodes["b"]["public_key"]),
        timeout=30,
        message="a drops b after the server restart",
    )


async def _lacks_peer(mesh: Mesh, name: str, public_key: str) -> bool:
    return public_key not in await mesh.wg(name, "peers")


def _config(dump: str) -> list[tuple[str, ...]]:
    """`wg show dump` without the counters and handshake times that move on their own."""
    lines = [line.split("\t") for line in dump.strip().splitlines()]
    interface, peers = lines[0], lines[1:]
    return [tuple(interface), *sorted((p[0], p[3], p[7]) for p in peers)]
