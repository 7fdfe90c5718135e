"""The fold and the desired-state derivation, and the SQLite read model."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.decide import Rejected, host_id_for
from controlplane.publisher import MemoryDesiredPublisher
from events.commands import (
    AnyCommand,
    CreateEnrollmentKey,
    CreateNetwork,
    DeleteNetwork,
    Join,
    LeaveNetworks,
    RemoveNode,
    ReportEndpoint,
    RequestKeyRotation,
    RotateHostKey,
    UpdateNetwork,
)
from events.desired import (
    WIREGUARD,
    DeltaMismatch,
    DesiredDelta,
    DesiredMessage,
    DesiredState,
    PeerEntry,
    Sections,
    apply_delta,
    decode_message,
    decode_state,
    desired_encoder,
)
from events.feed import DesiredFeed, Outcome
from events.store import MemoryEventStore, PendingEvent
from events.tokens import make_token
from projections import sqlite as sqlite_module
from projections.desired import DesiredChanges, desired_for, messages
from projections.runner import ProjectionRunner
from projections.sqlite import ReadModel
from projections.topology import Topology, Touched
from tests.factories import World, public_key


def mesh(hosts: int) -> tuple[World, list[str]]:
    world = World()
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24", keepalive=10))
    key_id = world.run(CreateEnrollmentKey(network="office", uses=None))[0].result["key_id"]
    token = make_token("x", key_id, f"s{world._keys}")
    ids = []
    for n in range(1, hosts + 1):
        result = world.run(
            Join(token=token, public_key=public_key(n), name=f"h{n}", endpoints=(f"192.0.2.{n}",))
        )[0].result
        ids.append(result["host_id"])
    return world, ids


def test_desired_state_is_the_full_mesh_minus_self() -> None:
    world, ids = mesh(3)
    state = desired_for(world.topology, ids[0], revision=7)
    assert state is not None
    assert state.revision == 7
    assert state.addresses == ("10.10.0.1/24",)
    assert state.interface.listen_port == 51820 and state.interface.mtu == 1420
    by_name = {p.name: p for p in state.peers.values()}
    assert set(by_name) == {"h2", "h3"}
    assert state.peers[public_key(2)] == PeerEntry(
        allowed_ips=("10.10.0.2/32",),
        endpoint="192.0.2.2:51820",
        persistent_keepalive=10,
        name="h2",
    )


class Agents:
    """What agents would hold if they applied every message, with the checks
    a real agent makes (a delta applies to exactly its base)."""

    def __init__(self) -> None:
        self.states: dict[str, DesiredState] = {}
        self.published: dict[str, int] = {}
        self.sent: list[DesiredMessage] = []

    def publish(self, topology: Topology, touched: Sequence[Touched]) -> list[DesiredMessage]:
        changes = DesiredChanges()
        for one in touched:
            changes.add(one)
        found = messages(topology, changes, self.published)
        for message in found:
            # Through the wire format, as an agent would read it.
            message = decode_message(desired_encoder.encode(message))
            if isinstance(message, DesiredDelta):
                self.states[message.host_id] = apply_delta(self.states[message.host_id], message)
            else:
                self.states[message.host_id] = message
            self.published[message.host_id] = message.revision
        self.sent.extend(found)
        return found

    def assert_converged(self, topology: Topology) -> None:
        for host_id in topology.hosts:
            want = desired_for(topology, host_id)
            assert self.states.get(host_id) == want, host_id


def test_removed_node_disappears_from_peers_and_its_host_is_emptied() -> None:
    world, ids = mesh(3)
    agents = Agents()
    agents.publish(world.topology, [])
    agents.published = {h: world.topology.revision_of(h) for h in ids}
    agents.states = {h: desired_for(world.topology, h) for h in ids}  # type: ignore[misc]
    _, touched = world.run(RemoveNode(node="office/h3"))
    sent = agents.publish(world.topology, touched)
    # The removed host gets its (empty) state whole; the others a one-key removal.
    by_host = {m.host_id: m for m in sent}
    assert set(by_host) == set(ids)
    emptied = by_host[ids[2]]
    assert isinstance(emptied, DesiredState)
    assert emptied.addresses == () and emptied.peers == {}
    for host_id in ids[:2]:
        delta = by_host[host_id]
        assert isinstance(delta, DesiredDelta)
        # Its peer goes, and its name: one key each.
        assert delta.remove == {"peers": (public_key(3),), "dns": ("h3.office.internal",)}
        assert delta.upsert == Sections()
    agents.assert_converged(world.topology)


def test_a_join_sends_one_snapshot_and_one_peer_to_everyone_else() -> None:
    world, ids = mesh(50)
    agents = Agents()
    agents.published = {h: world.topology.revision_of(h) for h in ids}
    agents.states = {h: desired_for(world.topology, h) for h in ids}  # type: ignore[misc]
    key_id = next(iter(world.topology.keys))
    token = make_token("x", key_id, "s2")
    _, touched = world.run(Join(token=token, public_key=public_key(99), name="new"))
    sent = agents.publish(world.topology, touched)
    snapshots = [m for m in sent if isinstance(m, DesiredState)]
    deltas = [m for m in sent if isinstance(m, DesiredDelta)]
    assert len(snapshots) == 1 and len(snapshots[0].peers) == 50
    assert len(deltas) == 50
    assert all(
        len(d.upsert.peers) == 1 and next(iter(d.upsert.peers.values())).name == "new"
        for d in deltas
    )
    assert all(not d.upsert.interface and d.remove == {} for d in deltas)
    agents.assert_converged(world.topology)


def test_endpoint_change_tells_the_peers_and_moves_the_hosts_revision() -> None:
    world, ids = mesh(3)
    world.run(CreateNetwork(name="lab", cidr="10.20.0.0/24"))
    agents = Agents()
    agents.published = {h: world.topology.revision_of(h) for h in ids}
    agents.states = {h: desired_for(world.topology, h) for h in ids}  # type: ignore[misc]
    _, touched = world.run(
        ReportEndpoint(host_id=ids[1], endpoints=("198.51.100.9",), listen_port=51999)
    )
    sent = {m.host_id: m for m in agents.publish(world.topology, touched)}
    assert set(sent) == set(ids)
    moved = sent[ids[1]]
    assert isinstance(moved, DesiredDelta) and not moved.upsert.peers
    assert moved.upsert.interface[WIREGUARD].listen_port == 51999
    told = sent[ids[0]]
    assert isinstance(told, DesiredDelta)
    assert [p.endpoint for p in told.upsert.peers.values()] == ["198.51.100.9:51999"]
    agents.assert_converged(world.topology)


def test_a_network_update_changes_every_member_in_place() -> None:
    world, ids = mesh(4)
    agents = Agents()
    agents.published = {h: world.topology.revision_of(h) for h in ids}
    agents.states = {h: desired_for(world.topology, h) for h in ids}  # type: ignore[misc]
    _, touched = world.run(UpdateNetwork(name="office", mtu=1380))
    sent = agents.publish(world.topology, touched)
    assert len(sent) == 4 and all(isinstance(m, DesiredDelta) for m in sent)
    for delta in sent:
        assert isinstance(delta, DesiredDelta)
        assert delta.upsert.interface[WIREGUARD].mtu == 1380 and not delta.upsert.peers
    _, touched = world.run(UpdateNetwork(name="office", keepalive=5))
    sent = agents.publish(world.topology, touched)
    for delta in sent:
        assert isinstance(delta, DesiredDelta) and not delta.upsert.interface
        # Every other member, as this one sees it, keeps alive every 5 s now.
        assert len(delta.upsert.peers) == 3
        assert {p.persistent_keepalive for p in delta.upsert.peers.values()} == {5}
        assert public_key(ids.index(delta.host_id) + 1) not in delta.upsert.peers
    agents.assert_converged(world.topology)
    # The same settings again: nothing to append.
    decision, _ = world.run(UpdateNetwork(name="office", mtu=1380, keepalive=5))
    assert decision.events == () and decision.result["changed"] is False


def test_a_key_given_up_and_taken_by_another_host_in_one_batch() -> None:
    """X rotates away from K1 and Y rotates onto K1 in the same batch: X must
    drop nothing it should keep (K1 is now Y's entry, not X's own)."""
    world = World()
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24"))
    key_id = world.run(CreateEnrollmentKey(network="office", uses=None))[0].result["key_id"]
    token = make_token("x", key_id, f"s{world._keys}")
    ids = [
        world.run(Join(token=token, public_key=public_key(n), name=f"h{n}", signing_key=f"k{n}"))[
            0
        ].result["host_id"]
        for n in (1, 2, 3)
    ]
    agents = Agents()
    agents.published = {h: world.topology.revision_of(h) for h in ids}
    agents.states = {h: desired_for(world.topology, h) for h in ids}  # type: ignore[misc]
    _, first = world.run(RotateHostKey(host_id=ids[0], public_key=public_key(100)))
    _, second = world.run(RotateHostKey(host_id=ids[1], public_key=public_key(1)))
    agents.publish(world.topology, first + second)
    assert {p.name for p in agents.states[ids[0]].peers.values()} == {"h2", "h3"}
    agents.assert_converged(world.topology)


def test_network_delete_leaves_hosts_with_empty_state() -> None:
    world, ids = mesh(2)
    world.run(DeleteNetwork(name="office", force=True))
    assert world.topology.nodes == {}
    assert world.topology.keys == {}
    state = desired_for(world.topology, ids[0], 1)
    assert state is not None and state.peers == {}


def test_a_delta_applies_only_to_its_base() -> None:
    state = DesiredState(host_id="h1", revision=5)
    with pytest.raises(DeltaMismatch):
        apply_delta(state, DesiredDelta(host_id="h1", revision=9, base=4))
    with pytest.raises(DeltaMismatch):
        apply_delta(state, DesiredDelta(host_id="h2", revision=9, base=5))
    assert apply_delta(state, DesiredDelta(host_id="h1", revision=9, base=5)).revision == 9


def test_version_1_states_still_decode() -> None:
    old = b'{"host_id":"h1","revision":3,"addresses":[],"listen_port":1,"mtu":1420,"peers":[]}'
    assert decode_message(old) == decode_state(old)
    assert isinstance(decode_message(old), DesiredState) and decode_message(old).revision == 3
    with pytest.raises(msgspec.ValidationError):
        decode_message(b'{"kind":"delta","host_id":"h1"}')


# Operations on a small world: joins into two networks (so hosts share one or
# both), node removals, endpoint moves, re-joins and a network delete.
OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "join",
                "remove",
                "endpoint",
                "delete",
                "recreate",
                "rotate",
                "request",
                "update",
                "rotate again",
                "leave",
                "port",
            ]
        ),
        st.integers(0, 5),
        st.sampled_from(["a", "b"]),
        st.booleans(),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_snapshots_plus_deltas_always_equal_the_derived_state(
    ops: list[tuple[str, int, str, bool]],
) -> None:
    """The protocol's one promise: whatever happens, in batches of any size, a
    host that applies its messages in order holds exactly `desired_for`."""
    world = World()
    agents = Agents()
    tokens: dict[str, str] = {}

    def network(name: str) -> None:
        world.run(CreateNetwork(name=name, cidr=f"10.{ord(name)}.0.0/24"))
        key_id = world.run(CreateEnrollmentKey(network=name, uses=None))[0].result["key_id"]
        tokens[name] = make_token("x", key_id, f"s{world._keys}")

    for name in ("a", "b"):
        network(name)
    # Start from a mesh where hosts 2 and 3 are in both networks.
    pending: list[Touched] = []
    for host in range(6):
        for net in ("a", "b")[: 2 if host in (2, 3) else 1] if host < 4 else ("b",):
            joined = world.run(
                Join(
                    token=tokens[net],
                    public_key=public_key(host),
                    name=f"h{host}",
                    signing_key=f"sk{host}",
                )
            )
            pending.extend(joined[1])
    for op, host, net, flush in ops:
        try:
            if op == "join":
                _, touched = world.run(
                    Join(
                        token=tokens[net],
                        public_key=public_key(host),
                        name=f"h{host}",
                        signing_key=f"sk{host}",
                    )
                )
            elif op == "remove":
                _, touched = world.run(RemoveNode(node=f"{net}/h{host}"))
            elif op == "endpoint":
                host_id = world.topology.host_by_public_key[public_key(host)]
                _, touched = world.run(
                    ReportEndpoint(host_id=host_id, endpoints=(f"198.51.100.{len(world.log)}",))
                )
            elif op == "rotate":
                host_id = world.topology.host_by_public_key.get(public_key(host), "")
                _, touched = world.run(
                    RotateHostKey(host_id=host_id, public_key=public_key(1000 + len(world.log)))
                )
            elif op == "request":
                _, touched = world.run(RequestKeyRotation(node=f"{net}/h{host}"))
            elif op == "update":
                settings = {"mtu": 1300 + host} if flush else {"keepalive": host}
                _, touched = world.run(UpdateNetwork(name=net, **settings))  # type: ignore[arg-type]
            elif op == "rotate again":
                # By the id its first key gave it: a host rotates any number of
                # times, and to a key from a small pool, so keys another host
                # just rotated away get taken (in the same batch, too).
                _, touched = world.run(
                    RotateHostKey(
                        host_id=host_id_for(public_key(host)),
                        public_key=public_key(2000 + len(world.log) % 5),
                    )
                )
            elif op == "leave":
                _, touched = world.run(
                    LeaveNetworks(host_id=host_id_for(public_key(host)), network=net)
                )
            elif op == "port":
                _, touched = world.run(
                    ReportEndpoint(
                        host_id=host_id_for(public_key(host)),
                        endpoints=(f"198.51.100.{len(world.log)}",),
                        listen_port=51000 + len(world.log),
                    )
                )
            elif op == "delete":
                _, touched = world.run(DeleteNetwork(name=net, force=True))
            else:
                network(net)
                touched = []
        except (Rejected, KeyError):  # refused (unknown host, no network): nothing happened
            continue
        pending.extend(touched)
        if flush:  # a batch ends: coalesced into one message per host
            agents.publish(world.topology, pending)
            pending = []
            agents.assert_converged(world.topology)
    agents.publish(world.topology, pending)
    agents.assert_converged(world.topology)


class RecordingPublisher(MemoryDesiredPublisher):
    """The in-memory publisher, also keeping every message that landed."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[DesiredMessage] = []

    async def publish(self, batch: Sequence[tuple[DesiredMessage, bytes, int]]) -> list[int | None]:
        out = await super().publish(batch)
        for (message, data, _), seq in zip(batch, out, strict=True):
            assert decode_message(data) == message
            if seq is not None:
                self.sent.append(message)
        return out


async def run_until(runner: ProjectionRunner, seq: int) -> asyncio.Task[None]:
    task = asyncio.create_task(runner.run())
    assert await runner.wait_for(seq, 10)
    await asyncio.wait_for(runner.caught_up.wait(), 10)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def stored(world: World) -> MemoryEventStore:
    store = MemoryEventStore()
    for recorded in world.log:
        await store.append([PendingEvent(recorded.subject, recorded.envelope)])
    return store


async def test_read_model_rebuilds_identically_from_the_stream(tmp_path: Path) -> None:
    world, _ = mesh(4)
    world.run(RemoveNode(node="office/h2"))
    store = await stored(world)
    head = await store.last_sequence()

    async def build(
        path: Path, publisher: RecordingPublisher
    ) -> dict[str, list[dict[str, object]]]:
        model = await ReadModel.open(path)
        try:
            await stop(await run_until(ProjectionRunner(store, model, publisher), head))
            tables = {}
            for table in ("networks", "keys", "hosts", "nodes", "checkpoint"):
                async with model.db.execute(f"SELECT * FROM {table} ORDER BY 1") as cur:
                    tables[table] = [dict(r) for r in await cur.fetchall()]
            return tables
        finally:
            await model.close()

    publisher = RecordingPublisher()
    first = await build(tmp_path / "a.sqlite3", publisher)
    assert first["checkpoint"][0]["seq"] == head
    assert len(first["nodes"]) == 3
    published_once = list(publisher.sent)
    # A replay publishes once, after catching up: one snapshot per host, at
    # the host's final revision.
    assert len(published_once) == 4
    assert all(isinstance(m, DesiredState) for m in published_once)
    assert {m.host_id: m.revision for m in published_once} == {
        h: world.topology.revision_of(h) for h in world.topology.hosts
    }
    # Delete the database: the same state comes back, and nothing is re-published.
    (tmp_path / "a.sqlite3").unlink()
    second = await build(tmp_path / "a.sqlite3", publisher)
    assert second == first
    assert publisher.sent == published_once


async def test_the_read_model_checkpoints_its_wal_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer never checkpoints inside a commit; every so many rows one is
    run on aiosqlite's thread, and then the database file alone has the rows."""
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY_ROWS", 5)
    world, _ = mesh(4)
    store = await stored(world)
    model = await ReadModel.open(tmp_path / "m.sqlite3")
    try:
        head = await store.last_sequence()
        await stop(await run_until(ProjectionRunner(store, model, RecordingPublisher()), head))
        assert model._checkpointing is not None
        await model._checkpointing
        (tmp_path / "copy").mkdir()
        copy = tmp_path / "copy" / "m.sqlite3"
        copy.write_bytes((tmp_path / "m.sqlite3").read_bytes())  # without the WAL
        alone = await ReadModel.open(copy)
        try:
            assert len((await alone.load_topology()).hosts) == 4
        finally:
            await alone.close()
    finally:
        await model.close()


async def test_a_read_model_of_another_schema_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    model = await ReadModel.open(path)
    await model.db.execute("UPDATE meta SET value = '1' WHERE key = 'schema'")
    await model.db.execute("INSERT INTO checkpoint VALUES ('topology', 99)")
    await model.db.commit()
    await model.close()
    model = await ReadModel.open(path)
    try:
        assert await model.checkpoint() == 0
    finally:
        await model.close()


async def test_live_changes_are_published_as_deltas_and_coalesced(tmp_path: Path) -> None:
    world, ids = mesh(3)
    store = await stored(world)
    publisher = RecordingPublisher()
    model = await ReadModel.open(tmp_path / "m.sqlite3")
    runner = ProjectionRunner(store, model, publisher)
    task = await run_until(runner, await store.last_sequence())
    try:
        publisher.sent.clear()
        # Two endpoint moves appended together reach the runner as one batch:
        # every host gets one message covering both.
        first = world.run(ReportEndpoint(host_id=ids[0], endpoints=("198.51.100.1",)))
        second = world.run(ReportEndpoint(host_id=ids[1], endpoints=("198.51.100.2",)))
        assert first and second
        await store.append([PendingEvent(r.subject, r.envelope) for r in world.log[-2:]])
        assert await runner.wait_for(len(world.log), 10)
        by_host = {m.host_id: m for m in publisher.sent}
        assert len(publisher.sent) == 3 == len(by_host)
        third = by_host[ids[2]]
        assert isinstance(third, DesiredDelta)
        assert sorted(p.endpoint or "" for p in third.upsert.peers.values()) == [
            "198.51.100.1:51820",
            "198.51.100.2:51820",
        ]
        assert third.revision == len(world.log)
    finally:
        await stop(task)
        await model.close()


async def test_two_replicas_leave_one_chain_per_subject(tmp_path: Path) -> None:
    """Two projections publishing the same events with different batch
    boundaries onto the same subjects: each subject stays one chain (every
    delta follows the message before it) and reads as `desired_for`."""
    world, ids = mesh(4)
    store = await stored(world)
    publisher = MemoryDesiredPublisher()
    models = [await ReadModel.open(tmp_path / f"r{n}.sqlite3") for n in (1, 2)]
    runners = [
        ProjectionRunner(store, models[0], publisher, max_batch=1),
        ProjectionRunner(store, models[1], publisher, max_batch=3),
    ]
    tasks = [await run_until(r, await store.last_sequence()) for r in runners]
    try:
        key_id = next(iter(world.topology.keys))
        token = make_token("x", key_id, "s2")
        commands: list[AnyCommand] = [
            Join(token=token, public_key=public_key(7), name="h7"),
            ReportEndpoint(host_id=ids[0], endpoints=("198.51.100.1",)),
            RemoveNode(node="office/h2"),
            ReportEndpoint(host_id=ids[2], endpoints=("198.51.100.3",)),
            Join(token=token, public_key=public_key(8), name="h8"),
        ]
        for command in commands:
            before = len(world.log)
            world.run(command)
            await store.append([PendingEvent(r.subject, r.envelope) for r in world.log[before:]])
        for runner in runners:
            assert await runner.wait_for(len(world.log), 10)
        for host_id in world.topology.hosts:
            feed = DesiredFeed(host_id)
            chain = publisher.messages(host_id)
            for message in chain:
                assert feed.take(message) is not Outcome.GAP, (host_id, chain)
            assert feed.state == desired_for(world.topology, host_id)
    finally:
        for task in tasks:
            await stop(task)
        for model in models:
            await model.close()
