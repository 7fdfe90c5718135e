"""A real `Agent` (on the fake machine) against a real nats-server and control
plane: snapshot then deltas through JetStream, a gap on its subject, and
messages forged or replayed there by someone with access to the broker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from agent.daemon import Agent, enroll
from agent.fake import FakeBackend, FakeDns, FakeFirewall, FakeLink, FakeMachine
from agent.statedir import Identity, StateDir, private_key_b64, public_key_of
from controlplane.embedded import EmbeddedNats
from controlplane.publisher import JetStreamDesiredPublisher, read_desired
from controlplane.service import ControlPlane
from events.desired import DesiredDelta, PeerEntry, Sections, desired_encoder
from events.signing import SIGNATURE_HEADER, load_or_create, sign
from events.subjects import DESIRED_STREAM, desired_subject
from events.tokens import parse_token
from tests.factories import public_key
from tests.netns import wait_until
from tests.secretscan import assert_nowhere, haystacks
from tests.test_controlplane import Admin, network_with_token


@pytest.fixture
async def setup(
    nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[tuple[ControlPlane, Admin, Agent, str]]:
    cp_nc = await nats.connect(nats_server.url)
    admin_nc = await nats.connect(nats_server.url)
    plane = ControlPlane(cp_nc, tmp_path / "cp", nats_server.url)
    await plane.start()
    admin = Admin(admin_nc, load_or_create(tmp_path / "cp" / "admin.key"))
    token = await network_with_token(admin)
    key = PrivateKey.generate()
    state = StateDir(tmp_path / "agent")
    state.ensure()
    # Joined as `agent up` does: signed with the host key it registers.
    _, joined = await enroll(
        token, nats_server.url, "me", public_key_of(key), ["192.0.2.1"], None, state.signing_key()
    )
    machine = FakeMachine()
    agent = Agent(
        identity=Identity(
            host_id=joined["host_id"],
            name="me",
            server=nats_server.url,
            server_key=parse_token(token).server_key,  # pinned as at enrollment
        ),
        state=state,
        backend=FakeBackend("nm0", machine),
        link=FakeLink("nm0", machine),
        firewall=FakeFirewall(),
        dns=FakeDns(),
        private_key=private_key_b64(key),
        public_key=public_key_of(key),
    )
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

    # While the agent is away, two changes are published, and the first one is
    # then deleted from the stream: the subject no longer chains.
    assert agent.session.sub is not None
    await agent.session.sub.unsubscribe()
    agent.session.sub = None
    js = admin.nc.jetstream()
    publisher = JetStreamDesiredPublisher(admin.nc, plane.signing_key)
    host_id = agent.identity.host_id
    assert plane.runner is not None
    plane.runner._snapshot_size[host_id] = 10**9  # both changes stay deltas (no compaction)
    await admin.ok("join", token=token, public_key=public_key(3), name="three")
    await wait_until(lambda: _last_revision(plane, host_id) > agent.feed.revision)
    lost = await publisher.last(host_id)
    assert lost is not None
    await admin.ok("join", token=token, public_key=public_key(4), name="four")
    await wait_until(lambda: _last_revision(plane, host_id) > lost[0])
    await js.delete_msg(DESIRED_STREAM, lost[1])

    # Back: the delta after the hole does not chain; re-reading the subject
    # does not help; the agent asks for a snapshot and gets everything.
    await agent.subscribe()
    await wait_until(
        lambda: device_peers(agent) == {public_key(2), public_key(3), public_key(4)},
        message="all peers after the gap",
    )
    assert agent.receiver.resynced_for > 0  # it did go through the re-read

    # Later changes arrive as deltas again.
    await admin.ok("node.remove", node="office/two")
    await wait_until(lambda: device_peers(agent) == {public_key(3), public_key(4)})
    assert plane.runner is not None and plane.runner.messages_published > 0


def _last_revision(plane: ControlPlane, host_id: str) -> int:
    assert plane.runner is not None
    return plane.runner.published.get(host_id, 0)


async def test_forged_and_replayed_desired_states_change_nothing(
    setup: tuple[ControlPlane, Admin, Agent, str],
) -> None:
    plane, admin, agent, token = setup
    await admin.ok("join", token=token, public_key=public_key(2), name="two")
    await wait_until(lambda: device_peers(agent) == {public_key(2)}, message="first peer")
    first = await read_desired(admin.nc.jetstream(), agent.identity.host_id)
    assert first is not None
    await admin.ok("join", token=token, public_key=public_key(3), name="three")
    await wait_until(lambda: device_peers(agent) == {public_key(2), public_key(3)})
    held = agent.feed.revision
    js = admin.nc.jetstream()
    subject = desired_subject(agent.identity.host_id)
    intruder = Sections(peers={public_key(66): PeerEntry(allowed_ips=("10.10.0.66/32",))})
    forged = DesiredDelta(
        host_id=agent.identity.host_id, revision=held + 1, base=held, upsert=intruder
    )
    data = desired_encoder.encode(forged)
    # Unsigned, signed by another key, and a genuine signature on other bytes.
    other = SigningKey.generate()
    genuine = sign(plane.signing_key, desired_encoder.encode(first))
    for headers in ({}, {SIGNATURE_HEADER: sign(other, data)}, {SIGNATURE_HEADER: genuine}):
        await js.publish(subject, data, stream=DESIRED_STREAM, headers=headers)
    await wait_until(lambda: agent.rejected == 3, message="three refusals")
    assert agent.feed.revision == held
    assert public_key(66) not in device_peers(agent)
    assert agent.last_rejection is not None

    async def reported() -> bool:
        reply = await admin.send("netmesh.query.status", {})
        mine = [r for r in reply.result if r["name"] == "me"]
        return bool(mine) and mine[0].get("rejected") == 3

    await wait_until(reported, message="the refusals reported to the control plane")

    # An old genuine snapshot replayed with a rollup wipes the newer messages
    # off the subject: the agent ignores it, and a re-read does not go back.
    replay = desired_encoder.encode(first)
    await js.publish(
        subject,
        replay,
        stream=DESIRED_STREAM,
        headers={"Nats-Rollup": "sub", SIGNATURE_HEADER: sign(plane.signing_key, replay)},
    )
    agent.feed.seen = held + 5  # as if a later delta had not chained: forces a re-read
    agent.receiver.resync()
    await wait_until(lambda: not agent.feed.resyncing, message="re-read done")
    assert agent.feed.revision == held
    assert agent.feed.settle() is False
    assert device_peers(agent) == {public_key(2), public_key(3)}


async def test_no_secret_appears_in_streams_read_model_or_logs(
    setup: tuple[ControlPlane, Admin, Agent, str],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The agent's WireGuard private key, the control plane's signing key and
    the enrollment secret: in none of the streams (payloads and headers), the
    read model, or anything logged."""
    plane, admin, agent, token = setup
    await admin.ok("join", token=token, public_key=public_key(2), name="two")
    await wait_until(lambda: device_peers(agent) == {public_key(2)})
    await agent.reconcile_once()  # logs a pass, reports
    await admin.ok("node.remove", node="office/two")
    await wait_until(lambda: device_peers(agent) == set())

    wg_key = base64.b64decode(agent.key.private_key)
    seed = bytes(plane.signing_key)
    secret = parse_token(token).secret
    needles = {
        "wireguard key (base64)": agent.key.private_key,
        "wireguard key (hex)": wg_key.hex(),
        "signing key (base64)": base64.b64encode(seed).decode(),
        "signing key (hex)": seed.hex(),
        "enrollment secret": secret,
    }
    out, err = capfd.readouterr()
    found = await haystacks(admin.nc, tmp_path / "cp", out + err)
    assert len(found) > 10 and b"desired state received" in found["logs"]  # saw things
    assert_nowhere(found, needles)


async def test_agent_rotates_its_key_on_schedule(
    setup: tuple[ControlPlane, Admin, Agent, str],
) -> None:
    """`--rotate-key-every`: once the key file is older than that, the agent
    makes a new key, the control plane records it, and the device uses it."""
    _, admin, agent, _ = setup
    old_public = agent.public_key
    key_file = agent.state.path / "private.key"
    key_file.write_text(agent.key.private_key + "\n")  # the fixture's key, where agents keep it
    agent.key.rotate_every = 3600
    assert agent.rotation_due(time.time()) is None  # a fresh key file: not due
    long_ago = time.time() - 7200
    os.utime(key_file, (long_ago, long_ago))
    assert agent.rotation_due(time.time()) == "scheduled"
    agent.wake()

    async def rotated() -> bool:
        nodes = await admin.query("nodes")
        return agent.public_key != old_public and nodes[0]["public_key"] == agent.public_key

    await wait_until(rotated, timeout=10, message="key rotated and recorded")
    assert agent.rotation_due(time.time()) is None  # the new key is fresh
