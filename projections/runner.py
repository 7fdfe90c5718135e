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
from projections.desired import Builders, DesiredChanges, fold, messages
from projections.sqlite import ReadModel
from projections.topology import Topology, Touched

log = structlog.get_logger("netmesh.projections")

# At most this many events per batch (one SQLite transaction, one round of messages).
MAX_BATCH = 1000
# Catch-up snapshots are published this many at a time (they can be large).
SNAPSHOT_CHUNK = 100
# Rough size of one peer entry, to guess a snapshot's size when it was not
# published by this process (for compaction only).
PEER_ENTRY_BYTES = 150


class DesiredPublisher(Protocol):
    async def publish(self, batch: Sequence[tuple[DesiredMessage, bytes, int]]) -> list[int | None]:
        """Append (message, encoded, expected last stream sequence of its
        subject) in order; for each, its stream sequence, or None when the
        subject had moved on. Raises on other failures (a retry is safe)."""
        ...

    async def published(self) -> dict[str, tuple[int, int]]:
        """host -> (revision, stream sequence) of the last message on its subject."""
        ...

    async def last(self, host_id: str) -> tuple[int, int] | None:
        """(revision, stream sequence) of the last message on one subject."""
        ...


class DesiredCounter(Protocol):
    def desired_published(self, kind: str, size: int) -> None:
        """A desired-state message (`snapshot` or `delta`) of `size` bytes landed."""
        ...


class _CountNothing:
    def desired_published(self, kind: str, size: int) -> None:
        pass


class ProjectionRunner:
    def __init__(
        self,
        store: EventStore,
        model: ReadModel,
        publisher: DesiredPublisher,
        *,
        snapshots_only: bool = False,
        max_batch: int = MAX_BATCH,
        metrics: DesiredCounter | None = None,
    ) -> None:
        self._store = store
        self._metrics = metrics if metrics is not None else _CountNothing()
        self._max_batch = max_batch
        self._model = model
        self._publisher = publisher
        # The Netmaker-like baseline for benchmarks: a full state on every change.
        self._snapshots_only = snapshots_only
        self.topology = Topology()
        self.checkpoint = 0
        self.checkpoint_time = 0.0  # the time of the event at the checkpoint (lag, in seconds)
        # host -> revision its subject is at, and the stream sequence of that
        # message (appends expect it: one chain per subject, whatever replicas do).
        self.published: dict[str, int] = {}
        self._subject_seq: dict[str, int] = {}
        # Compaction: bytes of deltas since a host's last snapshot, and that snapshot's size.
        self._since_snapshot: dict[str, int] = {}
        self._snapshot_size: dict[str, int] = {}
        self._progress = asyncio.Condition()
        self.caught_up = asyncio.Event()
        # Events up to here have their desired states published (live only).
        self.published_through = 0
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
        async for batch in self._store.follow_batches(self.checkpoint + 1, self._max_batch):
            await self._apply(batch, head)

    async def _apply(self, batch: list[RecordedEvent], head: int) -> None:
        live = self.caught_up.is_set()
        touched: list[Touched] = []
        changes = DesiredChanges()
        for recorded in batch:
            one = fold(self.topology, recorded)
            touched.append(one)
            if live:
                changes.add(one)
        seq = batch[-1].seq
        await self._model.commit(self.topology, Touched.union(touched), seq)
        async with self._progress:
            self.checkpoint = seq
            self.checkpoint_time = batch[-1].envelope.time
            self._progress.notify_all()
        if live:
            if changes:
                await self._publish_changes(changes)
            async with self._progress:
                self.published_through = seq
                self._progress.notify_all()
        elif seq >= head:
            await self._finish_catch_up()

    async def _publish_changes(self, changes: DesiredChanges) -> None:
        builders = Builders(self.topology)
        found = messages(
            self.topology,
            changes,
            self.published,
            snapshots_only=self._snapshots_only,
            builders=builders,
        )
        batch: list[tuple[DesiredMessage, bytes]] = []
        for message in found:
            data = desired_encoder.encode(message)
            if isinstance(message, DesiredDelta) and self._compaction_due(message.host_id, data):
                # Deltas since the last snapshot outweigh a snapshot: send one,
                # so that the subject (rolled up) stays about a snapshot's size.
                snapshot = builders.state(message.host_id, message.revision)
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
        """Publish, retrying until each message landed or was overtaken: the
        projection must not move past a desired state that agents never got."""
        moved: list[DesiredMessage] = []
        for (message, data), seq in zip(batch, await self._publish_retrying(batch), strict=True):
            if seq is None:
                moved.append(message)
            else:
                self._landed(message, data, seq)
        for message in moved:
            await self._resolve(message)

    async def _publish_retrying(
        self, batch: list[tuple[DesiredMessage, bytes]]
    ) -> list[int | None]:
        if not batch:
            return []
        outgoing = [(m, d, self._subject_seq.get(m.host_id, 0)) for m, d in batch]
        delay = 0.1
        while True:
            try:
                return await self._publisher.publish(outgoing)
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

    def _landed(self, message: DesiredMessage, data: bytes, seq: int) -> None:
        host_id = message.host_id
        self.published[host_id] = message.revision
        self._subject_seq[host_id] = seq
        if isinstance(message, DesiredState):
            self._snapshot_size[host_id] = len(data)
            self._since_snapshot[host_id] = 0
        else:
            self._since_snapshot[host_id] = self._since_snapshot.get(host_id, 0) + len(data)
        self.bytes_published += len(data)
        self.messages_published += 1
        self._metrics.desired_published(
            "delta" if isinstance(message, DesiredDelta) else "snapshot", len(data)
        )

    async def _resolve(self, message: DesiredMessage) -> None:
        """The host's subject moved on without us (another replica, or our own
        earlier attempt that did land). If it already holds this revision or a
        newer one, nothing is missing; otherwise a snapshot goes after what is
        there, so that the chain on the subject stays whole."""
        await self._snapshot_after_subject(message.host_id, unless_at=message.revision)

    async def resend_snapshot(self, host_id: str) -> bool:
        """Publish a host's whole state after whatever its subject holds (an
        agent asked: its subject does not chain). False if unknown or not
        caught up yet."""
        if not self.caught_up.is_set() or host_id not in self.topology.hosts:
            return False
        return await self._snapshot_after_subject(host_id)

    async def _snapshot_after_subject(self, host_id: str, *, unless_at: int | None = None) -> bool:
        """Append the host's whole state right after the last message on its
        subject (re-read each attempt: it may keep moving); with `unless_at`,
        nothing when the subject already holds that revision or a newer one."""
        for _ in range(10):
            last = await self._publisher.last(host_id)
            revision, seq = last if last is not None else (0, 0)
            self.published[host_id] = revision
            self._subject_seq[host_id] = seq
            if last is not None and unless_at is not None and revision >= unless_at:
                return True
            state = Builders(self.topology).state(host_id)
            if state is None:
                return False
            data = desired_encoder.encode(state)
            (landed,) = await self._publish_retrying([(state, data)])
            if landed is not None:
                self._landed(state, data, landed)
                return True
        log.warning("desired state subject keeps moving; giving up for now", host_id=host_id)
        return False

    async def _finish_catch_up(self) -> None:
        published = await self._publisher.published()
        builders = Builders(self.topology)
        behind = [
            host_id
            for host_id in sorted(self.topology.hosts)
            # Only fill in what is missing or older: another replica may already
            # have published a newer revision while this one was catching up.
            if published.get(host_id, (-1, 0))[0] < self.topology.revision_of(host_id)
        ]
        self.published = {h: r for h, (r, _) in published.items() if h in self.topology.hosts}
        self._subject_seq = {h: q for h, (_, q) in published.items() if h in self.topology.hosts}
        for start in range(0, len(behind), SNAPSHOT_CHUNK):
            chunk: list[tuple[DesiredMessage, bytes]] = []
            for host_id in behind[start : start + SNAPSHOT_CHUNK]:
                state = builders.state(host_id)
                assert state is not None
                chunk.append((state, desired_encoder.encode(state)))
            await self._publish(chunk)
        async with self._progress:
            self.published_through = self.checkpoint
            self._progress.notify_all()
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

    async def wait_published(self, seq: int, timeout: float) -> bool:
        """Wait until the desired states that event `seq` changed are published
        (or were never to be: caught up past it); False on timeout."""
        async with self._progress:
            try:
                async with asyncio.timeout(timeout):
                    await self._progress.wait_for(lambda: self.published_through >= seq)
            except TimeoutError:
                return False
        return True
