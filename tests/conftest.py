"""Shared fixtures: a real nats-server per test, on a free port, with a
temporary JetStream store."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from controlplane.embedded import EmbeddedNats, NatsServerError, free_port


async def start_nats(store: Path, log_file: Path | None = None) -> EmbeddedNats:
    """A nats-server of our own on a free port. A port picked free can be taken
    before the server binds it (by a parallel run): then try another."""
    for attempt in range(5):
        server = EmbeddedNats(
            store, port=free_port(), log_file=log_file, server_name=f"test-{uuid.uuid4().hex[:8]}"
        )
        try:
            await server.start()
            return server
        except NatsServerError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    server = await start_nats(tmp_path / "jetstream", tmp_path / "nats.log")
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()
