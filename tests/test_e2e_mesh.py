"""End to end, real parts: `netmesh server` (embedded nats-server) and three
`netmesh agent up` with wireguard-go, each in its own network namespace on a
private LAN. The CLI drives it as an admin would."""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.netns import (
    Host,
    TestNet,
    ping,
    testnet_fixture,  # noqa: F401
    wait_until,
)

pytestmark = pytest.mark.netns

NETMESH = str(Path(sys.executable).parent / "netmesh")
IFACE = "nm0"


class Mesh:
    def __init__(self, net: TestNet, tmp: Path) -> None:
        self.net = net
        self.tmp = tmp
        self.cp: Host | None = None
        self.server: asyncio.subprocess.Process | None = None
        self.agents: dict[str, asyncio.subprocess.Process] = {}
        self.hosts: dict[str, Host] = {}

    async def start_server(self) -> None:
        assert self.cp is not None
        self.server = await self.cp.spawn(
            "sh",
            "-c",
            f'exec "$@" >>{self.tmp}/server.log 2>&1',
            "sh",
            NETMESH,
            "server",
            "--data-dir",
            str(self.tmp / "cp"),
            "--listen",
            "0.0.0.0:4222",
            "--advertise",
            f"nats://{self.cp.lan_address}:4222",
            "--log-format",
            "json",
        )
        await wait_until(self._server_answers, timeout=60, interval=0.2, message="server up")

    async def _server_answers(self) -> bool:
        assert self.server is not None and self.server.returncode is None, self.log("server")
        result = await self.cli("network", "list", check=False)
        return result[0] == 0

    async def stop_server(self) -> None:
        assert self.server is not None
        self.server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(self.server.wait(), 30) == 0, self.log("server")

    async def cli(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        assert self.cp is not None
        result = await self.cp.run(NETMESH, "--server", "nats://127.0.0.1:4222", *args, check=False)
        if check:
            assert result.returncode == 0, f"{args}: {result.stderr}"
        return result.returncode, result.stdout, result.stderr

    async def cli_json(self, *args: str) -> Any:
        return json.loads((await self.cli(*args, "--json"))[1])

    async def start_agent(self, name: str, token: str | None) -> None:
        host = self.hosts[name]
        args = [
            NETMESH,
            "agent",
            "up",
            "--name",
            name,
            "--state-dir",
            str(self.tmp / name),
            "--endpoint",
            host.lan_address,
            "--backend",
            "userspace",
            "--interface",
            IFACE,
            "--log-format",
            "json",
        ]
        if token:
            args += ["--token", token]
        self.agents[name] = await host.spawn(
            "sh", "-c", f'exec "$@" >>{self.tmp}/agent-{name}.log 2>&1', "sh", *args
        )

    async def stop_agent(self, name: str) -> None:
        process = self.agents.pop(name)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0, self.log(f"agent-{name}")

    async def wg(self, name: str, *args: str) -> str:
        agent = self.agents[name]
        result = await self.hosts[name].run("wg", "show", IFACE, *args, beside=agent.pid)
        return result.stdout

    async def all_in_sync(self) -> list[dict[str, Any]] | None:
        rows = await self.cli_json("status")
        if rows and all(r["state"] == "in sync" for r in rows):
            return list(rows)
        return None

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text()[-4000:] if path.exists() else "(no log)"


@pytest.fixture
async def mesh(testnet: TestNet, tmp_path: Path) -> Mesh:
    m = Mesh(testnet, tmp_path)
    m.cp = await testnet.add_host("cp")
    for name in ("a", "b", "c"):
        m.hosts[name] = await testnet.add_host(name)
    return m


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
