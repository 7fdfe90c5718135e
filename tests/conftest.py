"""Shared fixtures: a real nats-server per test, on a free port, with a
temporary JetStream store."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from controlplane.embedded import EmbeddedNats, NatsServerError, free_port


@pytest.fixture(autouse=True, scope="session")
def _cli_state_of_its_own(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The CLIs the tests run remember their last write (cli/lastwrite.py)
    under XDG_STATE_HOME: a directory of the run's, not the machine's home."""
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Last resort: namespaces this pytest process made (their names carry our
    pid) that a test's own cleanup did not remove, with whatever still runs in
    them. Each cleanup is by our own ids; anything found is reported, since it
    means a test leaked."""
    import contextlib
    import os
    import signal
    import subprocess

    prefix = f"nmt{os.getpid()}-"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    leaked = [line.split()[0] for line in listed.stdout.splitlines() if line.startswith(prefix)]
    for netns in leaked:
        pids = subprocess.run(
            ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", netns], check=False)
    if leaked:
        print(f"\nWARNING: test namespaces left behind and removed now: {', '.join(leaked)}")
