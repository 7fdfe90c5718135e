"""Answers as of a point of the log (`--at SEQ|TIME`, `events diff`): the
stream read from its first event up to the point (MACs checked, as the
projection reads it), folded by `projections.timetravel.Replay`, and written
into a read model in memory that the ordinary queries then read.

A few recent past read models are kept (by the sequence they end at): a
point's past never changes (the log is append-only), so a kept one answers
as a new replay would, only sooner.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import cast

from controlplane.rules.base import Rejected
from events.commands import ErrorCode
from events.envelope import RecordedEvent
from events.logfilter import Point
from events.store import EventStore
from projections.sqlite import ReadModel
from projections.timetravel import Replay, everything
from projections.topology import Topology

KEPT = 4


@dataclass
class Past:
    seq: int  # the last event in it (0: before the first)
    time: float  # what "now" was then (key expiry)
    topology: Topology
    model: ReadModel


class TimeTravel:
    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._kept: OrderedDict[int, Past] = OrderedDict()

    async def replay(self, point: Point) -> Replay:
        """The log folded up to `point`. Raises Rejected (a sequence beyond the log)."""
        head = await self._store.last_sequence()
        if point.seq is not None and point.seq > head:
            raise Rejected(
                ErrorCode.INVALID,
                f"event #{point.seq} is beyond the log (its last event is #{head})",
            )
        replay = Replay(point)
        if head == 0 or point.seq == 0:
            return replay
        following = cast("AsyncGenerator[list[RecordedEvent], None]", self._store.follow_batches(1))
        async with contextlib.aclosing(following) as batches:
            async for batch in batches:
                for recorded in batch:
                    if not replay.feed(recorded) or recorded.seq >= head:
                        return replay
        return replay  # pragma: no cover - the store closed under us

    async def past(self, point: Point) -> Past:
        """The read model as of `point`. Raises Rejected."""
        if point.seq is not None and point.seq in self._kept:
            self._kept.move_to_end(point.seq)
            return self._kept[point.seq]
        replay = await self.replay(point)
        kept = self._kept.get(replay.seq)
        if kept is not None and point.time is None:
            return kept
        model = await ReadModel.open(f"file:past-{uuid.uuid4().hex}?mode=memory&cache=shared")
        await model.commit(replay.topology, everything(replay.topology), replay.seq)
        past = Past(replay.seq, replay.when(), replay.topology, model)
        if point.time is None:  # a time's "now" is its own: keep seq points only
            await self._keep(past)
        return past

    async def release(self, past: Past) -> None:
        """Done with an answer: close it unless it is kept."""
        if self._kept.get(past.seq) is not past:
            await past.model.close()

    async def _keep(self, past: Past) -> None:
        self._kept[past.seq] = past
        while len(self._kept) > KEPT:
            _, old = self._kept.popitem(last=False)
            await old.model.close()

    async def close(self) -> None:
        kept, self._kept = self._kept, OrderedDict()
        for past in kept.values():
            await past.model.close()
