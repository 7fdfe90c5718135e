"""The write model: the topology commands are decided against, kept current
from the event stream by one follower."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog

from events.envelope import RecordedEvent
from events.store import EventStore, PendingEvent
from projections.topology import Topology, evolve

log = structlog.get_logger("netmesh.controlplane")

# Called before each event is applied; what it returns (if anything) is called
# once the event is applied (to compare before and after).
Observer = Callable[[Topology, RecordedEvent], Callable[[], None] | None]


class WriteModel:
    def __init__(self, store: EventStore) -> None:
        self._store = store
        self.topology = Topology()
        self._progress = asyncio.Condition()
        self.observer: Observer | None = None
        self.last_time = 0.0  # the time of the event at topology.last_seq

    async def follow(self) -> None:
        """Apply every event, from the first, until the store is closed."""
        async for recorded in self._store.follow(1):
            if recorded.seq <= self.topology.last_seq:
                continue  # applied already: our own, on append (`apply_own`)
            self._apply(recorded)
            async with self._progress:
                self._progress.notify_all()

    def _apply(self, recorded: RecordedEvent) -> None:
        refused = self.topology.refused
        after = self.observer(self.topology, recorded) if self.observer else None
        evolve(self.topology, recorded)
        if recorded.seq >= self.topology.last_seq:
            self.last_time = recorded.envelope.time
        if after is not None:
            after()
        if self.topology.refused > refused:
            log.warning(
                "event not believed: not signed by this control plane",
                seq=recorded.seq,
                subject=recorded.subject,
                type=recorded.envelope.type,
                signature=recorded.signature,
            )

    async def apply_own(self, seq: int, events: Sequence[PendingEvent]) -> None:
        """Until the model has `events`, which this process appended as one
        batch ending at `seq`. When they come right after the last event the
        model has (nothing else was appended in between), they are applied now
        rather than after a trip back through the stream: the next command,
        waiting for the write lock, decides sooner. Raises TimeoutError."""
        first = seq - len(events) + 1
        if self.topology.last_seq != first - 1:
            await self.wait_for(seq)
            return
        for offset, pending in enumerate(events):
            self._apply(self._store.as_followed(first + offset, pending))
        async with self._progress:
            self._progress.notify_all()

    async def wait_for(self, seq: int, timeout: float = 10.0) -> None:
        """Until the model has applied `seq`. Raises TimeoutError."""
        async with self._progress:
            if self.topology.last_seq >= seq:
                return
            # asyncio.timeout, not wait_for: no extra task per command.
            async with asyncio.timeout(timeout):
                await self._progress.wait_for(lambda: self.topology.last_seq >= seq)

    async def catch_up(self, timeout: float = 120.0) -> None:
        """Until the model has applied everything the stream holds now."""
        await self.wait_for(await self._store.last_sequence(), timeout)
