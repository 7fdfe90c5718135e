"""A real `Agent` (on the fake machine) against a real nats-server and control
plane: snapshot then deltas through JetStream, and a gap on its subject."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nacl.public import PrivateKey

from agent.daemon import Agent
from agent.fake import FakeBackend, FakeLink, FakeMachine
from agent.statedir import Identity, StateDir, private_key_b64, public_key_of
from controlplane.embedded import EmbeddedNats
from controlplane.publisher import JetStreamDesiredPublisher
from controlplane.service import ControlPlane
from events.desired import DesiredDelta, PeerConfig, desired_encoder
from tests.factories import public_key
from tests.netns import wait_until
from tests.test_controlplane import Admin, network_with_token


@pytest.fixture
async def setup(
    nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[tuple[ControlPlane, Admin, Agent, str]]:
    cp_nc = await nats.connect(nats_server.url)
    admin_nc = await nats.connect(nats_server.url)
    plane = ControlPlane(cp_nc, tmp_path / "cp", nats_server.url)
    await plane.start()
    admin = Admin(admin_nc)
    token = await network_with_token(admin)
    key = PrivateKey.generate()
    joined = await admin.ok(
        "join", token=token, public_key=public_key_of(key), name="me", endpoints=["192.0.2.1"]
    )
    machine = FakeMachine()
    agent = Agent(
        identity=Identity(host_id=joined["host_id"], name="me", server=nats_server.url),
        state=StateDir(tmp_path / "agent"),
        backend=FakeBackend("nm0", machine),
        link=FakeLink("nm0", machine),
        private_key=private_key_b64(key),
        public_key=public_key_of(key),
    )
    agent.state.ensure()
    loop = asyncio.create_task(agent.reconcile_forever())
    try:
        await agent.connect_forever()
        yield plane, admin, agent, token
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await agent.close()
        assert await plane.stop() == []
        await cp_nc.close()
        await admin_nc.close()


def device_peers(agent: Agent) -> set[str]:
    assert isinstance(agent.backend, FakeBackend)
    device = agent.backend.machine.devices.get("nm0")
    return set(device.peers) if device else set()


async def test_agent_follows_deltas_and_survives_a_gap(
    setup: tuple[ControlPlane, Admin, Agent, str],
) -> None:
    plane, admin, agent, token = setup
    await admin.ok("join", token=token, public_key=public_key(2), name="two")
    await wait_until(lambda: device_peers(agent) == {public_key(2)}, message="first peer")
    before = agent.feed.revision

    # A delta on the subject that chains to nothing (as if one were lost): the
    # agent skips it, re-reads the subject once, and keeps the right state.
    bogus = DesiredDelta(
        host_id=agent.identity.host_id,
        revision=before + 1000,
        base=before + 999,
        upsert=(PeerConfig(public_key=public_key(9), allowed_ips=("10.10.0.9/32",)),),
    )
    await JetStreamDesiredPublisher(admin.nc.jetstream()).publish(
        [(bogus, desired_encoder.encode(bogus))]
    )
    await wait_until(lambda: agent._resynced_for == bogus.revision, message="re-read")
    await wait_until(lambda: not agent.feed.resyncing and not agent.feed.behind)
    assert agent.feed.revision == before
    assert device_peers(agent) == {public_key(2)}

    # Later changes still arrive as deltas and apply.
    await admin.ok("join", token=token, public_key=public_key(3), name="three")
    await wait_until(
        lambda: device_peers(agent) == {public_key(2), public_key(3)}, message="second peer"
    )
    await admin.ok("node.remove", node="office/two")
    await wait_until(lambda: device_peers(agent) == {public_key(3)}, message="removal")
    assert plane.runner is not None and plane.runner.messages_published > 0
