"""The event store: what the control plane needs from NETMESH_EVENTS.

Two implementations pass one contract suite (tests/test_store_contract.py):
`MemoryEventStore` here, for unit tests and simulations, and
`events.jetstream.JetStreamEventStore`, the real one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import msgspec

from events.envelope import Envelope, RecordedEvent, decode_envelope, encode_envelope

MAX_BATCH = 1000  # JetStream's limit on one atomic batch


class PendingEvent(msgspec.Struct, frozen=True):
    """An event about to be appended, with the subject of its aggregate."""

    subject: str
    envelope: Envelope


class Expectation(msgspec.Struct, frozen=True):
    """Optimistic-concurrency check: the last stream sequence among subjects
    matching `subject_filter` must be `last_seq` (0 = none yet).

    `subject_filter` is normally one aggregate's subject; a wildcard
    (`netmesh.ev.network.*`) guards a decision that spans aggregates, such as
    "no two networks overlap".
    """

    subject_filter: str
    last_seq: int


class StoreError(Exception):
    retryable = False


class ConcurrencyConflict(StoreError):
    """Another writer appended first: catch up and decide again."""

    retryable = True


class DuplicateAppend(StoreError):
    """This command's events were already appended (same message ids)."""


class StoreUnavailable(StoreError):
    """The store did not answer in time; the append may or may not have happened."""

    retryable = True


class EventStore(Protocol):
    async def append(
        self,
        events: Sequence[PendingEvent],
        *,
        expect: Sequence[Expectation] = (),
        msg_id: str | None = None,
    ) -> int:
        """Append all events atomically, or none. Returns the last sequence.

        Each expectation is checked before anything is stored. `msg_id` makes a
        retried append harmless. Raises ConcurrencyConflict, DuplicateAppend,
        StoreUnavailable, ValueError (empty or too large batch).
        """
        ...

    async def read_subject(self, subject: str) -> list[RecordedEvent]:
        """All events of one aggregate, in order."""
        ...

    async def last_sequence(self) -> int:
        """The stream's last sequence (0 when empty)."""
        ...

    async def read(self, seq: int) -> RecordedEvent | None:
        """The event at stream sequence `seq`, checked as `follow` checks it
        (None: no message there)."""
        ...

    def as_followed(self, seq: int, pending: PendingEvent) -> RecordedEvent:
        """The event this store appended at `seq`, as `follow()` will deliver
        it (through the wire format, with its signature checked): for a writer
        that applies its own events without waiting for them to come back."""
        ...

    def follow(self, from_seq: int = 1) -> AsyncIterator[RecordedEvent]:
        """Every event from `from_seq` on, in order, then live ones, until `close()`."""
        ...

    def follow_batches(
        self, from_seq: int = 1, max_batch: int = 1000
    ) -> AsyncIterator[list[RecordedEvent]]:
        """`follow`, in lists of what has arrived (1 to `max_batch` events each):
        a consumer that is slower than the stream gets bigger batches."""
        ...

    async def close(self) -> None:
        """End every `follow()` iteration."""
        ...


def check_batch(
    events: Sequence[PendingEvent], expect: Sequence[Expectation]
) -> list[Expectation | None]:
    """Validate a batch; return the expectation each event carries (at most one,
    on the first event it guards: JetStream checks one per message)."""
    if not events:
        raise ValueError("nothing to append")
    if len(events) > MAX_BATCH:
        raise ValueError(f"batch of {len(events)} events exceeds {MAX_BATCH}")
    placed: list[Expectation | None] = [None] * len(events)
    for expectation in expect:
        for i, pending in enumerate(events):
            if placed[i] is None and subject_matches(expectation.subject_filter, pending.subject):
                placed[i] = expectation
                break
        else:
            raise ValueError(f"expectation on {expectation.subject_filter} guards no event")
    return placed


class MemoryEventStore:
    """In-process event store with the same semantics as the JetStream one."""

    def __init__(self) -> None:
        self._log: list[RecordedEvent] = []
        self._msg_ids: set[str] = set()
        self._changed = asyncio.Condition()
        self._closed = False

    def _last_for(self, subject_filter: str) -> int:
        for recorded in reversed(self._log):
            if subject_matches(subject_filter, recorded.subject):
                return recorded.seq
        return 0

    async def append(
        self,
        events: Sequence[PendingEvent],
        *,
        expect: Sequence[Expectation] = (),
        msg_id: str | None = None,
    ) -> int:
        check_batch(events, expect)
        if msg_id is not None and msg_id in self._msg_ids:
            raise DuplicateAppend(msg_id)
        for expectation in expect:
            actual = self._last_for(expectation.subject_filter)
            if actual != expectation.last_seq:
                raise ConcurrencyConflict(
                    f"{expectation.subject_filter}: expected {expectation.last_seq}, at {actual}"
                )
        async with self._changed:
            for pending in events:
                # Round-trip through the wire format, as the real store does.
                envelope = decode_envelope(encode_envelope(pending.envelope))
                seq = len(self._log) + 1
                self._log.append(RecordedEvent(seq=seq, subject=pending.subject, envelope=envelope))
            if msg_id is not None:
                self._msg_ids.add(msg_id)
            self._changed.notify_all()
        return len(self._log)

    async def read_subject(self, subject: str) -> list[RecordedEvent]:
        return [r for r in self._log if r.subject == subject]

    async def last_sequence(self) -> int:
        return len(self._log)

    async def read(self, seq: int) -> RecordedEvent | None:
        return self._log[seq - 1] if 1 <= seq <= len(self._log) else None

    def as_followed(self, seq: int, pending: PendingEvent) -> RecordedEvent:
        recorded = self._log[seq - 1]
        assert recorded.subject == pending.subject
        return recorded

    async def follow(self, from_seq: int = 1) -> AsyncIterator[RecordedEvent]:
        async for batch in self.follow_batches(from_seq):
            for recorded in batch:
                yield recorded

    async def follow_batches(
        self, from_seq: int = 1, max_batch: int = 1000
    ) -> AsyncIterator[list[RecordedEvent]]:
        next_seq = max(from_seq, 1)
        while not self._closed:
            if next_seq <= len(self._log):
                batch = self._log[next_seq - 1 : next_seq - 1 + max_batch]
                next_seq += len(batch)
                yield batch
                continue
            async with self._changed:
                while next_seq > len(self._log) and not self._closed:
                    await self._changed.wait()

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()


def subject_matches(subject_filter: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` the rest."""
    want = subject_filter.split(".")
    have = subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(want) == len(have)
