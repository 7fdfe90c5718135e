"""Least privilege on a real broker: the control plane decides every connection
(auth callout) and each identity may touch only what it needs. Each denied
attempt must show as a permissions violation from the server (not a silent
hang), and leave the streams as they were."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from nats.aio.client import Client

from agent.daemon import AgentError, enroll
from agent.statedir import public_key_of
from cli.client import CliError, Login, command, connect, request
from controlplane.brokerauth import BrokerKeys
from controlplane.embedded import EmbeddedNats, NatsServerError, free_port
from controlplane.server import write_broker_config
from controlplane.service import ControlPlane
from events import natsid
from events.commands import Reply
from events.connect import BrokerNotReady, connect_once, refused_by_broker
from events.desired import PROTOCOL, SECTION_NAMES
from events.jetstream import JetStreamEventStore
from events.signing import load_or_create, public_text
from events.subjects import (
    DESIRED_STREAM,
    EVENTS_STREAM,
    consume_subject,
    desired_subject,
    read_events_subject,
    report_subject,
    resync_subject,
)
from tests.netns import wait_until
from tests.test_controlplane import Admin


@dataclass
class Broker:
    server: EmbeddedNats
    plane: ControlPlane
    admin: Admin
    data: Path
    clients: list[Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    async def connect(self, key: SigningKey | None, token: str | None = None) -> Watched:
        """A client as `key`; raises what nats-py raises when refused."""
        watched = Watched()
        options = natsid.client_options(key, token) if key is not None else {}
        nc = await connect_once(self.url, error_cb=watched.on_error, **options)
        self.clients.append(nc)
        watched.nc = nc
        return watched


@dataclass
class Watched:
    """A connection and the permission violations the server reported on it."""

    nc: Any = None
    violations: list[str] = field(default_factory=list)

    async def on_error(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            self.violations.append(str(exc))

    async def denied(self, what: str) -> None:
        """Wait until the server reports a violation mentioning `what`."""
        await wait_until(
            # nats-py lowercases the server's error text.
            lambda: any(what.lower() in v.lower() for v in self.violations),
            timeout=5,
            message=f"a permissions violation for {what}",
        )


async def guarded_broker(tmp_path: Path, data: Path) -> tuple[EmbeddedNats, BrokerKeys]:
    """A broker configured as `netmesh server` configures its own (the auth
    callout for everyone but the control plane), and no control plane."""
    data.mkdir(exist_ok=True)
    keys = BrokerKeys.derive(load_or_create(data / "signing.key"))
    for attempt in range(5):
        server = EmbeddedNats(
            tmp_path / "js",
            port=free_port(),
            config=write_broker_config(data, keys),
            client_options=natsid.client_options(keys.controlplane),
            log_file=tmp_path / "nats.log",
            server_name=f"guarded-{uuid.uuid4().hex[:8]}",
        )
        try:
            await server.start()
            return server, keys
        except NatsServerError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    data = tmp_path / "cp"
    server, keys = await guarded_broker(tmp_path, data)
    login = natsid.client_options(keys.controlplane)
    cp_nc = await nats.connect(server.url, **login)
    system_nc = await nats.connect(server.url, **natsid.client_options(keys.system))
    plane = ControlPlane(cp_nc, data, server.url, system_nc=system_nc)
    admin_key = None
    state = None
    try:
        await plane.start()
        admin_key = load_or_create(data / "admin.key")
        admin_nc = await nats.connect(server.url, **natsid.client_options(admin_key))
        state = Broker(server, plane, Admin(admin_nc, admin_key), data, [admin_nc])
        yield state
    finally:
        if state is not None:
            for nc in state.clients:
                with contextlib.suppress(Exception):
                    await nc.close()
        assert await plane.stop() == []
        await cp_nc.close()
        await system_nc.close()
        await server.stop()


async def refused(broker: Broker, key: SigningKey | None, token: str | None = None) -> None:
    with pytest.raises((OSError, nats.errors.Error, TimeoutError)) as caught:
        await broker.connect(key, token)
    assert refused_by_broker(caught.value), caught.value


async def events_count(broker: Broker) -> int:
    return await broker.admin.last_seq()


async def joined_host(broker: Broker, token: str, name: str) -> tuple[SigningKey, str]:
    key = SigningKey.generate()
    _, result = await enroll(
        token, broker.url, name, public_key_of(PrivateKey.generate()), ["192.0.2.9"], None, key
    )
    return key, str(result["host_id"])


async def test_nothing_connects_anonymously_or_with_an_unknown_key(broker: Broker) -> None:
    await refused(broker, None)
    await refused(broker, SigningKey.generate())
    # A real key with a token the control plane never made.
    await refused(broker, SigningKey.generate(), "nmt1.eyJzZXJ2ZXIiOiIifQ")


async def test_enrolling_agent_can_only_ask_to_join(broker: Broker) -> None:
    admin = broker.admin
    await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    token = str((await admin.ok("key.create", network="office", uses=5))["token"])
    before = await events_count(broker)
    enrolling = await broker.connect(SigningKey.generate(), token)
    nc = enrolling.nc
    await nc.publish("netmesh.query.networks", b"{}")
    await enrolling.denied("netmesh.query.networks")
    await nc.subscribe(f"{desired_subject('>')}")
    await enrolling.denied("netmesh.desired")
    await nc.publish("netmesh.ev.network.office", b"{}")
    await enrolling.denied("netmesh.ev.network.office")
    assert await events_count(broker) == before


async def test_tampered_token_is_refused_and_then_rate_limited(broker: Broker) -> None:
    admin = broker.admin
    await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    token = str((await admin.ok("key.create", network="office", uses=5))["token"])
    from events.tokens import make_token, parse_token

    parts = parse_token(token)
    forged = make_token(parts.server, parts.key_id, "x" * len(parts.secret), parts.server_key)
    with pytest.raises(AgentError, match="enrollment token not recognised"):
        await joined_host(broker, forged, "guess")
    for _ in range(10):
        await refused(broker, SigningKey.generate(), forged)
    # The genuine token is now refused too, for a while: the key is throttled.
    await refused(broker, SigningKey.generate(), token)


async def test_host_reads_only_its_own_desired_state(broker: Broker) -> None:
    admin = broker.admin
    await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    token = str((await admin.ok("key.create", network="office", uses=5))["token"])
    key_a, host_a = await joined_host(broker, token, "a")
    _, host_b = await joined_host(broker, token, "b")
    before = await events_count(broker)
    host = await broker.connect(key_a)
    nc = host.nc

    async def consume(host_id: str, deliver: str, **agent: object) -> Reply:
        what = agent or {"protocol": PROTOCOL, "sections": SECTION_NAMES}
        answer = await nc.request(
            consume_subject(host_id),
            msgspec.json.encode({"deliver_subject": deliver, **what}),
            timeout=5,
        )
        return msgspec.json.decode(answer.data, type=Reply)

    # An agent that reads an older protocol (it says none) is told to upgrade.
    old = await consume(host_a, nc.new_inbox(), sections=["peers"])
    assert not old.ok and old.code == "upgrade_required" and "upgrade the agent" in str(old.error)

    # Its own subject: the control plane makes it a consumer delivering to its
    # inbox, starting with the snapshot the join published.
    inbox = nc.new_inbox()
    own = await nc.subscribe(inbox)
    assert (await consume(host_a, inbox)).ok
    first = await own.next_msg(timeout=5)
    assert msgspec.json.decode(first.data)["kind"] == "snapshot"
    # ...but only into its own inbox (a consumer delivering elsewhere would let
    # it push messages onto any subject).
    refused = await consume(host_a, "netmesh.cmd.network.delete")
    assert not refused.ok and "own inbox" in (refused.error or "")

    # It may not create consumers itself, not even on its own subject (the
    # broker does not check a consumer's deliver subject against its creator).
    name = f"probe-{uuid.uuid4().hex[:6]}"
    await nc.publish(
        f"$JS.API.CONSUMER.CREATE.{DESIRED_STREAM}.{name}.{desired_subject(host_a)}", b"{}"
    )
    await host.denied(f"CONSUMER.CREATE.{DESIRED_STREAM}")
    # Another host's desired state: no consumer, no plain subscription.
    await nc.publish(consume_subject(host_b), b"{}")
    await host.denied(consume_subject(host_b))
    await nc.subscribe(desired_subject(host_b))
    await host.denied(f'Subscription to "{desired_subject(host_b)}"')

    # Reports for another host, admin commands, events, stream deletes: denied.
    await nc.publish(report_subject(host_b, "applied"), b"{}")
    await host.denied(report_subject(host_b, "applied"))
    # Its own reports: only the kind agents send (each kept once per subject:
    # a host inventing subjects could otherwise fill the broker's disk).
    await nc.publish(report_subject(host_a, "anything"), b"{}")
    await host.denied(report_subject(host_a, "anything"))
    await nc.publish("netmesh.cmd.network.delete", b"{}")
    await host.denied("netmesh.cmd.network.delete")
    await nc.publish("netmesh.ev.network.office", b"{}")
    await host.denied("netmesh.ev.network.office")
    await nc.publish(f"$JS.API.STREAM.MSG.DELETE.{EVENTS_STREAM}", b'{"seq": 1}')
    await host.denied("STREAM.MSG.DELETE")
    await nc.subscribe("netmesh.cmd.>")
    await host.denied('Subscription to "netmesh.cmd.>"')
    assert await events_count(broker) == before


async def test_auditor_reads_but_cannot_command(broker: Broker) -> None:
    admin = broker.admin
    auditor_key = SigningKey.generate()
    await admin.ok("admin.add", name="eve", public_key=public_text(auditor_key), role="auditor")
    auditor = await broker.connect(auditor_key)
    reader = Admin(auditor.nc, auditor_key)
    assert await reader.query("networks") == []
    seq = await reader.last_seq()  # the event stream is readable
    await auditor.nc.publish("netmesh.cmd.network.create", b"{}")
    await auditor.denied("netmesh.cmd.network.create")
    assert await reader.last_seq() == seq
    # The CLI says so at once, rather than waiting out its timeout.
    with pytest.raises(CliError, match="denied by the broker: permissions violation"):
        await command(
            broker.url, "network.create", login=Login(auditor_key), name="x", cidr="10.1.0.0/24"
        )
    assert await reader.last_seq() == seq


async def test_removed_node_is_disconnected_and_refused(broker: Broker) -> None:
    admin = broker.admin
    await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    token = str((await admin.ok("key.create", network="office", uses=5))["token"])
    key, host_id = await joined_host(broker, token, "gone")
    host = await broker.connect(key)
    assert host.nc.is_connected
    nodes = await admin.query("nodes", network="office")
    await admin.ok("node.remove", node=nodes[0]["id"])
    await wait_until(
        lambda: not host.nc.is_connected, timeout=10, message="removed host disconnected"
    )
    await refused(broker, key)
    assert host_id not in {n["host_id"] for n in await admin.query("nodes", network="office")}


async def test_removed_admin_is_disconnected_and_refused(broker: Broker) -> None:
    admin = broker.admin
    other = SigningKey.generate()
    await admin.ok("admin.add", name="bob", public_key=public_text(other), role="admin")
    bob = await broker.connect(other)
    await admin.ok("admin.remove", name="bob")
    await wait_until(
        lambda: not bob.nc.is_connected, timeout=10, message="removed admin disconnected"
    )
    await refused(broker, other)


# While the control plane is not yet back to answer the callout, a reconnect is
# refused; nats-py's reconnect path drops that socket without closing it (the
# garbage collector closes it, with a ResourceWarning).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_agent_reconnects_after_a_broker_restart(broker: Broker) -> None:
    """The control plane's own connection and a host's both come back, and the
    host is admitted again (the control plane answers the callout once it is
    reconnected)."""
    admin = broker.admin
    await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    token = str((await admin.ok("key.create", network="office", uses=5))["token"])
    key, _ = await joined_host(broker, token, "back")
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(
        broker.url,
        reconnected_cb=on_reconnect,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        **natsid.client_options(key),
    )
    broker.clients.append(nc)
    await broker.server.stop()
    await broker.server.start()
    await asyncio.wait_for(reconnected.wait(), 30)
    assert nc.is_connected


async def test_broker_beyond_loopback_speaks_only_tls_with_its_own_ca(tmp_path: Path) -> None:
    """A plaintext client, and a TLS client that trusts another CA, are turned
    away before any credentials are sent; one pinned to the broker's CA gets in."""
    from controlplane.brokertls import ensure_broker_tls
    from events.connect import tls_options

    data = tmp_path / "cp"
    data.mkdir()
    keys = BrokerKeys.derive(load_or_create(data / "signing.key"))
    tls = ensure_broker_tls(data)
    assert (tls.key.stat().st_mode & 0o777) == 0o600
    login = natsid.client_options(keys.controlplane)
    pinned = tls_options("tls://", tls.ca_der())
    server = EmbeddedNats(
        tmp_path / "js",
        port=free_port(),
        config=write_broker_config(data, keys, tls),
        client_options=login | pinned,
        tls=True,
        server_name=f"tls-{uuid.uuid4().hex[:8]}",
    )
    await server.start()
    try:
        assert server.url.startswith("tls://")
        nc = await connect_once(server.url, **login, **pinned)
        assert nc.is_connected
        await nc.close()
        plain = server.url.replace("tls://", "nats://")
        with pytest.raises((OSError, nats.errors.Error, TimeoutError)):
            await connect_once(plain, timeout=2, **login)
        other = ensure_broker_tls(tmp_path / "elsewhere")
        with pytest.raises((OSError, nats.errors.Error, TimeoutError)) as caught:
            await connect_once(
                server.url, timeout=2, **login, **tls_options("tls://", other.ca_der())
            )
        assert "certificate verify failed" in str(caught.value).lower()
    finally:
        await server.stop()


async def test_unusable_tokens_get_their_specific_refusal_through_a_guarded_broker(
    broker: Broker,
) -> None:
    """A token whose key authenticates but cannot be used (revoked, used up, its
    network deleted) still reaches the join, which says exactly why."""
    admin = broker.admin
    await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    revoked = await admin.ok("key.create", network="office", uses=5)
    await admin.ok("key.revoke", key_id=revoked["key_id"])
    with pytest.raises(AgentError, match="has been revoked"):
        await joined_host(broker, str(revoked["token"]), "r")
    once = str((await admin.ok("key.create", network="office", uses=1))["token"])
    await joined_host(broker, once, "first")
    with pytest.raises(AgentError, match="is used up"):
        await joined_host(broker, once, "second")
    await admin.ok("network.create", name="lab", cidr="10.20.0.0/24")
    lab = str((await admin.ok("key.create", network="lab", uses=5))["token"])
    await admin.ok("network.delete", name="lab")
    with pytest.raises(AgentError, match="which has been deleted"):
        await joined_host(broker, lab, "late")


async def test_reply_addresses_cannot_steer_the_control_plane_into_the_streams(
    broker: Broker,
) -> None:
    """The broker checks where a client publishes, never the reply address it
    names; the control plane (which may publish anywhere) answers only into
    inboxes. Otherwise a host could have its resync answer written into the
    event stream (found by review: the write model then stopped)."""
    admin = broker.admin
    await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    token = str((await admin.ok("key.create", network="office", uses=5))["token"])
    key, host_id = await joined_host(broker, token, "a")
    host = await broker.connect(key)
    enrolling = await broker.connect(SigningKey.generate(), token)
    before = await events_count(broker)
    await host.nc.publish(resync_subject(host_id), b"", reply="netmesh.ev.network.office")
    await host.nc.publish(
        consume_subject(host_id), b'{"deliver_subject": "x"}', reply="netmesh.ev.host.x"
    )
    await enrolling.nc.publish("netmesh.cmd.join", b"{}", reply="netmesh.ev.network.office")
    await admin.nc.publish("netmesh.query.networks", b"{}", reply="netmesh.ev.admin.x")
    # Nor into the control plane's own inbox (where its JetStream acks arrive).
    own = natsid.inbox_prefix(
        natsid.public_nkey(
            BrokerKeys.derive(load_or_create(broker.data / "signing.key")).controlplane
        )
    )
    await admin.nc.publish("netmesh.query.networks", b"{}", reply=f"{own}.x")
    # Each was handled (and not answered) before the next query is answered.
    await wait_until(lambda: broker.plane.not_answered >= 4, timeout=5, message="requests handled")
    assert await admin.query("networks")
    assert await events_count(broker) == before
    assert not broker.plane.failed.is_set()


async def test_readers_read_events_through_consumers_the_control_plane_makes(
    broker: Broker,
) -> None:
    """An auditor reads the whole event stream (as `events log/verify` do), but
    makes no consumers itself: a consumer may deliver to any subject, and one
    could outlive the auditor's removal."""
    auditor_key = SigningKey.generate()
    await broker.admin.ok(
        "admin.add", name="eve", public_key=public_text(auditor_key), role="auditor"
    )
    auditor = await broker.connect(auditor_key)
    nkey = natsid.public_nkey(auditor_key)
    store = JetStreamEventStore(auditor.nc, reader=nkey)
    head = await store.last_sequence()
    seen = []
    async for batch in store.follow_batches(1):
        seen += [r.seq for r in batch]
        if seen[-1] >= head:
            break
    assert seen == list(range(1, head + 1))

    # Its own consumers: none, durable or not.
    consumer = json.dumps(
        {"stream_name": EVENTS_STREAM, "config": {"deliver_subject": "x", "ack_policy": "none"}}
    ).encode()
    await auditor.nc.publish(f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}", consumer)
    await auditor.denied(f"CONSUMER.CREATE.{EVENTS_STREAM}")
    # Through the control plane: only into its own inbox, and only as itself.
    answer = await auditor.nc.request(
        read_events_subject(nkey), b'{"deliver_subject": "netmesh.cmd.x"}', timeout=5
    )
    refused = msgspec.json.decode(answer.data, type=Reply)
    assert not refused.ok and "own inbox" in (refused.error or "")
    other = natsid.public_nkey(load_or_create(broker.data / "admin.key"))
    await auditor.nc.publish(read_events_subject(other), b"{}")
    await auditor.denied(read_events_subject(other))


async def test_sweep_disconnects_whoever_is_no_longer_admitted(broker: Broker) -> None:
    """The net under the disconnect that follows a removal: a control plane
    that stopped in between, or a kick that failed. Here the removal is
    simulated in the control plane's view only, so only the sweep can act."""
    assert broker.plane.gate is not None
    other = SigningKey.generate()
    await broker.admin.ok("admin.add", name="bob", public_key=public_text(other), role="admin")
    bob = await broker.connect(other)
    assert await broker.plane.gate.sweep() == 0  # everyone connected is admitted
    del broker.plane.write_model.admins[public_text(other)]
    assert await broker.plane.gate.sweep() == 1
    await wait_until(lambda: not bob.nc.is_connected, timeout=10, message="bob disconnected")
    assert broker.admin.nc.is_connected  # the others stay


async def test_a_client_the_broker_cannot_admit_yet_is_told_so_and_gets_in_once_it_can(
    tmp_path: Path,
) -> None:
    """A guarded broker up, its control plane not (yet): it holds each login for
    its callout timeout, and its first PING (2 s in) used to pass for admission
    in nats-py, which then sent nothing: the CLI hung ~17.5 s for "did not
    answer in time". Now: a fast, retryable "not admitted yet", and the CLI
    gets in as soon as a control plane answers."""
    data = tmp_path / "cp"
    server, keys = await guarded_broker(tmp_path, data)
    cp_nc = await nats.connect(server.url, **natsid.client_options(keys.controlplane))
    plane = ControlPlane(cp_nc, data, server.url)
    await plane.start()  # once, to register the first admin (admitting no one)
    await plane.stop()
    admin = load_or_create(data / "admin.key")
    try:
        started = time.monotonic()
        with pytest.raises(BrokerNotReady):  # not a connection that never sends
            await connect_once(server.url, timeout=3, **natsid.client_options(admin))
        assert time.monotonic() - started < 4.5
        started = time.monotonic()
        with pytest.raises(CliError, match="admits no one yet"):
            await connect(server.url, Login(admin), admission_wait=1.0)
        assert time.monotonic() - started < 3.0

        # Its first login goes to nobody (no callout subscribed while the
        # control plane starts): the broker holds it for 5 s.
        connecting = asyncio.ensure_future(connect(server.url, Login(admin)))
        waiting = asyncio.ensure_future(
            connect_once(server.url, timeout=15, **natsid.client_options(admin))
        )
        system_nc = await nats.connect(server.url, **natsid.client_options(keys.system))
        plane = ControlPlane(cp_nc, data, server.url, system_nc=system_nc)
        await plane.start()
        ready = time.monotonic()
        nc = await asyncio.wait_for(connecting, 15)
        other = await asyncio.wait_for(waiting, 15)
        assert time.monotonic() - ready < 3.0
        try:
            assert await request(nc, "netmesh.query.ping", {}, server.url) == {}
            assert other.is_connected
            await other.flush(timeout=2)  # it does send
        finally:
            await nc.close()
            await other.close()
            await plane.stop()
            await system_nc.close()
    finally:
        await cp_nc.close()
        await server.stop()
