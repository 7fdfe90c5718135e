"""The write model applies a command's own events on append when nothing came
in between, and the follower then skips them; otherwise it waits for them."""

from __future__ import annotations

import asyncio

from controlplane.writemodel import WriteModel
from events.envelope import RecordedEvent, make_envelope
from events.model import NetworkCreated
from events.store import MemoryEventStore, PendingEvent
from events.subjects import aggregate_subject
from projections.topology import Topology


def created(name: str) -> PendingEvent:
    event = NetworkCreated(network=name, cidr="10.0.0.0/24")
    envelope = make_envelope(event, event_id=name, time=1.0, actor="t", command_id=f"c-{name}")
    return PendingEvent(aggregate_subject("network", name), envelope)


async def test_own_events_are_applied_once_without_the_follower() -> None:
    store = MemoryEventStore()
    write = WriteModel(store)
    seen: list[int] = []

    def observe(topology: Topology, recorded: RecordedEvent) -> None:
        seen.append(recorded.seq)

    write.observer = observe
    batch = [created("a"), created("b")]
    seq = await store.append(batch)
    await asyncio.wait_for(write.apply_own(seq, batch), 1)  # no follower running
    assert set(write.topology.networks) == {"a", "b"} and write.topology.last_seq == 2
    follower = asyncio.create_task(write.follow())
    third = [created("c")]
    await store.append(third)
    await write.wait_for(3, timeout=5)
    assert seen == [1, 2, 3]  # the follower skipped what was applied on append
    await store.close()
    await follower


async def test_own_events_after_someone_elses_wait_for_the_stream() -> None:
    store = MemoryEventStore()
    write = WriteModel(store)
    await store.append([created("other")])  # another replica's, not yet followed
    mine = [created("mine")]
    seq = await store.append(mine)
    waiting = asyncio.create_task(write.apply_own(seq, mine))
    await asyncio.sleep(0.05)
    assert not waiting.done() and not write.topology.networks
    follower = asyncio.create_task(write.follow())
    await asyncio.wait_for(waiting, 5)
    assert set(write.topology.networks) == {"other", "mine"}
    await store.close()
    await follower
