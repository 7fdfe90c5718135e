"""A netmesh deployment in network namespaces, for end-to-end tests: `netmesh
server` (embedded nats-server) in host `cp`, and `netmesh agent up` in hosts `a`,
`b`, `c` on a private LAN. The CLI drives it as an admin would.

The `mesh` fixture runs each test twice: with wireguard-go on every host
(`userspace`), and with kernel WireGuard on `a` and `c` beside wireguard-go on `b`
(`mixed`; `a` runs `--backend auto`, which must pick the kernel there, `c`
`--backend kernel`). `mixed` needs the wireguard kernel module: where it is missing
it is skipped, and tests/test_kernel_vm.py runs it inside a VM with a real kernel.

Use from a test module (both fixtures must be importable there):

    from tests.meshnet import Mesh, mesh_fixture  # noqa: F401  (the `mesh` fixture)
    from tests.netns import testnet_fixture  # noqa: F401  (the `testnet` it needs)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.kernel import kernel_wireguard_available
from tests.netns import TIME_SCALE, Host, TestNet, wait_until

NETMESH = str(Path(sys.executable).parent / "netmesh")
IFACE = "nm0"

# The `--backend` of each agent host, by name; a host not named runs wireguard-go.
BACKEND_MIXES: dict[str, Mapping[str, str]] = {
    "userspace": {},
    "mixed": {"a": "auto", "c": "kernel"},
}


class Mesh:
    def __init__(
        self,
        net: TestNet,
        tmp: Path,
        *,
        netmesh: str = NETMESH,
        backends: Mapping[str, str] | None = None,
    ) -> None:
        self.net = net
        self.tmp = tmp
        self.netmesh = netmesh  # the `netmesh` executable every process runs
        self.backends = dict(backends or {})
        self.cp: Host | None = None
        self.server: asyncio.subprocess.Process | None = None
        self.agents: dict[str, asyncio.subprocess.Process] = {}
        self.hosts: dict[str, Host] = {}

    async def start_server(self, *extra_args: str) -> None:
        assert self.cp is not None
        self.server = await self.cp.spawn(
            "sh",
            "-c",
            f'exec "$@" >>{self.tmp}/server.log 2>&1',
            "sh",
            self.netmesh,
            "server",
            "--data-dir",
            str(self.tmp / "cp"),
            "--listen",
            "0.0.0.0:4222",
            "--advertise",
            f"nats://{self.cp.lan_address}:4222",
            "--log-format",
            "json",
            *extra_args,
        )
        await wait_until(self._server_answers, timeout=60, interval=0.2, message="server up")

    async def _server_answers(self) -> bool:
        assert self.server is not None and self.server.returncode is None, self.log("server")
        result = await self.cli("network", "list", check=False)
        return result[0] == 0

    async def stop_server(self) -> None:
        assert self.server is not None
        self.server.send_signal(signal.SIGTERM)
        stopped = await asyncio.wait_for(self.server.wait(), 30 * TIME_SCALE)
        assert stopped == 0, self.log("server")

    async def cli(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        assert self.cp is not None
        result = await self.cp.run(
            self.netmesh,
            # Listening beyond loopback, the broker speaks only TLS.
            "--server",
            "tls://127.0.0.1:4222",
            "--admin-key",
            str(self.tmp / "cp" / "admin.key"),
            "--ca",
            str(self.tmp / "cp" / "tls" / "ca.pem"),
            *args,
            check=False,
        )
        if check:
            assert result.returncode == 0, f"{args}: {result.stderr}"
        return result.returncode, result.stdout, result.stderr

    async def cli_json(self, *args: str) -> Any:
        return json.loads((await self.cli(*args, "--json"))[1])

    async def start_agent(
        self,
        name: str,
        token: str | None,
        extra_args: Sequence[str] = (),
        endpoint: str | None = None,
        *,
        fresh_mount: bool = False,
        beside: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Start `netmesh agent up` in host `name` (`extra_args` go last).

        On a real machine every process sees the same /var/run/wireguard; here each
        spawn has a private one. So when a wireguard-go of an earlier agent still
        runs in the host, the agent starts beside it (sees its UAPI socket), as an
        agent restarted on a real machine would; unless `fresh_mount`: then it
        cannot see that one's socket (as after /run was cleaned). `beside=PID`
        starts it beside that process instead (e.g. the host's systemd-resolved),
        with `env` added to its environment.
        """
        host = self.hosts[name]
        args = [
            self.netmesh,
            "agent",
            "up",
            "--name",
            name,
            "--state-dir",
            str(self.tmp / name),
            "--endpoint",
            endpoint or host.lan_address,
            "--backend",
            self.backend(name),
            "--interface",
            IFACE,
            "--log-format",
            "json",
        ]
        if token:
            args += ["--token", token]
        args += extra_args
        self.agents[name] = await host.spawn(
            "sh",
            "-c",
            f'exec "$@" >>{self.tmp}/agent-{name}.log 2>&1',
            "sh",
            *args,
            beside=beside or (None if fresh_mount else await self.wireguard_go_pid(name)),
            env=None if env is None else dict(env),
        )

    async def stop_agent(self, name: str) -> None:
        process = self.agents.pop(name)
        process.send_signal(signal.SIGTERM)
        stopped = await asyncio.wait_for(process.wait(), 30 * TIME_SCALE)
        assert stopped == 0, self.log(f"agent-{name}")

    def backend(self, name: str) -> str:
        """The `--backend` host `name`'s agent runs with."""
        return self.backends.get(name, "userspace")

    async def device_id(self, name: str) -> int | None:
        """What identifies host `name`'s WireGuard device while it lives: its
        wireguard-go's pid (userspace) or its interface index (kernel, which `auto`
        must have picked: the mixed mesh runs only where the module is). None when
        there is no device; another value means it was recreated."""
        if self.backend(name) == "userspace":
            return await self.wireguard_go_pid(name)
        result = await self.hosts[name].run("ip", "-j", "-d", "link", "show", IFACE, check=False)
        if result.returncode != 0:
            return None
        (link,) = json.loads(result.stdout)
        kind = link.get("linkinfo", {}).get("info_kind")
        assert kind == "wireguard", f"{IFACE} on {name} is not kernel WireGuard: {kind}"
        index: int = link["ifindex"]
        return index

    async def wireguard_go_pid(self, name: str) -> int | None:
        """The wireguard-go serving IFACE in host `name`, if one runs (not a zombie)."""
        found = []
        for pid in await self.hosts[name].pids():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
                state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
                if argv[-2:] == [b"-f", IFACE.encode()] and state != "Z":
                    found.append(pid)
        assert len(found) <= 1, f"several wireguard-go for {IFACE} in {name}: {found}"
        return found[0] if found else None

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

    def log_entries(self, name: str) -> list[dict[str, Any]]:
        """The JSON lines of `<name>.log` (e.g. "agent-a"), oldest first; other lines
        (a traceback, a CLI error) are skipped."""
        path = self.tmp / f"{name}.log"
        entries = []
        for line in path.read_text().splitlines() if path.exists() else []:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries


@pytest.fixture(name="mesh", params=sorted(BACKEND_MIXES))
async def mesh_fixture(request: pytest.FixtureRequest, testnet: TestNet, tmp_path: Path) -> Mesh:
    backends = BACKEND_MIXES[request.param]
    if "kernel" in backends.values() and not await kernel_wireguard_available():
        pytest.skip("no wireguard kernel module here (tests/test_kernel_vm.py runs it in a VM)")
    m = Mesh(testnet, tmp_path, backends=backends)
    m.cp = await testnet.add_host("cp")
    for name in ("a", "b", "c"):
        m.hosts[name] = await testnet.add_host(name)
    return m
