"""End to end: the agent as a daemon that keeps tunnels up. Real `netmesh server`
and `netmesh agent up` (wireguard-go) in network namespaces (tests/meshnet.py).

- drift (a peer, an address, the whole interface changed behind the agent's back)
  is logged and repaired within about one resync interval;
- with the server down the overlay keeps working, an agent restarts from its
  cache without touching the interface, and after the server returns changes
  flow again;
- a ping running through joins, removals and agent restarts loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import json
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.meshnet import IFACE, NETMESH, Mesh, mesh_fixture  # noqa: F401
from tests.netns import Host, ping, testnet_fixture, wait_until  # noqa: F401

pytestmark = pytest.mark.netns

RESYNC = 1.0  # --resync-interval: the agent re-checks the machine every 0.8-1.2 s
AGENT_ARGS = ("--resync-interval", str(RESYNC))
# One resync interval (with its +20% jitter), the pass itself, and the polling.
REPAIR_WITHIN = RESYNC * 1.2 + 1.5

_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")
_REPLY = re.compile(r"bytes from [^:]+: icmp_seq=(\d+)")


# -- helpers -------------------------------------------------------------------


async def _mesh_up(mesh: Mesh, names: tuple[str, ...]) -> tuple[str, dict[str, dict[str, Any]]]:
    """Server, network `office`, agents `names` joined and in sync, pinging each
    other. Returns (token, nodes by name)."""
    await mesh.start_server()
    await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
    token = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
    for name in names:
        await mesh.start_agent(name, token, AGENT_ARGS)
    await wait_until(
        lambda: _in_sync(mesh, names), timeout=60, interval=0.3, message="agents in sync"
    )
    nodes = {n["name"]: n for n in await mesh.cli_json("node", "list")}
    for src, dst in itertools.permutations(names, 2):
        assert await wait_until(
            functools.partial(ping, mesh.hosts[src], nodes[dst]["address"]),
            timeout=20,
            message=f"ping {src} -> {dst}",
        )
    return token, nodes


async def _in_sync(mesh: Mesh, names: tuple[str, ...]) -> bool:
    rows = {r["name"]: r for r in await mesh.cli_json("status")}
    return all(name in rows and rows[name]["state"] == "in sync" for name in names)


async def _wait_log(
    mesh: Mesh,
    agent: str,
    since: int,
    match: Callable[[dict[str, Any]], bool],
    *,
    timeout: float,
    message: str,
) -> dict[str, Any]:
    """The first entry of `agent-<agent>.log` after the first `since` entries that
    `match`es, waiting for it."""

    def find() -> dict[str, Any] | None:
        return next((e for e in mesh.log_entries(f"agent-{agent}")[since:] if match(e)), None)

    try:
        entry = await wait_until(find, timeout=timeout, interval=0.1, message=message)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; log:\n{mesh.log(f'agent-{agent}')}") from None
    assert entry is not None
    return entry


def _log_size(mesh: Mesh, agent: str) -> int:
    return len(mesh.log_entries(f"agent-{agent}"))


def _event(name: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items())


async def _addresses(host: Host) -> set[str]:
    result = await host.run("ip", "-j", "addr", "show", "dev", IFACE, check=False)
    if result.returncode != 0:
        return set()
    return {
        f"{a['local']}/{a['prefixlen']}"
        for link in json.loads(result.stdout)
        for a in link.get("addr_info", [])
        if a.get("scope") == "global"
    }


async def _peers(mesh: Mesh, name: str) -> set[str]:
    """Public keys of the peers of `name`'s interface (empty if it is gone)."""
    agent = mesh.agents[name]
    result = await mesh.hosts[name].run("wg", "show", IFACE, "peers", beside=agent.pid, check=False)
    return set(result.stdout.split()) if result.returncode == 0 else set()


@dataclass(frozen=True)
class PingStats:
    transmitted: int
    received: int
    output: str

    @property
    def lost(self) -> int:
        return self.transmitted - self.received


async def _ping_burst(host: Host, address: str, count: int = 15) -> PingStats:
    """`count` echo requests 0.2 s apart; each gets 1 s to answer."""
    result = await host.run(
        "ping", "-n", "-q", "-i", "0.2", "-W", "1", "-c", str(count), address, check=False
    )
    match = _SUMMARY.search(result.stdout)
    assert match, f"no ping summary: {result.stdout} {result.stderr}"
    return PingStats(int(match[1]), int(match[2]), result.stdout + result.stderr)


class Pinger:
    """`ping -i 0.05` from `host` to `address` in the background, line by line, with
    the time each line was read and the steps of the test (`mark`) in between."""

    def __init__(self, host: Host, address: str, interval: float = 0.05) -> None:
        self.host = host
        self.address = address
        self.interval = interval
        self.lines: list[tuple[float, str]] = []
        self.marks: list[tuple[float, str]] = []
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reply = asyncio.Event()
        self._t0 = 0.0

    async def start(self) -> None:
        self._t0 = time.monotonic()
        self._process = await self.host.spawn(
            "ping",
            "-n",
            "-O",
            "-i",
            str(self.interval),
            self.address,
            stdout=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self._reply.wait(), 10)

    def mark(self, step: str) -> None:
        self.marks.append((time.monotonic() - self._t0, step))

    async def stop(self) -> PingStats:
        """Stop right after a reply (so nothing is in flight); the summary."""
        assert self._process is not None and self._reader is not None
        self._reply.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reply.wait(), 5)
        self._process.send_signal(signal.SIGINT)
        await asyncio.wait_for(self._reader, 10)
        await asyncio.wait_for(self._process.wait(), 10)
        output = "\n".join(line for _, line in self.lines)
        match = _SUMMARY.search(output)
        assert match, f"no ping summary: {output[-2000:]}"
        return PingStats(int(match[1]), int(match[2]), output)

    def timeline(self) -> str:
        """Ping lines other than plain replies, and the marks, in time order."""
        events = [(t, f"ping: {line}") for t, line in self.lines if not _REPLY.search(line)]
        events += [(t, f"test: {step}") for t, step in self.marks]
        return "\n".join(f"{t:7.2f}s {what}" for t, what in sorted(events))

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        while line := await self._process.stdout.readline():
            text = line.decode().rstrip()
            self.lines.append((time.monotonic() - self._t0, text))
            if _REPLY.search(text):
                self._reply.set()


async def _restart_agent(mesh: Mesh, name: str, *, connected: bool = True) -> int:
    """SIGTERM the agent of `name` and start it again from its state dir (no token).

    Checks that the interface stays (same device), that the new agent's first
    pass finds nothing to change, and (when `connected`) that it reconnects.
    Returns the number of log entries before the restart.
    """
    device = await mesh.device_id(name)
    assert device is not None
    since = _log_size(mesh, name)
    await mesh.stop_agent(name)
    assert await mesh.device_id(name) == device, "SIGTERM took the interface down"
    await mesh.start_agent(name, None, AGENT_ARGS)
    synced = await _wait_log(
        mesh, name, since, _event("in sync"), timeout=15, message=f"{name} in sync after restart"
    )
    # Nothing on the machine changes; only the DNS server, which lives in
    # the agent's process, serves again.
    entries = mesh.log_entries(f"agent-{name}")[since:]
    applied = [e for e in entries[: entries.index(synced)] if e.get("event") == "apply"]
    assert len(applied) == synced["ops"] == 1, mesh.log(f"agent-{name}")
    assert _serves_dns(applied[0]), applied
    if connected:
        await _wait_log(
            mesh, name, since, _event("connected"), timeout=15, message=f"{name} reconnects"
        )
    _assert_untouched(mesh, name, since)
    assert await mesh.device_id(name) == device, "the interface was recreated"
    return since


def _assert_untouched(mesh: Mesh, name: str, since: int) -> None:
    """No change made to `name`'s interface since the first `since` log entries
    (a restarted agent's DNS server serving again is no change: it lives in
    the agent's process)."""
    touched = [
        e
        for e in mesh.log_entries(f"agent-{name}")[since:]
        if e["event"] in ("apply", "drift repair") and not _serves_dns(e)
    ]
    assert not touched, f"{name}'s agent changed the interface: {touched}"


def _serves_dns(entry: dict[str, Any]) -> bool:
    return entry.get("section") == "dns" and str(entry.get("op", "")).startswith("serve DNS on ")


async def _has_peer(mesh: Mesh, name: str, key: str) -> bool:
    return key in await _peers(mesh, name)


async def _has_addresses(host: Host, addresses: set[str]) -> bool:
    return await _addresses(host) == addresses


async def _lacks_peer(mesh: Mesh, name: str, key: str) -> bool:
    return key not in await _peers(mesh, name)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


async def _agent_status(mesh: Mesh, name: str) -> dict[str, Any]:
    """`netmesh agent status --json` on host `name`, next to its agent."""
    result = await mesh.hosts[name].run(
        NETMESH,
        "agent",
        "status",
        "--state-dir",
        str(mesh.tmp / name),
        "--interface",
        IFACE,
        "--json",
        beside=mesh.agents[name].pid,
    )
    status: dict[str, Any] = json.loads(result.stdout)
    return status


async def _agent_connected(mesh: Mesh, name: str) -> bool:
    return bool((await _agent_status(mesh, name))["agent"]["connected"])


async def _wait_passes(mesh: Mesh, name: str, count: int) -> None:
    """Until `name`'s agent has made `count` more passes (each reports)."""
    seen = [await _reported_at(mesh, name)]

    async def passes() -> bool:
        at = await _reported_at(mesh, name)
        if at != seen[-1]:
            seen.append(at)
        return len(seen) > count

    await wait_until(
        passes, timeout=2 * count * RESYNC + 3, interval=0.2, message=f"{count} passes of {name}"
    )


async def _reported_at(mesh: Mesh, name: str) -> float | None:
    rows = {r["name"]: r for r in await mesh.cli_json("status")}
    at = rows[name]["reported_at"]
    return float(at) if at is not None else None


# -- tests ---------------------------------------------------------------------


async def test_drift_is_logged_and_repaired(mesh: Mesh) -> None:
    _, nodes = await _mesh_up(mesh, ("a", "b"))
    a, b = mesh.hosts["a"], mesh.hosts["b"]
    b_key = nodes["b"]["public_key"]
    desired_addresses = await _addresses(a)
    assert len(desired_addresses) == 1
    (a_address,) = desired_addresses
    assert ipaddress.ip_interface(a_address).ip == ipaddress.ip_address(nodes["a"]["address"])

    # (a) A peer removed by hand comes back, endpoint included: a reaches b again.
    since = _log_size(mesh, "a")
    await a.run("wg", "set", IFACE, "peer", b_key, "remove", beside=mesh.agents["a"].pid)
    started = time.monotonic()
    await wait_until(
        lambda: _has_peer(mesh, "a", b_key), timeout=REPAIR_WITHIN, interval=0.1, message="peer"
    )
    peer_repair = time.monotonic() - started
    entry = await _wait_log(
        mesh,
        "a",
        since,
        lambda e: e.get("event") == "drift repair" and b_key in e.get("op", ""),
        timeout=2,
        message="peer drift logged",
    )
    assert entry["op"].startswith("add peer b "), entry
    assert f"endpoint {b.lan_address}:51820" in entry["op"], entry
    assert await wait_until(lambda: ping(a, nodes["b"]["address"]), timeout=10, message="a->b")

    # (b) An address deleted with `ip addr del` comes back (and its subnet route).
    since = _log_size(mesh, "a")
    await a.run("ip", "addr", "del", a_address, "dev", IFACE)
    started = time.monotonic()
    await wait_until(
        lambda: _has_addresses(a, desired_addresses),
        timeout=REPAIR_WITHIN,
        interval=0.1,
        message="address back",
    )
    address_repair = time.monotonic() - started
    await _wait_log(
        mesh,
        "a",
        since,
        _event("drift repair", op=f"add address {a_address}"),
        timeout=2,
        message="address drift logged",
    )
    assert await wait_until(lambda: ping(a, nodes["b"]["address"]), timeout=10, message="a->b")

    # (c) The whole interface deleted: recreated (a new device) with its key,
    # port, address and peers; pings work both ways again.
    old_device = await mesh.device_id("a")
    assert old_device is not None
    since = _log_size(mesh, "a")
    await a.run("ip", "link", "del", IFACE)
    started = time.monotonic()

    async def recreated() -> bool:
        device = await mesh.device_id("a")
        return (
            device not in (None, old_device)
            and await _has_addresses(a, desired_addresses)
            and b_key in await _peers(mesh, "a")
        )

    await wait_until(recreated, timeout=REPAIR_WITHIN + 3, interval=0.1, message="recreated")
    interface_repair = time.monotonic() - started
    ops = [e["op"] for e in mesh.log_entries("agent-a")[since:] if e["event"] == "drift repair"]
    assert "create interface" in ops, mesh.log("agent-a")
    assert f"add address {a_address}" in ops, ops
    dump = (await mesh.wg("a", "dump")).splitlines()[0].split("\t")
    # The agent's log tail says what happened if the device is not the one it set up.
    assert dump[1] == nodes["a"]["public_key"] and dump[2] == "51820", (
        dump,
        mesh.log("agent-a")[-3000:],
    )
    started = time.monotonic()
    assert await wait_until(lambda: ping(a, nodes["b"]["address"]), timeout=10, message="a->b")
    assert await wait_until(lambda: ping(b, nodes["a"]["address"]), timeout=10, message="b->a")
    reconnect = time.monotonic() - started
    print(
        f"repaired: peer {peer_repair:.2f}s, address {address_repair:.2f}s, "
        f"interface {interface_repair:.2f}s (pings back {reconnect:.2f}s later)"
    )

    # Repaired means quiet: the next passes (each reports) find nothing to do.
    since = _log_size(mesh, "a")
    await _wait_passes(mesh, "a", 2)
    _assert_untouched(mesh, "a", since)


async def test_overlay_survives_the_server_and_agent_restarts_offline(mesh: Mesh) -> None:
    _, nodes = await _mesh_up(mesh, ("a", "b", "c"))
    a, b, c = mesh.hosts["a"], mesh.hosts["b"], mesh.hosts["c"]
    address = {name: n["address"] for name, n in nodes.items()}
    since = {name: _log_size(mesh, name) for name in ("a", "b", "c")}

    # The server stops (its nats-server with it): the overlay does not notice.
    await mesh.stop_server()
    assert mesh.cp is not None
    assert not [p for p in await mesh.cp.pids() if not _zombie(p)], "server left processes"
    for name in ("a", "b", "c"):
        await _wait_log(
            mesh,
            name,
            since[name],
            lambda e: str(e.get("event")).startswith("disconnected"),
            timeout=10,
            message=f"{name} sees the server go",
        )
    bursts = await asyncio.gather(
        _ping_burst(a, address["b"]),
        _ping_burst(b, address["c"]),
        _ping_burst(c, address["a"]),
    )
    for stats in bursts:
        assert stats.transmitted == 15 and stats.lost == 0, stats.output

    # a restarts with the server down: from its cache, touching nothing.
    cached = mesh.log_entries("agent-a")
    applied = [e["revision"] for e in cached if e["event"] == "in sync"][-1]
    restart = await _restart_agent(mesh, "a", connected=False)
    running = await _wait_log(
        mesh, "a", restart, _event("agent running"), timeout=10, message="a running"
    )
    assert running["cached_revision"] == applied, running
    # What an operator on the machine sees: running, not connected, all applied.
    local = await _agent_status(mesh, "a")
    assert local["agent"]["running"] and not local["agent"]["connected"], local
    assert local["revision"] == {"applied": applied, "desired": applied}, local
    assert local["interface"]["present"] and len(local["peers"]) == 2, local
    for stats in await asyncio.gather(_ping_burst(a, address["b"]), _ping_burst(b, address["a"])):
        assert stats.transmitted == 15 and stats.lost == 0, stats.output

    # The server returns: every agent reconnects, and a change made now reaches them.
    since = {name: _log_size(mesh, name) for name in ("a", "b", "c")}
    await mesh.start_server()
    started = time.monotonic()
    await _wait_log(mesh, "a", since["a"], _event("connected"), timeout=40, message="a back")
    for name in ("b", "c"):
        await _wait_log(
            mesh, name, since[name], _event("reconnected"), timeout=40, message=f"{name} back"
        )
    reconnected = time.monotonic() - started
    await wait_until(
        lambda: _agent_connected(mesh, "a"), timeout=10, interval=0.2, message="a connected"
    )
    await mesh.cli("node", "remove", "office/c")
    started = time.monotonic()
    c_key = nodes["c"]["public_key"]
    for name in ("a", "b"):
        await wait_until(
            functools.partial(_lacks_peer, mesh, name, c_key),
            timeout=15,
            interval=0.2,
            message=f"{name} drops c",
        )
    converged = time.monotonic() - started
    for name in ("a", "b"):
        await _wait_log(
            mesh,
            name,
            since[name],
            _event("apply", op=f"remove peer {c_key}"),
            timeout=5,
            message=f"{name} applies the removal",
        )
    await wait_until(
        lambda: _in_sync(mesh, ("a", "b")), timeout=15, interval=0.3, message="a, b in sync"
    )
    assert not await ping(a, address["c"], timeout=1)
    stats = await _ping_burst(a, address["b"], count=5)
    assert stats.lost == 0, stats.output
    print(f"agents reconnected {reconnected:.2f}s after the server; c dropped in {converged:.2f}s")


async def test_hosts_restarted_during_an_outage_come_back_from_their_cache(mesh: Mesh) -> None:
    """With the control plane down, b reboots (agent and wireguard-go killed,
    interface gone) and a's agent dies and comes back unable to see its
    wireguard-go's socket (/run cleaned): both start with their usual command
    line, token included, and their tunnel comes back; a host that joins once
    the control plane returns reaches them."""
    token, nodes = await _mesh_up(mesh, ("a", "b"))
    a, b = mesh.hosts["a"], mesh.hosts["b"]
    await mesh.stop_server()
    for name in ("a", "b"):
        process = mesh.agents.pop(name)
        process.kill()
        await process.wait()
    b_wireguard_go = await mesh.wireguard_go_pid("b")
    assert b_wireguard_go is not None
    os.kill(b_wireguard_go, signal.SIGKILL)
    await wait_until(lambda: _link_gone(b), timeout=10, interval=0.1, message="b's interface gone")
    assert not await ping(a, nodes["b"]["address"], timeout=1)

    since = {name: _log_size(mesh, name) for name in ("a", "b")}
    await mesh.start_agent("a", token, AGENT_ARGS, fresh_mount=True)
    await mesh.start_agent("b", token, AGENT_ARGS)
    for src, dst in (("a", "b"), ("b", "a")):
        assert await wait_until(
            functools.partial(ping, mesh.hosts[src], nodes[dst]["address"]),
            timeout=30,
            message=f"ping {src} -> {dst} with the control plane down",
        )
    for name in ("a", "b"):
        assert mesh.agents[name].returncode is None, mesh.log(f"agent-{name}")
        entries = mesh.log_entries(f"agent-{name}")[since[name] :]
        assert not [e for e in entries if e.get("level") == "error"], mesh.log(f"agent-{name}")
    replaced = [
        e
        for e in mesh.log_entries("agent-a")[since["a"] :]
        if str(e.get("event")).startswith("interface exists but its wireguard-go control socket")
    ]
    assert len(replaced) == 1, mesh.log("agent-a")

    # The control plane returns: a new host joins and reaches both.
    await mesh.start_server()
    await mesh.start_agent("c", token, AGENT_ARGS)
    for dst in ("a", "b"):
        assert await wait_until(
            functools.partial(ping, mesh.hosts["c"], nodes[dst]["address"]),
            timeout=40,
            message=f"ping c -> {dst} after the control plane returned",
        )


async def _link_gone(host: Host) -> bool:
    return (await host.run("ip", "link", "show", IFACE, check=False)).returncode != 0


async def test_no_ping_lost_through_joins_removals_and_agent_restarts(mesh: Mesh) -> None:
    token, nodes = await _mesh_up(mesh, ("a", "b"))
    a, b = mesh.hosts["a"], mesh.hosts["b"]
    pingers = [Pinger(a, nodes["b"]["address"]), Pinger(b, nodes["a"]["address"])]
    for pinger in pingers:
        await pinger.start()

    def mark(step: str) -> None:
        for pinger in pingers:
            pinger.mark(step)

    mark("c joins")
    await mesh.start_agent("c", token, AGENT_ARGS)
    await wait_until(
        lambda: _in_sync(mesh, ("a", "b", "c")), timeout=30, interval=0.3, message="c in sync"
    )
    c_node = next(n for n in await mesh.cli_json("node", "list") if n["name"] == "c")
    for name in ("a", "b"):
        await wait_until(
            functools.partial(_has_peer, mesh, name, c_node["public_key"]),
            timeout=10,
            interval=0.2,
            message=f"{name} has c",
        )
        assert await wait_until(
            functools.partial(ping, mesh.hosts[name], c_node["address"]),
            timeout=10,
            message=f"{name} -> c",
        )

    mark("c removed")
    await mesh.cli("node", "remove", "office/c")
    for name in ("a", "b"):
        await wait_until(
            functools.partial(_lacks_peer, mesh, name, c_node["public_key"]),
            timeout=10,
            interval=0.2,
            message=f"{name} drops c",
        )
    await wait_until(
        lambda: _in_sync(mesh, ("a", "b")), timeout=15, interval=0.3, message="a, b in sync"
    )

    for name in ("a", "b"):
        mark(f"restart agent {name}")
        since = await _restart_agent(mesh, name)
        mark(f"agent {name} back")
        await _wait_passes(mesh, name, 2)  # its periodic passes leave the tunnel alone too
        _assert_untouched(mesh, name, since)
        mark(f"agent {name}: 2 more passes")
    await wait_until(
        lambda: _in_sync(mesh, ("a", "b")), timeout=15, interval=0.3, message="in sync at the end"
    )

    mark("stop")
    for pinger in pingers:
        stats = await pinger.stop()
        assert stats.transmitted >= 50, stats.output
        assert stats.lost == 0, (
            f"{pinger.host.name} -> {pinger.address}: {stats.lost} of {stats.transmitted} "
            f"lost\n{pinger.timeline()}"
        )
        print(f"{pinger.host.name} -> {pinger.address}: {stats.transmitted} sent, 0 lost")


async def test_agent_leave_and_down(mesh: Mesh) -> None:
    """`agent leave` with the agent stopped: the node is gone from the network,
    the peers drop it, and its interface is removed; `agent down` refuses while
    an agent runs and is a no-op when the interface is gone."""
    await mesh.start_server()
    await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
    token = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
    for name in ("a", "b"):
        await mesh.start_agent(name, token)
    await wait_until(mesh.all_in_sync, timeout=60, interval=0.3, message="in sync")
    b_key = {n["name"]: n for n in await mesh.cli_json("node", "list")}["b"]["public_key"]
    host_b = mesh.hosts["b"]
    state_b = str(mesh.tmp / "b")

    refused = await host_b.run(
        NETMESH,
        "agent",
        "down",
        "--state-dir",
        state_b,
        "--interface",
        IFACE,
        beside=mesh.agents["b"].pid,
        check=False,
    )
    assert refused.returncode == 1 and "the agent is running" in refused.stderr

    device = await mesh.device_id("b")
    await mesh.stop_agent("b")
    assert device is not None and await mesh.device_id("b") == device  # interface kept
    left = await host_b.run(
        *(NETMESH, "agent", "leave", "--state-dir", state_b, "--interface", IFACE),
        beside=await mesh.wireguard_go_pid("b"),
    )
    assert "left office" in left.stdout and f"removed {IFACE}" in left.stdout
    assert [n["name"] for n in await mesh.cli_json("node", "list")] == ["a"]
    await wait_until(functools.partial(_lacks, mesh, "a", b_key), timeout=30, message="a drops b")
    gone = await host_b.run("ip", "link", "show", IFACE, check=False)
    assert gone.returncode != 0
    again = await host_b.run(NETMESH, "agent", "down", "--state-dir", state_b, "--interface", IFACE)
    assert f"{IFACE} was not there" in again.stdout


async def _lacks(mesh: Mesh, name: str, public_key: str) -> bool:
    return public_key not in await mesh.wg(name, "peers")


async def test_endpoint_change_reaches_peers_without_admin_action(mesh: Mesh) -> None:
    """Host b moves to a new address: its agent reports it, the control plane
    records it, and a's WireGuard peer for b points at the new endpoint."""
    await mesh.start_server()
    await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
    token = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
    for name in ("a", "b"):
        await mesh.start_agent(name, token)
    await wait_until(mesh.all_in_sync, timeout=60, interval=0.3, message="in sync")
    nodes = {n["name"]: n for n in await mesh.cli_json("node", "list")}
    b_key = nodes["b"]["public_key"]
    host_b = mesh.hosts["b"]
    # b moves: its old LAN address goes away, a new one comes. (Deleting a
    # primary address takes its secondaries with it, so delete first.)
    moved = "192.0.2.99"
    await host_b.run("ip", "addr", "del", f"{host_b.lan_address}/24", "dev", "eth0")
    await host_b.run("ip", "addr", "add", f"{moved}/24", "dev", "eth0")
    await mesh.stop_agent("b")
    await mesh.start_agent("b", None, endpoint=moved)

    async def a_points_at_new_endpoint() -> bool:
        return f"{b_key}\t{moved}:51820" in await mesh.wg("a", "endpoints")

    await wait_until(a_points_at_new_endpoint, timeout=30, message="a learns b's new endpoint")
    node = await mesh.cli_json("node", "show", "office/b")
    assert node["endpoint"] == f"{moved}:51820"
    # The first packets to the new endpoint start a fresh handshake: traffic
    # resumes within a few seconds, not necessarily on the very first ping.
    await wait_until(
        functools.partial(ping, mesh.hosts["a"], nodes["b"]["address"]),
        timeout=15,
        message="a reaches b at its new address",
    )
    events = (await mesh.cli("events", "log", "--json"))[1]
    assert "host.endpoint_observed" in events


async def test_key_rotation_switches_peers_in_place(mesh: Mesh) -> None:
    """`agent rotate-key` on b while both agents run: a new key made on b, the
    control plane records it, a's peer entry switches to it (the old key is
    gone), b's device uses it, and traffic flows again both ways."""
    _, nodes = await _mesh_up(mesh, ("a", "b"))
    b = mesh.hosts["b"]
    old_key = nodes["b"]["public_key"]
    rotated = await b.run(
        NETMESH,
        "agent",
        "rotate-key",
        "--state-dir",
        str(mesh.tmp / "b"),
        beside=mesh.agents["b"].pid,
    )
    new_key = rotated.stdout.strip().rpartition(" ")[2]
    assert new_key and new_key != old_key, rotated.stdout
    listed = {n["name"]: n for n in await mesh.cli_json("node", "list")}
    assert listed["b"]["public_key"] == new_key
    await _switched(mesh, nodes, old_key, new_key)
    private = (mesh.tmp / "b" / "private.key").read_text()
    assert private.strip() and not (mesh.tmp / "b" / "private.key.next").exists()

    # The admin asks instead (`node rotate-key`): b's agent makes the key itself.
    await mesh.cli("node", "rotate-key", "office/b")

    async def b_listed_with_another_key() -> str | None:
        listed = {n["name"]: n for n in await mesh.cli_json("node", "list")}
        key = listed["b"]["public_key"]
        return key if key not in (old_key, new_key) else None

    third = await wait_until(b_listed_with_another_key, timeout=REPAIR_WITHIN + 10, message="3rd")
    assert third is not None
    await _switched(mesh, nodes, new_key, third)


async def _switched(mesh: Mesh, nodes: dict[str, dict[str, Any]], old: str, new: str) -> None:
    """b went from key `old` to `new`: a's peer entry switched, b's device uses
    it, and traffic flows both ways again."""
    a, b = mesh.hosts["a"], mesh.hosts["b"]
    await wait_until(
        lambda: _has_peer(mesh, "a", new), timeout=REPAIR_WITHIN + 5, message="a has b's new key"
    )
    assert await _lacks(mesh, "a", old)

    async def b_uses_new_key() -> bool:
        return (await mesh.wg("b", "public-key")).strip() == new

    await wait_until(b_uses_new_key, timeout=REPAIR_WITHIN + 5, message="b's device switched")
    assert await wait_until(lambda: ping(a, nodes["b"]["address"]), timeout=15, message="a->b")
    assert await wait_until(lambda: ping(b, nodes["a"]["address"]), timeout=15, message="b->a")


async def test_network_update_reaches_every_member_in_place(mesh: Mesh) -> None:
    """`network update` changes MTU and keepalive on every member's interface
    while traffic flows: nothing is recreated, no ping is lost."""
    _, nodes = await _mesh_up(mesh, ("a", "b"))
    wireguard_go = {name: await mesh.wireguard_go_pid(name) for name in ("a", "b")}
    burst = asyncio.create_task(_ping_burst(mesh.hosts["a"], nodes["b"]["address"], count=25))
    await mesh.cli("network", "update", "office", "--mtu", "1380", "--keepalive", "7")

    async def updated(name: str) -> bool:
        link = (await mesh.hosts[name].run("ip", "link", "show", IFACE)).stdout
        keepalive = await mesh.wg(name, "persistent-keepalive")
        values = {line.split()[-1] for line in keepalive.splitlines()}
        return "mtu 1380" in link and values == {"7"}

    for name in ("a", "b"):
        await wait_until(
            functools.partial(updated, name), timeout=15, interval=0.2, message=f"{name} updated"
        )
        assert await mesh.wireguard_go_pid(name) == wireguard_go[name], "interface recreated"
    stats = await burst
    assert stats.lost == 0, stats.output
    shown = await mesh.cli_json("network", "show", "office")
    assert (shown["mtu"], shown["keepalive"]) == (1380, 7)
