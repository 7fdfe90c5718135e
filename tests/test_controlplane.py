"""The control plane against a real nats-server: commands, refusals that leave
the stream untouched, desired state on the host's subject, rebuilds, replicas."""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import msgspec
import nats
import pytest
from nacl.signing import SigningKey
from nats.aio.client import Client

from agent.daemon import enroll
from controlplane import pipeline as pipeline_module
from controlplane.audit import verify_log
from controlplane.embedded import EmbeddedNats
from controlplane.enrollment import EnrollmentSecrets
from controlplane.pipeline import CommandPipeline
from controlplane.publisher import read_desired
from controlplane.replies import Responder
from controlplane.rules import verbs_sent_by
from controlplane.rules.spec import Sender
from controlplane.service import ControlPlane
from controlplane.throttle import FailureWindow
from controlplane.writemodel import WriteModel
from events.commands import Reply
from events.envelope import RecordedEvent, encode_envelope, make_envelope
from events.model import AdminAdded, AnyEvent, NodeJoined
from events.signing import (
    COMMAND_SIGNER_HEADER,
    ENROLLMENT_TOKEN_HEADER,
    EVENT_MAC_HEADER,
    SIGNATURE_HEADER,
    command_headers,
    event_mac,
    event_mac_key,
    load_or_create,
    open_sealed,
    public_text,
    signed_payload,
    token_digest,
)
from events.store import Expectation, MemoryEventStore, PendingEvent, StoreUnavailable
from events.subjects import DESIRED_STREAM, EVENTS_STREAM
from events.tokens import make_token, parse_token
from tests.factories import public_key
from tests.netns import wait_until

ADMIN_VERBS = verbs_sent_by(Sender.ADMIN)


class Admin:
    """Sends commands as the CLI does: admin verbs signed with the admin key."""

    def __init__(self, nc: Client, key: SigningKey | None) -> None:
        self.nc = nc
        self.key = key

    async def send(self, subject: str, payload: dict[str, Any] | bytes) -> Reply:
        verb = subject.removeprefix("netmesh.cmd.")
        headers: dict[str, str] = {}
        if isinstance(payload, dict) and verb in ADMIN_VERBS and self.key is not None:
            payload = {"command_id": uuid.uuid4().hex, **payload, "signed_at": time.time()}
        data = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
        if verb in ADMIN_VERBS and self.key is not None:
            headers = command_headers(self.key, verb, data)
        msg = await self.nc.request(subject, data, timeout=10, headers=headers)
        return msgspec.json.decode(msg.data, type=Reply)

    async def ok(self, verb: str, **fields: Any) -> Any:
        reply = await self.send(f"netmesh.cmd.{verb}", fields)
        assert reply.ok, reply.error
        return reply.result

    async def query(self, what: str, **args: Any) -> Any:
        reply = await self.send(f"netmesh.query.{what}", args)
        assert reply.ok, reply.error
        return reply.result

    async def last_seq(self) -> int:
        info = await self.nc.jetstream().stream_info(EVENTS_STREAM)
        return int(info.state.last_seq)


@pytest.fixture
async def cp(
    nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[tuple[ControlPlane, Admin]]:
    cp_nc = await nats.connect(nats_server.url)
    admin_nc = await nats.connect(nats_server.url)
    plane = ControlPlane(cp_nc, tmp_path / "cp", nats_server.url)
    await plane.start()
    try:
        yield plane, Admin(admin_nc, load_or_create(tmp_path / "cp" / "admin.key"))
    finally:
        assert await plane.stop() == []
        await cp_nc.close()
        await admin_nc.close()


async def network_with_token(admin: Admin, uses: int | None = 10) -> str:
    await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    return str((await admin.ok("key.create", network="office", uses=uses))["token"])


async def test_join_publishes_desired_state_to_each_host(cp: tuple[ControlPlane, Admin]) -> None:
    _, admin = cp
    token = await network_with_token(admin)
    assert parse_token(token).server.startswith("nats://")
    hosts = []
    for n in (1, 2, 3):
        result = await admin.ok(
            "join", token=token, public_key=public_key(n), name=f"h{n}", endpoints=[f"192.0.2.{n}"]
        )
        hosts.append(result["host_id"])
    nodes = await admin.query("nodes", network="office")
    assert [(n["name"], n["address"], n["endpoint"]) for n in nodes] == [
        ("h1", "10.10.0.1", "192.0.2.1:51820"),
        ("h2", "10.10.0.2", "192.0.2.2:51820"),
        ("h3", "10.10.0.3", "192.0.2.3:51820"),
    ]
    assert {"id", "name", "network", "address", "public_key", "endpoint"} <= set(nodes[0])
    js = admin.nc.jetstream()
    for n, host_id in enumerate(hosts, 1):
        state = await read_desired(js, host_id)
        assert state is not None
        assert state.addresses == (f"10.10.0.{n}/24",)
        assert set(state.peers) == {public_key(m) for m in (1, 2, 3) if m != n}
    status = await admin.query("status")
    assert {s["state"] for s in status} == {"never reported"}


@pytest.mark.parametrize(
    ("verb", "payload", "needle"),
    [
        ("network.create", {"name": "x", "cidr": "10.10.0.0/33"}, "invalid CIDR"),
        ("network.create", {"name": "lab", "cidr": "10.10.0.0/16"}, "overlaps network 'office'"),
        ("network.create", {"name": "office", "cidr": "10.99.0.0/24"}, "already exists"),
        ("network.create", {"name": "x", "cidr": "10.9.0.0/24", "colour": 1}, "unknown field"),
        ("network.create", {"name": "x"}, "missing required field `cidr`"),
        ("key.create", {"network": "nope"}, "no network named 'nope'"),
        ("key.revoke", {"key_id": "nope"}, "no enrollment key"),
        ("node.remove", {"node": "ghost"}, "no node 'ghost'"),
        ("join", {"token": "garbage", "public_key": public_key(1), "name": "a"}, "not a netmesh"),
        ("frobnicate", {}, "unknown command"),
    ],
)
async def test_refused_commands_leave_the_stream_unchanged(
    cp: tuple[ControlPlane, Admin], verb: str, payload: dict[str, Any], needle: str
) -> None:
    _, admin = cp
    await network_with_token(admin)
    before = await admin.last_seq()
    reply = await admin.send(f"netmesh.cmd.{verb}", payload)
    assert not reply.ok
    assert reply.error is not None and needle in reply.error
    assert "\n" not in reply.error
    assert await admin.last_seq() == before


async def test_garbage_payload_is_refused_and_service_survives(
    cp: tuple[ControlPlane, Admin],
) -> None:
    _, admin = cp
    reply = await admin.send("netmesh.cmd.network.create", b"\xff{not json")
    assert not reply.ok and reply.code == "invalid"
    assert (await admin.ok("network.create", name="ok", cidr="10.1.0.0/24"))["network"] == "ok"


@pytest.mark.parametrize("reason", ["exhausted", "revoked", "expired"])
async def test_unusable_tokens_are_refused(cp: tuple[ControlPlane, Admin], reason: str) -> None:
    _, admin = cp
    await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    lifetime = 0.05 if reason == "expired" else None
    key = await admin.ok("key.create", network="office", uses=1, expires_in=lifetime)
    if reason == "exhausted":
        await admin.ok("join", token=key["token"], public_key=public_key(1), name="a")
    elif reason == "revoked":
        await admin.ok("key.revoke", key_id=key["key_id"])
    else:
        # Same machine, same clock as the server: wait for the moment it names.
        await asyncio.sleep(max(0.0, key["expires_at"] - time.time()) + 0.001)
    before = await admin.last_seq()
    reply = await admin.send(
        "netmesh.cmd.join", {"token": key["token"], "public_key": public_key(2), "name": "b"}
    )
    assert (reply.ok, reply.code) == (False, reason)
    assert await admin.last_seq() == before


async def test_rebuilt_read_model_changes_nothing_agents_see(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_server.url)
    data = tmp_path / "cp"
    try:
        plane = ControlPlane(nc, data, nats_server.url)
        await plane.start()
        admin = Admin(nc, load_or_create(data / "admin.key"))
        token = await network_with_token(admin)
        for n in (1, 2, 3):
            await admin.ok("join", token=token, public_key=public_key(n), name=f"h{n}")
        await admin.ok("node.remove", node="office/h2")
        nodes_before = await admin.query("nodes")
        desired_info = await nc.jetstream().stream_info(DESIRED_STREAM)
        await plane.stop()
        # The read model is disposable (the keys next to it are not).
        for path in data.glob("readmodel.sqlite3*"):
            path.unlink()

        plane = ControlPlane(nc, data, nats_server.url)
        await plane.start()
        try:
            assert await admin.query("nodes") == nodes_before
            after = await nc.jetstream().stream_info(DESIRED_STREAM)
            # Not one desired-state message was published by the rebuild.
            assert after.state.last_seq == desired_info.state.last_seq
        finally:
            await plane.stop()
    finally:
        await nc.close()


async def test_a_message_that_is_not_an_event_is_ignored_and_survives_a_restart(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """On an open broker anyone can write into the event stream. Garbage there
    (not an event, no MAC) is seen and not believed, by the write model and the
    projection, now and after a restart; the network it landed on still works."""
    nc = await nats.connect(nats_server.url)
    data = tmp_path / "cp"
    try:
        plane = ControlPlane(nc, data, nats_server.url)
        await plane.start()
        admin = Admin(nc, load_or_create(data / "admin.key"))
        token = await network_with_token(admin)
        await nc.jetstream().publish("netmesh.ev.network.office", b"not an event")
        await wait_until(
            lambda: plane.write_model.refused == 1 or plane.failed.is_set(),
            timeout=10,
            message="the garbage seen",
        )
        assert not plane.failed.is_set(), plane.failure
        await admin.ok("join", token=token, public_key=public_key(1), name="h1")
        await plane.stop()
        plane = ControlPlane(nc, data, nats_server.url)
        await plane.start()
        try:
            await admin.ok("join", token=token, public_key=public_key(2), name="h2")
            assert {n["name"] for n in await admin.query("nodes")} == {"h1", "h2"}
            assert not plane.failed.is_set()
        finally:
            await plane.stop()
    finally:
        await nc.close()


async def test_two_replicas_allocate_distinct_addresses(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    conns = [await nats.connect(nats_server.url) for _ in range(3)]
    # Replicas share the control plane's signing key (agents pin one key, and
    # each replica must believe the others' events).
    first = ControlPlane(conns[0], tmp_path / "cp0", nats_server.url)
    (tmp_path / "cp1").mkdir()
    shutil.copy(tmp_path / "cp0" / "signing.key", tmp_path / "cp1" / "signing.key")
    planes = [first, ControlPlane(conns[1], tmp_path / "cp1", nats_server.url)]
    try:
        for plane in planes:
            await plane.start()
        admin = Admin(conns[2], load_or_create(tmp_path / "cp0" / "admin.key"))
        await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
        key = await admin.ok("key.create", network="office", uses=None)
        # Bypass the queue group: send half the joins to each replica directly.
        joins = [
            planes[n % 2].commands.handle(
                "join",
                msgspec.json.encode(
                    {"token": key["token"], "public_key": public_key(n), "name": f"h{n}"}
                ),
                actor="test",
            )
            for n in range(12)
        ]
        replies = await asyncio.gather(*joins)
        assert all(r.ok for r in replies), [r.error for r in replies if not r.ok]
        addresses = [r.result["address"] for r in replies]
        assert len(set(addresses)) == 12
        # Read-your-writes holds on the replica that took a command; the query may
        # go to the other one, so let both projections reach the head first.
        head = await admin.last_seq()
        for plane in planes:
            assert plane.runner is not None
            assert await plane.runner.wait_for(head, 10)
        keys = await admin.query("keys")
        assert keys[0]["used"] == 12
    finally:
        for plane in planes:
            assert await plane.stop() == []
        for c in conns:
            await c.close()


async def test_token_carries_advertised_url(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    nc = await nats.connect(nats_server.url)
    plane = ControlPlane(nc, tmp_path / "cp", "nats://mesh.example:4222")
    await plane.start()
    try:
        admin = Admin(nc, load_or_create(tmp_path / "cp" / "admin.key"))
        token = await network_with_token(admin)
        assert parse_token(token).server == "nats://mesh.example:4222"
        assert token != make_token("nats://mesh.example:4222", "x", "y")
    finally:
        await plane.stop()
        await nc.close()


async def test_an_unreadable_event_fails_the_service_loudly(
    cp: tuple[ControlPlane, Admin],
) -> None:
    """A consumer the service needs must not die silently (the service would go
    on answering from a dead view): it is flagged, with the reason, so that
    `netmesh server` exits non-zero and its supervisor restarts it. (An event
    this control plane wrote, by its MAC, that it cannot read: say, from a newer
    version. Garbage from anyone else is ignored: the test after this one.)"""
    plane, admin = cp
    data = b"not an event"
    mac = event_mac(event_mac_key(plane.signing_key), data)
    await admin.nc.jetstream().publish(
        "netmesh.ev.network.x", data, headers={EVENT_MAC_HEADER: mac}
    )
    await asyncio.wait_for(plane.failed.wait(), 10)
    assert plane.failure is not None and "DecodeError" in plane.failure


async def test_a_host_speaks_only_with_its_own_key(cp: tuple[ControlPlane, Admin]) -> None:
    """A host registered with a signing key: its endpoint reports must be signed
    by that key, and its WireGuard key cannot be re-joined with another one."""
    plane, admin = cp
    token = await network_with_token(admin)
    host_key = SigningKey.generate()

    async def send(verb: str, signed: tuple[bytes, dict[str, str]]) -> Reply:
        data, hdrs = signed
        msg = await admin.nc.request(f"netmesh.cmd.{verb}", data, headers=hdrs, timeout=10)
        return msgspec.json.decode(msg.data, type=Reply)

    def join(key: SigningKey, n: int, name: str, **extra: str) -> tuple[bytes, dict[str, str]]:
        fields = {"token": token, "public_key": public_key(n), "name": name, **extra}
        return signed_payload(key, "join", {**fields, "signing_key": public_text(key)})

    joined = await send("join", join(host_key, 1, "h1", command_id="j1"))
    assert joined.ok, joined.error
    host_id = joined.result["host_id"]
    before = await admin.last_seq()

    report = {"host_id": host_id, "endpoints": ["198.51.100.7"], "command_id": "r1"}
    other = SigningKey.generate()
    attempts = [
        (msgspec.json.encode({**report, "signed_at": time.time()}), {}),  # unsigned
        signed_payload(other, "endpoint.report", report),  # someone else's key
        signed_payload(host_key, "host.leave", report),  # signed for another verb
    ]
    for attempt in attempts:
        refused = await send("endpoint.report", attempt)
        assert (refused.ok, refused.code) == (False, "unauthorized"), refused
    # Taking the host over: its WireGuard key, a new signing key.
    refused = await send("join", join(other, 1, "h1"))
    assert (refused.ok, refused.code) == (False, "unauthorized"), refused
    # Its host key for a second host (another WireGuard key) while the first is
    # still a member: it would log in to the broker as the first.
    refused = await send("join", join(host_key, 2, "h1-again"))
    assert (refused.ok, refused.code) == (False, "conflict"), refused
    assert "already belongs to host" in (refused.error or "")
    assert await admin.last_seq() == before  # nothing was written

    assert (await send("endpoint.report", signed_payload(host_key, "endpoint.report", report))).ok
    # The log proves it: the join and the report are verified as the host's.
    recorded = []
    async for batch in plane.store.follow_batches(1):
        recorded.extend(batch)
        if batch[-1].seq >= await admin.last_seq():
            break
    audit = verify_log(recorded)
    assert audit.problems == [] and audit.signed_commands == 4  # network, key, join, report


async def test_guessing_a_token_is_throttled(cp: tuple[ControlPlane, Admin]) -> None:
    _, admin = cp
    token = await network_with_token(admin)
    parts = parse_token(token)
    wrong = make_token(parts.server, parts.key_id, "not-the-secret", parts.server_key)
    before = await admin.last_seq()
    for n in range(10):
        reply = await admin.send(
            "netmesh.cmd.join", {"token": wrong, "public_key": public_key(n), "name": f"g{n}"}
        )
        assert reply.code == "invalid_token", reply
    # Now even the right secret waits: the key is throttled for a minute.
    reply = await admin.send(
        "netmesh.cmd.join", {"token": token, "public_key": public_key(20), "name": "late"}
    )
    assert (reply.ok, reply.code) == (False, "rate_limited"), reply
    assert "try again in" in (reply.error or "")
    assert await admin.last_seq() == before


async def test_events_forged_onto_the_stream_are_not_believed(
    cp: tuple[ControlPlane, Admin],
) -> None:
    """Someone who can publish on the broker writes events straight into the
    stream: an admin for themselves, a node. The control plane signs what it
    appends and believes nothing else; its own commands still go through."""
    plane, admin = cp
    token = await network_with_token(admin)
    js = admin.nc.jetstream()
    eve = SigningKey.generate()
    forged: list[tuple[str, AnyEvent, dict[str, str]]] = [
        (
            "netmesh.ev.admin.eve",
            AdminAdded(name="eve", public_key=public_text(eve), role="admin"),
            {},
        ),
        (
            "netmesh.ev.network.office",
            NodeJoined(
                network="office",
                node_id="nforged",
                host_id="hforged",
                name="x",
                address="10.10.0.99",
            ),
            {EVENT_MAC_HEADER: base64.b64encode(b"\0" * 32).decode()},  # a made-up MAC
        ),
    ]
    last = 0
    for subject, event, headers in forged:
        env = make_envelope(event, event_id="f", time=time.time(), actor="eve", command_id="f")
        ack = await js.publish(subject, encode_envelope(env), headers=headers)
        last = ack.seq
    await wait_until(lambda: plane.write_model.last_seq >= last, message="write model saw them")
    assert plane.write_model.refused == 2
    assert public_text(eve) not in plane.write_model.admins
    assert "nforged" not in plane.write_model.nodes

    impostor = Admin(admin.nc, eve)
    reply = await impostor.send("netmesh.cmd.network.create", {"name": "x", "cidr": "10.9.0.0/24"})
    assert (reply.ok, reply.code) == (False, "unauthorized")
    # The network's subject moved (the forged event counts for the optimistic
    # check); the control plane's own appends are not stuck behind it.
    await admin.ok("key.create", network="office", uses=1)
    await admin.ok("join", token=token, public_key=public_key(1), name="h1")
    assert [n["name"] for n in await admin.query("nodes")] == ["h1"]


async def test_a_host_key_in_another_spelling_cannot_take_the_host_over(
    cp: tuple[ControlPlane, Admin],
) -> None:
    _, admin = cp
    token = await network_with_token(admin)
    owner, thief = SigningKey.generate(), SigningKey.generate()
    canonical = public_key(1)

    async def join(key: SigningKey, public: str, command_id: str) -> Reply:
        fields: dict[str, object] = {
            "token": token, "public_key": public, "name": "h1", "command_id": command_id,
            "signing_key": public_text(key),
        }  # fmt: skip
        data, headers = signed_payload(key, "join", fields)
        msg = await admin.nc.request("netmesh.cmd.join", data, headers=headers, timeout=10)
        return msgspec.json.decode(msg.data, type=Reply)

    assert (await join(owner, canonical, "a")).ok
    # The same 32 bytes, spelled with the unused low bits of the last character set.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet[alphabet.index(canonical[42]) | 0b11]
    respelled = canonical[:42] + last + canonical[43:]
    assert respelled != canonical
    assert base64.b64decode(respelled) == base64.b64decode(canonical)
    refused = await join(thief, respelled, "b")
    assert (refused.ok, refused.code) == (False, "unauthorized"), refused


def signed_request(key: SigningKey, verb: str, **fields: Any) -> tuple[bytes, dict[str, str]]:
    """A signed admin command as the CLI sends it (and sends it again)."""
    fields = {"command_id": uuid.uuid4().hex, **fields, "signed_at": time.time()}
    data = msgspec.json.encode(fields)
    return data, command_headers(key, verb, data)


async def send_raw(nc: Client, verb: str, request: tuple[bytes, dict[str, str]]) -> Reply:
    data, headers = request
    msg = await nc.request(f"netmesh.cmd.{verb}", data, headers=headers, timeout=10)
    return msgspec.json.decode(msg.data, type=Reply)


async def test_a_retried_command_gets_its_original_answer_after_a_restart(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    """The same request again (its answer lost to a crash) gets the original
    answer, from the log: after a restart, on a replica that shares only the
    signing key, and with the key's token (sealed to the signer). Nothing is
    applied twice; another request under the same id gets nothing of it."""
    nc = await nats.connect(nats_server.url)
    try:
        plane = ControlPlane(nc, tmp_path / "cp", nats_server.url)
        await plane.start()
        key = load_or_create(tmp_path / "cp" / "admin.key")
        admin = Admin(nc, key)
        network = signed_request(key, "network.create", name="office", cidr="10.10.0.0/24")
        created = await send_raw(nc, "network.create", network)
        make_key = signed_request(key, "key.create", network="office", uses=1)
        first = await send_raw(nc, "key.create", make_key)
        assert first.ok and not first.repeated, first
        again = await send_raw(nc, "key.create", make_key)
        assert (again.ok, again.repeated, again.seq) == (True, True, first.seq), again
        assert open_sealed(key, again.result.pop("sealed_token")) == first.result["token"]
        assert {**again.result, "token": first.result["token"]} == first.result
        head = await admin.last_seq()
        await plane.stop()

        # Another data dir with the same signing key: a replica, or this one
        # restarted with its read model gone.
        (tmp_path / "cp2").mkdir()
        shutil.copy(tmp_path / "cp" / "signing.key", tmp_path / "cp2" / "signing.key")
        plane = ControlPlane(nc, tmp_path / "cp2", nats_server.url)
        await plane.start()
        try:
            for verb, request, original in (
                ("network.create", network, created),
                ("key.create", make_key, first),
            ):
                reply = await send_raw(nc, verb, request)
                assert (reply.ok, reply.repeated, reply.seq) == (True, True, original.seq), reply
                if verb == "key.create":
                    sealed = reply.result.pop("sealed_token")
                    with pytest.raises(ValueError):  # whoever replays it cannot open it
                        open_sealed(SigningKey.generate(), sealed)
                    reply.result["token"] = open_sealed(key, sealed)
                assert reply.result == original.result
            assert await admin.last_seq() == head  # nothing applied twice
            # The token works: the key had been made, once.
            await admin.ok("join", token=first.result["token"], public_key=public_key(1), name="a")

            # Another command under a used id (another admin's, or this one's)
            # is refused, and gets nothing of the original answer.
            other = SigningKey.generate()
            await admin.ok("admin.add", name="olga", public_key=public_text(other))
            command_id = msgspec.json.decode(make_key[0])["command_id"]
            for signer in (key, other):
                reuse = signed_request(
                    signer, "key.create", network="office", command_id=command_id
                )
                refused = await send_raw(nc, "key.create", reuse)
                assert (refused.ok, refused.code) == (False, "duplicate"), refused
                assert "used by another command" in (refused.error or "")
                assert refused.result is None
        finally:
            await plane.stop()
    finally:
        await nc.close()


async def test_a_signed_command_seen_before_gets_the_answer_it_got(
    cp: tuple[ControlPlane, Admin],
) -> None:
    """A refused signed command replayed once what made it fail has changed is
    refused again (not applied late); two copies of one request in flight at
    once are applied once, and both answered."""
    plane, admin = cp
    assert admin.key is not None
    make_key = signed_request(admin.key, "key.create", network="office")
    refused = await send_raw(admin.nc, "key.create", make_key)
    assert (refused.ok, refused.code) == (False, "not_found"), refused
    await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    before = await admin.last_seq()
    again = await send_raw(admin.nc, "key.create", make_key)
    assert (again.ok, again.code, again.repeated) == (False, "not_found", True), again
    assert await admin.last_seq() == before

    # Straight into the pipeline: the subscription hands over one at a time.
    data, headers = signed_request(admin.key, "key.create", network="office")
    both = [
        plane.commands.handle(
            "key.create",
            data,
            actor="test",
            signer=headers[COMMAND_SIGNER_HEADER],
            signature=headers[SIGNATURE_HEADER],
        )
        for _ in range(2)
    ]
    replies = await asyncio.gather(*both)
    assert all(r.ok for r in replies) and [r.repeated for r in replies] == [False, True]
    assert await admin.last_seq() == before + 1
    assert len({r.seq for r in replies}) == 1


class FailingOnce(MemoryEventStore):
    """A store whose next `fail_next` appends time out (they may or may not
    have happened)."""

    fail_next = 0

    async def append(
        self,
        events: Sequence[PendingEvent],
        *,
        expect: Sequence[Expectation] = (),
        msg_id: str | None = None,
    ) -> int:
        if self.fail_next:
            self.fail_next -= 1
            raise StoreUnavailable("no answer")
        return await super().append(events, expect=expect, msg_id=msg_id)


async def test_a_signed_command_that_decided_nothing_is_taken_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Remembered outcomes are decisions: a retry after the store did not
    answer is tried again (and applied), not told "unavailable" forever. A
    store unavailable for a moment (a new stream leader) is waited for."""
    monkeypatch.setattr(pipeline_module, "STORE_RETRY_FOR", 0.3)
    store = FailingOnce()
    write = WriteModel(store)
    following = asyncio.create_task(write.follow())

    async def read_your_writes(seq: int, timeout: float) -> None:
        return None

    pipeline = CommandPipeline(
        store,
        write,
        cast(Responder, None),
        FailureWindow(),
        EnrollmentSecrets(SigningKey.generate(), "nats://cp:4222"),
        read_your_writes,
    )
    try:
        await pipeline.bootstrap_admin(tmp_path)
        key = load_or_create(tmp_path / "admin.key")

        async def send(request: tuple[bytes, dict[str, str]]) -> Reply:
            data, headers = request
            return await pipeline.handle(
                "network.create",
                data,
                actor="test",
                signer=headers[COMMAND_SIGNER_HEADER],
                signature=headers[SIGNATURE_HEADER],
            )

        create = signed_request(key, "network.create", name="office", cidr="10.10.0.0/24")
        store.fail_next = 1000
        assert (await send(create)).code == "unavailable"
        store.fail_next = 0
        applied = await send(create)
        assert (applied.ok, applied.repeated, applied.seq) == (True, False, 2), applied
        again = await send(create)
        assert (again.ok, again.repeated, again.seq) == (True, True, 2), again
        store.fail_next = 2  # the first two appends lost: sent again, applied once
        lab = signed_request(key, "network.create", name="lab", cidr="10.20.0.0/24")
        made = await send(lab)
        assert (made.ok, made.repeated, made.seq) == (True, False, 3), made
        assert await store.last_sequence() == 3
    finally:
        await store.close()
        await following


async def _recorded(plane: ControlPlane, admin: Admin) -> list[RecordedEvent]:
    recorded: list[RecordedEvent] = []
    async for batch in plane.store.follow_batches(1):
        recorded.extend(batch)
        if batch[-1].seq >= await admin.last_seq():
            break
    return recorded


async def test_a_join_keeps_its_token_out_of_the_log(
    cp: tuple[ControlPlane, Admin], nats_server: EmbeddedNats
) -> None:
    """The agent signs the token's digest and sends the token beside it: the
    join's proof in the log names the digest; the token (and its secret) is in
    no event. A token that is not the signed one is refused, nothing written."""
    plane, admin = cp
    token = await network_with_token(admin)
    key = SigningKey.generate()
    _, joined = await enroll(token, nats_server.url, "h1", public_key(1), ["192.0.2.1"], None, key)
    assert joined["name"] == "h1"
    recorded = await _recorded(plane, admin)
    stored = b"\n".join(encode_envelope(r.envelope) for r in recorded)
    secret = parse_token(token).secret
    assert token.encode() not in stored and secret.encode() not in stored
    assert token_digest(token).encode() in stored  # what the proof signed
    audit = verify_log(recorded)
    assert audit.problems == [] and audit.signed_commands == 3  # network, key, join

    before = await admin.last_seq()
    parts = parse_token(token)
    other = make_token(parts.server, parts.key_id, "another-secret", parts.server_key)
    fields: dict[str, object] = {
        "token_sha256": token_digest(token),
        "public_key": public_key(2),
        "name": "h2",
        "signing_key": public_text(key2 := SigningKey.generate()),
        "command_id": "j2",
    }
    data, headers = signed_payload(key2, "join", fields)
    msg = await admin.nc.request(
        "netmesh.cmd.join", data, headers={**headers, ENROLLMENT_TOKEN_HEADER: other}, timeout=10
    )
    refused = msgspec.json.decode(msg.data, type=Reply)
    assert (refused.ok, refused.code) == (False, "invalid_token"), refused
    assert "not the signed one" in (refused.error or "")
    assert await admin.last_seq() == before
