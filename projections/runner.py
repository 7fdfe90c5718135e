"""The projection runner: the only I/O around the pure fold.

It follows NETMESH_EVENTS from its checkpoint, folds events into the topology,
writes the touched rows and the checkpoint in one SQLite transaction, then
publishes one desired-state message (snapshot or delta) per host whose
revision moved.

Events are taken in batches of whatever has arrived: while one batch is being
published the next one queues up, so a burst of changes is coalesced into one
message per host without a timer on the critical path.

While catching up (replaying what the stream held when it started) it computes
no desired state at all. Once caught up it learns each host's published
revision from the desired stream (a headers-only scan) and publishes a snapshot
to every host that is missing or behind: that also repairs a crash between
commit and publish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import structlog

from events.desired import DesiredDelta, DesiredMessage, DesiredState, desired_encoder
from events.envelope import RecordedEvent
from events.store import EventStore
from projections.desired import DesiredChanges, PeerCache, desired_for, messages
from projections.sqlite import ReadModel
from projections.topology import Topology, Touched, evolve

log = structlog.get_logger("netmesh.projections")

# At most this many events per batch (one SQLite transaction, one round of messages).
MAX_BATCH = 1000
# Catch-up snapshots are published this many at a time (they can be large).
SNAPSHOT_CHUNK = 100
# Rough size of one peer entry, to guess a snapshot's size when it was not
# published by this process (for compaction only).
PEER_ENTRY_BYTES = 150


class DesiredPublisher(Protocol):
    async def publish(self, batch: Sequence[tuple[DesiredMessage, bytes]]) -> None:
        """Publish encoded messages, in order; return when all are stored.
        Idempotent per message (a retry after a partial failure is safe)."""
        ...

    async def published_revisions(self) -> dict[str, int]:
        """host -> revision of the last message on its subject."""
        ...


class ProjectionRunner:
    def __init__(
        self,
        store: EventStore,
        model: ReadModel,
        publisher: DesiredPublisher,
        *,
        snapshots_only: bool = False,
    ) -> None:
        self._store = store
        self._model = model
        self._publisher = publisher
        # The Netmaker-like baseline for benchmarks: a full state on every change.
        self._snapshots_only = snapshots_only
        self.topology = Topology()
        self.checkpoint = 0
        # host -> revision its subject is at (after catch-up).
        self.published: dict[str, int] = {}
        # Compaction: bytes of deltas since a host's last snapshot, and that snapshot's size.
        self._since_snapshot: dict[str, int] = {}
        self._snapshot_size: dict[str, int] = {}
        self._progress = asyncio.Condition()
        self.caught_up = asyncio.Event()
        self.messages_published = 0
        self.bytes_published = 0

    async def run(self) -> None:
        """Follow the stream until the store is closed."""
        self.topology = await self._model.load_topology()
        self.checkpoint = await self._model.checkpoint()
        head = await self._store.last_sequence()
        log.info("projection starting", checkpoint=self.checkpoint, head=head)
        if self.checkpoint >= head:
            await self._finish_catch_up()
        async for batch in self._store.follow_batches(self.checkpoint + 1, MAX_BATCH):
            await self._apply(batch, head)

    async def _apply(self, batch: list[RecordedEvent], head: int) -> None:
        live = self.caught_up.is_set()
        touched: list[Touched] = []
        changes = DesiredChanges()
        for recorded in batch:
            one = evolve(self.topology, recorded)
            touched.append(one)
            if live:
                changes.add(one)
        seq = batch[-1].seq
        await self._model.commit(self.topology, Touched.union(touched), seq)
        async with self._progress:
            self.checkpoint = seq
            self._progress.notify_all()
        if live:
            if changes:
                await self._publish_changes(changes)
        elif seq >= head:
            await self._finish_catch_up()

    async def _publish_changes(self, changes: DesiredChanges) -> None:
        found = messages(
            self.topology, changes, self.published, snapshots_only=self._snapshots_only
        )
        cache = PeerCache(self.topology)
        batch: list[tuple[DesiredMessage, bytes]] = []
        for message in found:
            data = desired_encoder.encode(message)
            if isinstance(message, DesiredDelta) and self._compaction_due(message.host_id, data):
                # Deltas since the last snapshot outweigh a snapshot: send one,
                # so that the subject (rolled up) stays about a snapshot's size.
                snapshot = desired_for(self.topology, message.host_id, message.revision, cache)
                assert snapshot is not None
                message, data = snapshot, desired_encoder.encode(snapshot)
            batch.append((message, data))
        await self._publish(batch)

    def _compaction_due(self, host_id: str, delta: bytes) -> bool:
        size = self._snapshot_size.get(host_id)
        if size is None:
            peers = sum(
                len(self.topology.nodes_by_network.get(n, ()))
                for n in self.topology.networks_of_host(host_id)
            )
            size = self._snapshot_size[host_id] = 200 + PEER_ENTRY_BYTES * peers
        return self._since_snapshot.get(host_id, 0) + len(delta) > size

    async def _publish(self, batch: list[tuple[DesiredMessage, bytes]]) -> None:
        """Publish, retrying until it lands: the projection must not move past a
        desired state that agents never got (it would only be repaired at restart)."""
        if not batch:
            return
        delay = 0.1
        while True:
            try:
                await self._publisher.publish(batch)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "desired states not published, retrying",
                    messages=len(batch),
                    error=repr(exc),
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        for message, data in batch:
            host_id = message.host_id
            self.published[host_id] = message.revision
            if isinstance(message, DesiredState):
                self._snapshot_size[host_id] = len(data)
                self._since_snapshot[host_id] = 0
            else:
                self._since_snapshot[host_id] = self._since_snapshot.get(host_id, 0) + len(data)
            self.bytes_published += len(data)
        self.messages_published += len(batch)

    async def _finish_catch_up(self) -> None:
        published = await self._publisher.published_revisions()
        cache = PeerCache(self.topology)
        behind = [
            host_id
            for host_id in sorted(self.topology.hosts)
            # Only fill in what is missing or older: another replica may already
            # have published a newer revision while this one was catching up.
            if published.get(host_id, -1) < self.topology.revision_of(host_id)
        ]
        self.published = {h: r for h, r in published.items() if h in self.topology.hosts}
        for start in range(0, len(behind), SNAPSHOT_CHUNK):
            chunk: list[tuple[DesiredMessage, bytes]] = []
            for host_id in behind[start : start + SNAPSHOT_CHUNK]:
                state = desired_for(self.topology, host_id, cache=cache)
                assert state is not None
                chunk.append((state, desired_encoder.encode(state)))
            await self._publish(chunk)
        self.caught_up.set()
        log.info(
            "projection caught up",
            checkpoint=self.checkpoint,
            hosts=len(self.topology.hosts),
            republished=len(behind),
        )

    async def wait_for(self, seq: int, timeout: float) -> bool:
        """Wait until the checkpoint reaches `seq`; False on timeout."""
        if self.checkpoint >= seq:
            return True
        async with self._progress:
            try:
                async with asyncio.timeout(timeout):
                    await self._progress.wait_for(lambda: self.checkpoint >= seq)
            except TimeoutError:
                return False
        return True
