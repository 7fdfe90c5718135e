"""The agent's reconcile loop on a fake machine: the exact operations a series
of desired states produces (golden), drift repair, and failure handling."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from agent.backend import BackendError, PeerSpec
from agent.daemon import Agent
from agent.fake import FakeBackend, FakeDns, FakeFirewall, FakeLink, FakeMachine
from agent.statedir import Identity, StateDir, private_key_b64, public_key_of
from events.desired import DesiredDelta, DesiredState, PeerEntry, Sections
from events.feed import Outcome
from tests.desired_states import desired_state

KEY = PrivateKey(bytes(range(32)))
PEERS = {n: base64.b64encode(bytes([n]) * 32).decode() for n in range(1, 5)}


def peer(n: int, endpoint: str | None = None, allowed: str | None = None) -> tuple[str, PeerEntry]:
    return PEERS[n], PeerEntry(
        allowed_ips=(allowed or f"10.0.0.{n + 1}/32",),
        endpoint=endpoint or f"192.0.2.{n}:51820",
        persistent_keepalive=25,
        name=f"p{n}",
    )


def state(
    revision: int, *peers: tuple[str, PeerEntry], addresses: tuple[str, ...] = ("10.0.0.1/24",)
) -> DesiredState:
    return desired_state(host_id="h1", revision=revision, addresses=addresses, peers=peers)


def upsert(*peers: tuple[str, PeerEntry]) -> Sections:
    return Sections(peers=dict(peers))


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    machine = FakeMachine()
    return Agent(
        identity=Identity(host_id="h1", name="a", server="nats://127.0.0.1:1"),
        state=StateDir(tmp_path),
        backend=FakeBackend("nm0", machine),
        link=FakeLink("nm0", machine),
        firewall=FakeFirewall(),
        dns=FakeDns(),
        private_key=private_key_b64(KEY),
        public_key=public_key_of(KEY),
    )


def machine_of(agent: Agent) -> FakeMachine:
    assert isinstance(agent.backend, FakeBackend)
    return agent.backend.machine


async def step(agent: Agent, desired: DesiredState) -> list[str]:
    machine = machine_of(agent)
    machine.ops.clear()
    assert agent.offer(desired) is Outcome.TAKEN
    assert await agent.reconcile_once()
    return list(machine.ops)


async def test_golden_sequence(agent: Agent) -> None:
    p1, p2, p3 = PEERS[1][:8], PEERS[2][:8], PEERS[3][:8]
    assert await step(agent, state(3, peer(1), peer(2))) == [
        "create nm0",
        "set private_key",
        "set listen_port 51820",
        "link mtu 1420",
        "addr add 10.0.0.1/24",
        "link up",
        f"add peer {p1} allowed 10.0.0.2/32 endpoint 192.0.2.1:51820",
        f"add peer {p2} allowed 10.0.0.3/32 endpoint 192.0.2.2:51820",
    ]
    # A third host joins: one op, the others untouched.
    assert await step(agent, state(5, peer(1), peer(2), peer(3))) == [
        f"add peer {p3} allowed 10.0.0.4/32 endpoint 192.0.2.3:51820"
    ]
    # Its endpoint moves.
    assert await step(agent, state(6, peer(1), peer(2), peer(3, "198.51.100.3:51820"))) == [
        f"update peer {p3} allowed 10.0.0.4/32 endpoint 198.51.100.3:51820"
    ]
    # The host joins a second network: address added, nothing else.
    both = ("10.0.0.1/24", "10.9.0.1/24")
    assert await step(
        agent, state(8, peer(1), peer(2), peer(3, "198.51.100.3:51820"), addresses=both)
    ) == ["addr add 10.9.0.1/24"]
    # Host 2 leaves; the first network is left (address goes after nothing else).
    assert await step(
        agent, state(9, peer(1), peer(3, "198.51.100.3:51820"), addresses=("10.9.0.1/24",))
    ) == [
        "addr del 10.0.0.1/24",
        f"remove peer {p2}",
    ]
    # The same state again (a duplicate message) changes nothing.
    machine_of(agent).ops.clear()
    assert agent.offer(state(9, peer(1))) is Outcome.STALE
    assert await agent.reconcile_once()
    assert machine_of(agent).ops == []


async def test_stale_revision_is_ignored(agent: Agent) -> None:
    await step(agent, state(10, peer(1)))
    assert agent.offer(state(7, peer(2))) is Outcome.STALE
    assert agent.desired is not None and agent.desired.revision == 10


async def test_drift_is_repaired_on_the_next_pass(agent: Agent) -> None:
    await step(agent, state(3, peer(1), peer(2)))
    machine = machine_of(agent)
    device = machine.devices["nm0"]
    del device.peers[PEERS[2]]
    device.addresses.clear()
    machine.ops.clear()
    assert await agent.reconcile_once()
    assert machine.ops == [
        "addr add 10.0.0.1/24",
        f"add peer {PEERS[2][:8]} allowed 10.0.0.3/32 endpoint 192.0.2.2:51820",
    ]
    del machine.devices["nm0"]  # the whole interface
    machine.ops.clear()
    assert await agent.reconcile_once()
    assert machine.ops[0] == "create nm0" and len(machine.devices["nm0"].peers) == 2


async def test_a_failed_apply_is_reported_and_retried(agent: Agent) -> None:
    backend = agent.backend
    assert isinstance(backend, FakeBackend)
    real_configure = backend.configure
    failures = [BackendError("device busy")]

    async def flaky(**kwargs: object) -> None:
        if failures:
            raise failures.pop()
        await real_configure(**kwargs)  # type: ignore[arg-type]

    backend.configure = flaky  # type: ignore[method-assign]
    agent.offer(state(4, peer(1)))
    assert not await agent.reconcile_once()
    assert agent.applied is None  # the plan did not happen: nothing is believed
    status = StateDir(agent.state.path)
    assert "device busy" in (status.path / "status.json").read_text()
    assert await agent.reconcile_once()
    assert agent.applied is not None and agent.applied.revision == 4
    assert list(machine_of(agent).devices["nm0"].peers) == [PEERS[1]]


async def test_desired_state_survives_a_restart(agent: Agent, tmp_path: Path) -> None:
    await step(agent, state(3, peer(1)))
    again = Agent(
        identity=agent.identity,
        state=StateDir(tmp_path),
        backend=agent.backend,
        link=agent.link,
        firewall=agent.firewall,
        dns=agent.dns,
        private_key=private_key_b64(KEY),
        public_key=public_key_of(KEY),
    )
    assert again.desired is not None and again.desired.revision == 3
    machine_of(agent).ops.clear()
    assert await again.reconcile_once()
    # The interface survived: a restarted agent touches nothing.
    assert machine_of(agent).ops == []


def test_fake_upsert_keeps_endpoint_when_not_given() -> None:
    import asyncio

    backend = FakeBackend("nm0")
    asyncio.run(backend.create())
    asyncio.run(
        backend.configure(
            upsert_peers=(
                PeerSpec(public_key=PEERS[1], allowed_ips=("10.0.0.2/32",), endpoint="192.0.2.1:1"),
            )
        )
    )
    asyncio.run(
        backend.configure(
            upsert_peers=(PeerSpec(public_key=PEERS[1], allowed_ips=("10.0.0.9/32",)),)
        )
    )
    (p,) = asyncio.run(backend.read()).peers
    assert (p.endpoint, p.allowed_ips) == ("192.0.2.1:1", ("10.0.0.9/32",))


def test_reconnect_backoff_grows_with_jitter_and_is_capped() -> None:
    from types import SimpleNamespace

    from agent.session import CONNECT_BACKOFF_MAX, reconnect_backoff

    delays = [reconnect_backoff([SimpleNamespace(reconnects=n)], {})[1] for n in range(12)]
    assert all(0 < d <= CONNECT_BACKOFF_MAX for d in delays)
    assert delays[-1] >= CONNECT_BACKOFF_MAX / 2  # at the cap, jittered down at most by half
    assert delays[0] < delays[5]


async def test_deltas_apply_in_order_and_an_unfilled_gap_rereads_the_snapshot(agent: Agent) -> None:
    await step(agent, state(10, peer(1)))
    machine = machine_of(agent)
    machine.ops.clear()
    agent._wake.clear()
    added = DesiredDelta(host_id="h1", revision=12, base=10, upsert=upsert(peer(2)))
    # A burst: nothing is applied until the last pending message is read.
    assert agent.offer(added, pending=1) is Outcome.TAKEN
    assert agent.desired is not None and agent.desired.revision == 12
    assert not agent._wake.is_set()
    dropped = DesiredDelta(host_id="h1", revision=13, base=12, remove={"peers": (PEERS[1],)})
    assert agent.offer(dropped, pending=0) is Outcome.TAKEN
    assert agent._wake.is_set()
    assert await agent.reconcile_once()
    assert sorted(machine.ops) == [
        f"add peer {PEERS[2][:8]} allowed 10.0.0.3/32 endpoint 192.0.2.2:51820",
        f"remove peer {PEERS[1][:8]}",
    ]
    assert StateDir(agent.state.path).load_desired() == agent.desired
    # A delta that does not follow (another replica's chain, or a lost
    # message): skipped, and harmless if the next message fills the gap.
    machine.ops.clear()
    agent._wake.clear()
    jump = DesiredDelta(host_id="h1", revision=15, base=14, upsert=upsert(peer(1)))
    assert agent.offer(jump, pending=1) is Outcome.GAP
    assert agent.desired.revision == 13
    fill = DesiredDelta(host_id="h1", revision=15, base=13, upsert=upsert(peer(1)))
    assert agent.offer(fill, pending=0) is Outcome.TAKEN
    assert not agent.feed.behind and not agent.feed.resyncing
    assert agent.desired.revision == 15 and agent._wake.is_set()
    assert await agent.reconcile_once()
    machine.ops.clear()
    # A gap nothing fills: once everything pending is read, the subject is
    # re-read from its snapshot (older than what we hold, and taken anyway),
    # and the deltas after it bring the state forward.
    gap = DesiredDelta(host_id="h1", revision=20, base=18, remove={"peers": (PEERS[2],)})
    assert agent.offer(gap, pending=0) is Outcome.GAP
    assert agent.feed.resyncing
    assert agent.offer(DesiredDelta(host_id="h1", revision=21, base=20)) is Outcome.STALE
    assert agent.offer(state(11, peer(1), peer(2)), pending=2) is Outcome.TAKEN
    assert agent.offer(DesiredDelta(host_id="h1", revision=18, base=11), pending=1) is Outcome.TAKEN
    assert agent.offer(gap, pending=0) is Outcome.TAKEN
    assert agent.desired.revision == 20 and not agent.feed.behind
    assert await agent.reconcile_once()
    assert sorted(machine.ops) == [f"remove peer {PEERS[2][:8]}"]
    # A chain that stays broken after a re-read is not re-read again in a loop.
    stuck = DesiredDelta(host_id="h1", revision=30, base=25)
    assert agent.offer(stuck) is Outcome.GAP and agent.feed.resyncing
    agent.feed.resyncing = False  # the re-read found the same subject
    assert agent.offer(stuck) is Outcome.GAP and not agent.feed.resyncing
    assert agent.desired.revision == 20 and not agent.feed.behind
    assert agent.offer(DesiredDelta(host_id="h1", revision=22, base=20)) is Outcome.TAKEN
