"""The projection runner: the only I/O around the pure fold.

It follows NETMESH_EVENTS from its checkpoint, folds each event into the
topology, writes the touched rows, the changed desired states and the
checkpoint in one SQLite transaction, then publishes the changed desired states.

While catching up (replaying what the stream held when it started) it publishes
nothing: old revisions would only make agents' subjects go backwards. Once
caught up it compares each host's desired state with the last one on the host's
subject and publishes what differs: that also repairs a crash between commit
and publish.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog

from events.desired import DesiredState
from events.envelope import RecordedEvent
from events.store import EventStore
from projections.desired import desired_for
from projections.sqlite import ReadModel
from projections.topology import Topology, affected_hosts, evolve

log = structlog.get_logger("netmesh.projections")

# While replaying, commit every this many events (one SQLite commit per event
# is what bounds a rebuild otherwise); live events are committed one by one.
REPLAY_BATCH = 500


class DesiredPublisher(Protocol):
    async def publish(self, state: DesiredState) -> None:
        """Publish a host's desired state (idempotent for the same host and revision)."""
        ...

    async def last_revision(self, host_id: str) -> int | None:
        """Revision of the last state published for the host, None if none."""
        ...


def same_config(a: DesiredState | None, b: DesiredState | None) -> bool:
    """Equal apart from the revision."""
    if a is None or b is None:
        return a is b
    return (
        a.addresses == b.addresses
        and a.peers == b.peers
        and (
            a.listen_port,
            a.mtu,
            a.protocol,
        )
        == (b.listen_port, b.mtu, b.protocol)
    )


class ProjectionRunner:
    def __init__(self, store: EventStore, model: ReadModel, publisher: DesiredPublisher) -> None:
        self._store = store
        self._model = model
        self._publisher = publisher
        self.topology = Topology()
        self.desired: dict[str, DesiredState] = {}
        self.checkpoint = 0
        self._progress = asyncio.Condition()
        self.caught_up = asyncio.Event()

    async def run(self) -> None:
        """Follow the stream until the store is closed."""
        self.topology = await self._model.load_topology()
        self.desired = await self._model.load_desired()
        self.checkpoint = await self._model.checkpoint()
        head = await self._store.last_sequence()
        log.info("projection starting", checkpoint=self.checkpoint, head=head)
        if self.checkpoint >= head:
            await self._finish_catch_up()
        async for recorded in self._store.follow(self.checkpoint + 1):
            live = self.caught_up.is_set()
            commit = live or recorded.seq >= head or recorded.seq - self.checkpoint >= REPLAY_BATCH
            await self._apply(recorded, publish=live, commit=commit)
            if not live and recorded.seq >= head:
                await self._finish_catch_up()

    async def _apply(self, recorded: RecordedEvent, *, publish: bool, commit: bool) -> None:
        seq = recorded.seq
        touched = evolve(self.topology, recorded)
        changed: list[DesiredState] = []
        for host_id in sorted(affected_hosts(self.topology, touched)):
            state = desired_for(self.topology, host_id, seq)
            if state is not None and not same_config(state, self.desired.get(host_id)):
                changed.append(state)
        await self._model.commit_event(self.topology, touched, changed, seq, commit=commit)
        for state in changed:
            self.desired[state.host_id] = state
        if commit:
            async with self._progress:
                self.checkpoint = seq
                self._progress.notify_all()
        if publish:
            for state in changed:
                await self._publish(state)

    async def _publish(self, state: DesiredState) -> None:
        """Publish, retrying until it lands: the projection must not move past a
        desired state that agents never got (it would only be repaired at restart)."""
        delay = 0.1
        while True:
            try:
                await self._publisher.publish(state)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "desired state not published, retrying",
                    host_id=state.host_id,
                    revision=state.revision,
                    error=repr(exc),
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _finish_catch_up(self) -> None:
        republished = 0
        for host_id, state in sorted(self.desired.items()):
            last = await self._publisher.last_revision(host_id)
            # Only fill in what is missing or older: another replica may already
            # have published a newer revision while this one was catching up.
            if last is None or last < state.revision:
                await self._publish(state)
                republished += 1
        self.caught_up.set()
        log.info(
            "projection caught up",
            checkpoint=self.checkpoint,
            hosts=len(self.desired),
            republished=republished,
        )

    async def wait_for(self, seq: int, timeout: float) -> bool:
        """Wait until the checkpoint reaches `seq`; False on timeout."""
        async with self._progress:
            try:
                await asyncio.wait_for(
                    self._progress.wait_for(lambda: self.checkpoint >= seq), timeout
                )
            except TimeoutError:
                return False
        return True
