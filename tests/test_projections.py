"""The fold and the desired-state derivation, and the SQLite read model."""

from __future__ import annotations

from pathlib import Path

from events.commands import (
    CreateEnrollmentKey,
    CreateNetwork,
    DeleteNetwork,
    Join,
    RemoveNode,
    ReportEndpoint,
)
from events.desired import PeerConfig
from events.store import MemoryEventStore, PendingEvent
from events.tokens import make_token
from projections.desired import desired_for
from projections.runner import ProjectionRunner
from projections.sqlite import ReadModel
from projections.topology import affected_hosts
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
    assert state.listen_port == 51820 and state.mtu == 1420
    by_name = {p.name: p for p in state.peers}
    assert set(by_name) == {"h2", "h3"}
    assert by_name["h2"] == PeerConfig(
        public_key=public_key(2),
        allowed_ips=("10.10.0.2/32",),
        endpoint="192.0.2.2:51820",
        persistent_keepalive=10,
        name="h2",
    )


def test_removed_node_disappears_from_peers_and_its_host_is_emptied() -> None:
    world, ids = mesh(3)
    _, touched = world.run(RemoveNode(node="office/h3"))
    assert affected_hosts(world.topology, touched[0]) == set(ids)
    for host_id in ids[:2]:
        state = desired_for(world.topology, host_id, 1)
        assert state is not None
        assert public_key(3) not in {p.public_key for p in state.peers}
    emptied = desired_for(world.topology, ids[2], 1)
    assert emptied is not None and emptied.addresses == () and emptied.peers == ()


def test_endpoint_change_touches_the_host_and_its_peers_only() -> None:
    world, ids = mesh(3)
    world.run(CreateNetwork(name="lab", cidr="10.20.0.0/24"))
    _, touched = world.run(ReportEndpoint(host_id=ids[1], endpoints=("198.51.100.9",)))
    assert affected_hosts(world.topology, touched[0]) == set(ids)
    peer = {p.name: p for p in desired_for(world.topology, ids[0], 1).peers}["h2"]  # type: ignore[union-attr]
    assert peer.endpoint == "198.51.100.9:51820"


def test_network_delete_leaves_hosts_with_empty_state() -> None:
    world, ids = mesh(2)
    world.run(DeleteNetwork(name="office", force=True))
    assert world.topology.nodes == {}
    assert world.topology.keys == {}
    state = desired_for(world.topology, ids[0], 1)
    assert state is not None and state.peers == ()


class RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, int]] = []
        self.last: dict[str, int] = {}

    async def publish(self, state: object) -> None:
        host_id, revision = state.host_id, state.revision  # type: ignore[attr-defined]
        self.published.append((host_id, revision))
        self.last[host_id] = revision

    async def last_revision(self, host_id: str) -> int | None:
        return self.last.get(host_id)


async def run_until(runner: ProjectionRunner, seq: int) -> None:
    import asyncio

    task = asyncio.create_task(runner.run())
    try:
        assert await runner.wait_for(seq, 10)
        await asyncio.wait_for(runner.caught_up.wait(), 10)
    finally:
        task.cancel()
        with __import__("contextlib").suppress(asyncio.CancelledError):
            await task


async def test_read_model_rebuilds_identically_from_the_stream(tmp_path: Path) -> None:
    world, _ = mesh(4)
    world.run(RemoveNode(node="office/h2"))
    store = MemoryEventStore()
    for recorded in world.log:
        await store.append([PendingEvent(recorded.subject, recorded.envelope)])
    head = await store.last_sequence()

    async def build(
        path: Path, publisher: RecordingPublisher
    ) -> dict[str, list[dict[str, object]]]:
        model = await ReadModel.open(path)
        try:
            await run_until(ProjectionRunner(store, model, publisher), head)
            tables = {}
            for table in ("networks", "keys", "hosts", "nodes", "desired", "checkpoint"):
                async with model.db.execute(f"SELECT * FROM {table} ORDER BY 1") as cur:
                    tables[table] = [dict(r) for r in await cur.fetchall()]
            return tables
        finally:
            await model.close()

    publisher = RecordingPublisher()
    first = await build(tmp_path / "a.sqlite3", publisher)
    assert first["checkpoint"][0]["seq"] == head
    assert len(first["nodes"]) == 3
    published_once = list(publisher.published)
    # A replay publishes once, after catching up, the final revisions only.
    assert len(published_once) == len(first["desired"]) == 4
    # Delete the database: the same state comes back, and nothing is re-published.
    (tmp_path / "a.sqlite3").unlink()
    second = await build(tmp_path / "a.sqlite3", publisher)
    assert second == first
    assert publisher.published == published_once
