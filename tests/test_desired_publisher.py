"""One contract for desired-state publishers: the JetStream one and the
in-memory one the projection tests use must behave alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import nats
import pytest
from nacl.signing import SigningKey

from controlplane.publisher import JetStreamDesiredPublisher, MemoryDesiredPublisher
from controlplane.streams import ensure_streams
from events.desired import DesiredDelta, DesiredMessage, DesiredState, desired_encoder
from tests.conftest import start_nats


class Publisher(Protocol):
    async def publish(self, batch: list[tuple[DesiredMessage, bytes, int]]) -> list[int | None]: ...
    async def published(self) -> dict[str, tuple[int, int]]: ...
    async def last(self, host_id: str) -> tuple[int, int] | None: ...


@pytest.fixture(params=["memory", "jetstream"])
async def publisher(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Publisher]:
    if request.param == "memory":
        yield MemoryDesiredPublisher()
        return
    server = await start_nats(tmp_path / "js")
    client = await nats.connect(server.url)
    try:
        await ensure_streams(client.jetstream())
        yield JetStreamDesiredPublisher(client, SigningKey.generate())
    finally:
        await client.close()
        await server.stop()


def snapshot(host: str, revision: int) -> tuple[DesiredMessage, bytes]:
    state = DesiredState(host_id=host, revision=revision)
    return state, desired_encoder.encode(state)


def delta(host: str, base: int, revision: int) -> tuple[DesiredMessage, bytes]:
    message = DesiredDelta(host_id=host, revision=revision, base=base)
    return message, desired_encoder.encode(message)


async def test_appends_expect_the_subjects_last_message(publisher: Publisher) -> None:
    assert await publisher.last("h1") is None and await publisher.published() == {}
    (first,) = await publisher.publish([(*snapshot("h1", 5), 0)])
    assert first is not None and await publisher.last("h1") == (5, first)
    # An append expecting anything but the subject's last message is refused.
    assert await publisher.publish([(*delta("h1", 5, 7), 0)]) == [None]
    assert await publisher.publish([(*delta("h1", 5, 7), first + 1000)]) == [None]
    (second,) = await publisher.publish([(*delta("h1", 5, 7), first)])
    assert second is not None and second > first
    # Another host's subject has its own chain; one batch can hold both.
    third, fourth = await publisher.publish([(*snapshot("h2", 6), 0), (*delta("h1", 7, 9), second)])
    assert third is not None and fourth is not None
    assert await publisher.published() == {"h1": (9, fourth), "h2": (6, third)}


async def test_a_snapshot_replaces_its_subject(publisher: Publisher) -> None:
    (first,) = await publisher.publish([(*snapshot("h1", 5), 0)])
    assert first is not None
    (second,) = await publisher.publish([(*delta("h1", 5, 7), first)])
    assert second is not None
    (third,) = await publisher.publish([(*snapshot("h1", 8), second)])
    assert third is not None and await publisher.last("h1") == (8, third)
    if isinstance(publisher, MemoryDesiredPublisher):
        assert publisher.messages("h1") == [snapshot("h1", 8)[0]]
