"""`--wait` and `status --wait` from the command line, against a real control
plane (a real nats-server) and real agents (the agent's own code, reconciling
a fake machine): the CLI returns once the hosts a command changed have
applied it, and says how long it took; a stopped agent, or one whose passes
fail, makes it exit 3 after the timeout, naming the host and why."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from agent.daemon import Agent, enroll
from agent.fake import FakeBackend, FakeDns, FakeFirewall, FakeLink, FakeMachine
from agent.statedir import Identity, StateDir, private_key_b64, public_key_of
from controlplane.convergence import progress_of
from controlplane.embedded import EmbeddedNats
from events.tokens import parse_token
from tests.eventlog_scenario import control_plane
from tests.netns import wait_until
from tests.test_cli import netmesh
from tests.test_controlplane import Admin
from tests.test_policy_commands import POLICY


@dataclass
class Host:
    name: str
    agent: Agent
    machine: FakeMachine
    firewall: FakeFirewall
    loop: asyncio.Task[None] | None = None

    def mtu(self) -> int | None:
        device = self.machine.devices.get("nm0")
        return device.mtu if device else None

    async def stop(self) -> None:
        # Bounded: a stop that hangs fails here, saying so, not at the test's timeout.
        async with asyncio.timeout(30):
            if self.loop is not None:
                self.loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.loop
                self.loop = None
            await self.agent.close()


async def start_host(url: str, token: str, name: str, tmp_path: Path) -> Host:
    key = PrivateKey.generate()
    state = StateDir(tmp_path / name)
    state.ensure()
    _, joined = await enroll(
        token, url, name, public_key_of(key), ["192.0.2.1"], None, state.signing_key()
    )
    machine, firewall = FakeMachine(), FakeFirewall()
    agent = Agent(
        identity=Identity(
            host_id=joined["host_id"],
            name=name,
            server=url,
            server_key=parse_token(token).server_key,
        ),
        state=state,
        backend=FakeBackend("nm0", machine),
        link=FakeLink("nm0", machine),
        firewall=firewall,
        dns=FakeDns(),
        private_key=private_key_b64(key),
        public_key=public_key_of(key),
    )
    host = Host(name, agent, machine, firewall, asyncio.create_task(agent.reconcile_forever()))
    await agent.connect_forever()
    return host


@pytest.fixture
async def mesh(
    nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[tuple[str, Admin, dict[str, Host]]]:
    async with control_plane(nats_server.url, tmp_path / "cp") as (_, admin):
        await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
        token = (await admin.ok("key.create", network="office", uses=3))["token"]
        hosts: dict[str, Host] = {}
        try:
            for name in ("web1", "db1", "ops1"):
                hosts[name] = await start_host(nats_server.url, token, name, tmp_path)
            await wait_until(lambda: settled(admin, hosts), message="all in sync", timeout=20)
            yield nats_server.url, admin, hosts
        finally:
            for host in hosts.values():
                await host.stop()


async def settled(admin: Admin, hosts: dict[str, Host]) -> bool:
    """Every agent has applied its desired revision and the control plane has
    its report of that (what the CLI says a host applied is the report's: a
    test reading an agent's revision before its last report landed raced)."""
    rows = {r["name"]: r for r in await admin.query("status")}
    return all(
        n in rows
        and rows[n]["state"] == "in sync"
        and rows[n]["applied_revision"] == rows[n]["desired_revision"] == applied(h)
        for n, h in hosts.items()
    )


def applied(host: Host) -> int:
    return host.agent.applied.revision if host.agent.applied else 0


async def test_wait_returns_once_every_changed_host_applied_it(
    mesh: tuple[str, Admin, dict[str, Host]],
) -> None:
    url, admin, hosts = mesh
    rc, out, err = await netmesh(url, "network", "update", "office", "--mtu", "1300", "--wait")
    assert rc == 0, err
    assert out.startswith("updated network office: mtu 1300")
    assert err.startswith("converged in ") and err.rstrip().endswith(": 3 host(s) applied it")
    seq = await admin.last_seq()
    # Returned only once they had: every agent is at the command's revision.
    assert {n: (applied(h), h.mtu()) for n, h in hosts.items()} == {n: (seq, 1300) for n in hosts}
    # A command that changes no host's desired state has nothing to wait for;
    # stdout is still only what the command prints (a token).
    rc, out, err = await netmesh(url, "key", "create", "--network", "office", "--wait", "5")
    assert rc == 0 and out.startswith("nmt1.") and len(out.splitlines()) == 1
    assert err.strip() == "nothing to wait for: no host's desired state changed"
    rc, out, err = await netmesh(url, "network", "update", "office", "--mtu", "1300", "--wait")
    assert (rc, err.strip()) == (0, "nothing to wait for: the command changed nothing")
    # Removing a node: its host (told to let go) and its two peers.
    rc, out, err = await netmesh(url, "node", "remove", "office/ops1", "--wait", "20")
    assert rc == 0 and ": 3 host(s) applied it" in err, err
    rc, out, err = await netmesh(url, "status", "--wait", "10")
    assert rc == 0 and ": 2 host(s) applied it" in err, err
    assert "in sync" in out


async def test_a_stopped_agent_is_named_and_the_exit_is_3(
    mesh: tuple[str, Admin, dict[str, Host]],
) -> None:
    url, admin, hosts = mesh
    before = applied(hosts["ops1"])
    await hosts["ops1"].stop()
    rc, out, err = await netmesh(url, "network", "update", "office", "--mtu", "1280", "--wait", "3")
    seq = await admin.last_seq()
    assert rc == 3, err
    assert out.startswith("updated network office: mtu 1280")  # applied, and said so
    lines = err.strip().splitlines()
    assert lines == [
        "Error: not converged within 3 s: 1 of 3 host(s) have not applied it: "
        f"ops1 (offline: no agent connected; applied #{before}, wants #{seq})"
    ]
    assert applied(hosts["web1"]) == applied(hosts["db1"]) == seq  # the others did
    rc, out, err = await netmesh(url, "status", "--wait", "1")
    assert rc == 3 and "ops1 (offline" in err and "web1" not in err
    assert "behind" in out  # the table is printed too


async def test_an_agent_whose_passes_fail_is_named_with_its_error(
    mesh: tuple[str, Admin, dict[str, Host]], tmp_path: Path
) -> None:
    url, admin, hosts = mesh
    hosts["db1"].firewall.fail = "nft: permission denied"
    await admin.ok("node.tag", node="office/web1", tags=["web"])
    await admin.ok("node.tag", node="office/db1", tags=["db"])
    policy = tmp_path / "policy.json5"
    policy.write_text(POLICY)
    rc, out, err = await netmesh(url, "policy", "set", "office", str(policy), "--wait", "3")
    assert out.startswith("set the policy of network office")
    assert rc == 3, err
    (line,) = [e for e in err.splitlines() if e.startswith("Error:")]  # (and the policy's warnings)
    assert line.startswith("Error: not converged within 3 s: 1 of 3 host(s) have not applied it")
    assert "db1 (error: firewall: " in line and "nft: permission denied" in line
    hosts["db1"].firewall.fail = None  # fixed: the next change reaches all three
    rc, _, err = await netmesh(url, "network", "update", "office", "--keepalive", "20", "--wait")
    assert rc == 0 and ": 3 host(s) applied it" in err, err
    rc, _, err = await netmesh(url, "status", "--wait", "5")
    assert rc == 0 and "converged in" in err, err


def test_where_a_host_stands() -> None:
    report = {"revision": 7, "error": None}
    assert progress_of("h", "a", [], 7, report, connected=True).state == "applied"
    assert progress_of("h", "a", [], 7, report, connected=False).state == "applied"
    late = progress_of("h", "a", [], 9, report, connected=True)
    assert (late.state, late.why) == ("behind", "applied #7, wants #9")
    gone = progress_of("h", "a", [], 9, None, connected=False)
    assert (gone.state, gone.why) == ("offline", "no agent connected; never reported")
    failing = progress_of("h", "a", [], 9, {"revision": 7, "error": "peers: boom"}, True)
    assert (failing.state, failing.why, str(failing)) == (
        "error",
        "peers: boom",
        "a (error: peers: boom)",
    )
