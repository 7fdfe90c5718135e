"""One contract for the event store, run against the in-memory store and
against JetStream on a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg

from events.connect import connect
from events.envelope import Answer, RecordedEvent, make_envelope
from events.jetstream import JetStreamEventStore, stream_sequence
from events.model import AnyEvent, NetworkCreated, NodeJoined
from events.store import (
    ConcurrencyConflict,
    DuplicateAppend,
    EventStore,
    Expectation,
    MemoryEventStore,
    PendingEvent,
)
from events.subjects import NETWORK_EVENTS_WILDCARD, aggregate_subject
from tests.conftest import start_nats


@pytest.fixture(params=["memory", "jetstream"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    if request.param == "memory":
        yield MemoryEventStore()
        return
    server = await start_nats(tmp_path / "js")
    client = await connect(server.url)  # the control plane's kind of connection
    try:
        js_store = JetStreamEventStore(client)
        await js_store.ensure_stream()
        yield js_store
    finally:
        await client.close()
        await server.stop()


def pending(event: AnyEvent, kind: str, agg: str, n: int = 0) -> PendingEvent:
    env = make_envelope(event, event_id=f"e{n}", time=1.0, actor="test", command_id=f"c{n}")
    return PendingEvent(aggregate_subject(kind, agg), env)


def created(name: str, cidr: str = "10.0.0.0/24") -> PendingEvent:
    return pending(NetworkCreated(network=name, cidr=cidr), "network", name)


def joined(net: str, host: str, addr: str) -> PendingEvent:
    event = NodeJoined(network=net, node_id=f"{host}-{net}", host_id=host, name=host, address=addr)
    return pending(event, "network", net)


SUBJ_A = aggregate_subject("network", "a")
SUBJ_B = aggregate_subject("network", "b")


async def test_append_returns_sequences_and_reads_back(store: EventStore) -> None:
    assert await store.last_sequence() == 0
    assert await store.append([created("a")], expect=[Expectation(SUBJ_A, 0)]) == 1
    assert await store.append([created("b")]) == 2
    seq = await store.append([joined("a", "h1", "10.0.0.1")], expect=[Expectation(SUBJ_A, 1)])
    assert seq == 3
    events = await store.read_subject(SUBJ_A)
    assert [r.seq for r in events] == [1, 3]
    assert isinstance(events[1].event, NodeJoined)
    assert events[1].event.address == "10.0.0.1"
    assert events[1].envelope.actor == "test"
    assert await store.read_subject(aggregate_subject("network", "none")) == []
    assert await store.last_sequence() == 3


async def test_one_event_reads_back_by_sequence_with_its_answer(store: EventStore) -> None:
    await store.append([created("a")])
    answered = created("b")
    answer = Answer(request="r1", result=msgspec.Raw(b'{"network":"b"}'))
    envelope = msgspec.structs.replace(answered.envelope, answer=answer)
    await store.append([PendingEvent(answered.subject, envelope)])
    recorded = await store.read(2)
    assert recorded is not None
    assert (recorded.seq, recorded.subject) == (2, SUBJ_B)
    assert recorded.envelope.answer is not None
    assert recorded.envelope.answer.request == "r1"
    assert msgspec.json.decode(recorded.envelope.answer.result) == {"network": "b"}
    first = await store.read(1)
    assert first is not None and first.envelope.answer is None
    assert await store.read(3) is None


async def test_stale_expectation_is_a_conflict_and_stores_nothing(store: EventStore) -> None:
    await store.append([created("a")])
    with pytest.raises(ConcurrencyConflict):
        await store.append([joined("a", "h1", "10.0.0.1")], expect=[Expectation(SUBJ_A, 0)])
    with pytest.raises(ConcurrencyConflict):
        await store.append([created("a")], expect=[Expectation(SUBJ_A, 0)])
    assert await store.last_sequence() == 1


async def test_batch_is_atomic_across_aggregates(store: EventStore) -> None:
    await store.append([created("a")])
    host_subj = aggregate_subject("host", "h1")
    batch = [
        joined("a", "h1", "10.0.0.1"),
        joined("a", "h2", "10.0.0.2"),
        pending(NetworkCreated(network="b", cidr="10.1.0.0/24"), "network", "b"),
    ]
    # A failing check on any message (here the last) stores none of them.
    with pytest.raises(ConcurrencyConflict):
        await store.append(batch, expect=[Expectation(SUBJ_A, 1), Expectation(SUBJ_B, 7)])
    assert await store.last_sequence() == 1
    last = await store.append(batch, expect=[Expectation(SUBJ_A, 1), Expectation(SUBJ_B, 0)])
    assert last == 4
    assert [r.seq for r in await store.read_subject(SUBJ_A)] == [1, 2, 3]
    assert await store.read_subject(host_subj) == []


async def test_a_batch_ends_at_the_sequence_returned_and_reads_as_followed(
    store: EventStore,
) -> None:
    # The write model applies a command's own batch as seq - n + 1 .. seq
    # (`WriteModel.apply_own`): the events must be stored consecutively.
    await store.append([created("a")])
    batch = [joined("a", "h1", "10.0.0.1"), joined("a", "h2", "10.0.0.2"), created("b")]
    last = await store.append(batch)
    followed: list[RecordedEvent] = []
    async for recorded in store.follow(last - len(batch) + 1):
        followed.append(recorded)
        if recorded.seq == last:
            break
    assert [r.seq for r in followed] == [2, 3, 4]
    assert followed == [store.as_followed(r.seq, p) for r, p in zip(followed, batch, strict=True)]


async def test_wildcard_expectation_guards_all_networks(store: EventStore) -> None:
    await store.append([created("a")])
    await store.append([created("b", "10.1.0.0/24")])
    # A decision made having seen only seq 1 over all networks is stale.
    with pytest.raises(ConcurrencyConflict):
        await store.append([created("c")], expect=[Expectation(NETWORK_EVENTS_WILDCARD, 1)])
    assert await store.append([created("c")], expect=[Expectation(NETWORK_EVENTS_WILDCARD, 2)]) == 3


@pytest.mark.parametrize("size", [1, 3])
async def test_retried_append_with_same_msg_id_is_dropped(store: EventStore, size: int) -> None:
    batch = [joined("a", f"h{i}", f"10.0.0.{i + 1}") for i in range(size)]
    await store.append(batch, msg_id="cmd-1")
    with pytest.raises(DuplicateAppend):
        await store.append(batch, msg_id="cmd-1")
    assert await store.last_sequence() == size


async def test_empty_and_unguarded_batches_are_refused(store: EventStore) -> None:
    with pytest.raises(ValueError):
        await store.append([])
    with pytest.raises(ValueError):
        await store.append([created("a")], expect=[Expectation(SUBJ_B, 0)])
    assert await store.last_sequence() == 0


async def test_follow_replays_then_streams_live(store: EventStore) -> None:
    for name in "abc":
        await store.append([created(name)])
    seen: list[RecordedEvent] = []
    got_five = asyncio.Event()

    async def consume() -> None:
        async for recorded in store.follow(2):
            seen.append(recorded)
            if len(seen) == 4:
                got_five.set()
                return

    task = asyncio.create_task(consume())
    await store.append([created("d")])
    await store.append([created("e")])
    await asyncio.wait_for(got_five.wait(), 10)
    await task
    assert [r.seq for r in seen] == [2, 3, 4, 5]
    assert [r.subject for r in seen][-1] == aggregate_subject("network", "e")


async def test_follow_batches_hands_over_what_has_arrived(store: EventStore) -> None:
    for name in "abcdefg":
        await store.append([created(name)])
    batches: list[list[int]] = []

    async def consume() -> None:
        async for batch in store.follow_batches(2, max_batch=3):
            batches.append([r.seq for r in batch])
            if batch[-1].seq == 8:
                return

    task = asyncio.create_task(consume())
    await store.append([created("h")])
    await asyncio.wait_for(task, 10)
    flat = [seq for batch in batches for seq in batch]
    assert flat == [2, 3, 4, 5, 6, 7, 8]
    assert all(1 <= len(batch) <= 3 for batch in batches)
    # Six events were stored before following began: they come in full batches.
    assert len(batches) < len(flat)


async def test_close_ends_followers(store: EventStore) -> None:
    await store.append([created("a")])
    seen: list[int] = []
    following = asyncio.Event()

    async def consume() -> None:
        async for batch in store.follow_batches(1):
            seen.extend(r.seq for r in batch)
            following.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(following.wait(), 10)
    await store.close()
    await asyncio.wait_for(task, 10)  # ends by itself, no cancellation
    assert seen == [1]


async def test_a_slow_follower_gets_everything_in_order(
    store: EventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The JetStream follower reads ahead at most FOLLOW_BUFFER events, then
    holds the subscription: a slow consumer still gets every event, in order."""
    import events.jetstream

    monkeypatch.setattr(events.jetstream, "FOLLOW_BUFFER", 3)
    for n in range(30):
        await store.append([created(f"n{n}")])
    seen: list[int] = []
    async for batch in store.follow_batches(1, max_batch=2):
        await asyncio.sleep(0)  # a consumer that yields between batches
        seen.extend(r.seq for r in batch)
        if seen[-1] >= 30:
            break
    assert seen == list(range(1, 31))


@pytest.mark.parametrize(
    "reply",
    [
        "$JS.ACK.NETMESH_EVENTS.cons.1.42.7.1764000000000000000.0",
        "$JS.ACK.hub.ACCHASH.NETMESH_EVENTS.cons.1.42.7.1764000000000000000.0.tok",
    ],
)
def test_stream_sequence_reads_both_reply_forms(reply: str) -> None:
    msg = Msg(_client=None, subject="netmesh.ev.network.a", reply=reply)  # type: ignore[arg-type]
    assert stream_sequence(msg) == msg.metadata.sequence.stream == 42


async def test_as_followed_says_valid_for_our_own_macd_events(tmp_path: Path) -> None:
    server = await start_nats(tmp_path / "js")
    client = await connect(server.url)
    try:
        js_store = JetStreamEventStore(client, mac_key=b"k" * 32)
        await js_store.ensure_stream()
        event = created("a")
        seq = await js_store.append([event])
        async for recorded in js_store.follow(seq):
            assert recorded == js_store.as_followed(seq, event)
            assert recorded.signature == "valid"
            break
    finally:
        await client.close()
        await server.stop()
