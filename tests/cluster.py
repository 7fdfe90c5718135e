"""A JetStream cluster on loopback for tests: three `netmesh broker` members
(real nats-servers, configured as `netmesh broker` configures them) and
`netmesh server` processes joined to them, each started and killed by the ids
this test gave it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
from nacl.signing import SigningKey
from nats.aio.client import Client

from controlplane.broker import ClusterMember, cluster_member
from controlplane.brokerauth import BrokerKeys
from controlplane.embedded import EmbeddedNats, NatsServerError, free_port
from events import natsid
from events.connect import connect
from events.signing import load_or_create
from events.subjects import EVENTS_STREAM
from tests.netns import wait_until

NETMESH = str(Path(sys.executable).parent / "netmesh")


@dataclass
class Member:
    name: str
    data: Path
    port: int
    cluster_port: int
    server: EmbeddedNats | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    """Three brokers sharing one control-plane key (`root`)."""

    root_dir: Path
    root: SigningKey
    members: list[Member] = field(default_factory=list)

    @classmethod
    def make(cls, root_dir: Path, size: int = 3) -> Cluster:
        root_dir.mkdir(parents=True, exist_ok=True)
        root = load_or_create(root_dir / "signing.key")
        cluster = cls(root_dir, root)
        for i in range(size):
            cluster.members.append(
                Member(f"b{i + 1}", root_dir / f"b{i + 1}", free_port(), free_port())
            )
        return cluster

    @property
    def urls(self) -> str:
        """Every member's client URL, comma-separated (as tokens carry them)."""
        return ",".join(m.url for m in self.members)

    @property
    def login(self) -> dict[str, Any]:
        return natsid.client_options(BrokerKeys.derive(self.root).controlplane)

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    async def start_member(self, member: Member) -> None:
        member.data.mkdir(parents=True, exist_ok=True)
        # What a user does: copy the control plane's signing.key to the broker.
        shutil.copy(self.root_dir / "signing.key", member.data / "signing.key")
        routes = tuple(f"127.0.0.1:{m.cluster_port}" for m in self.members)
        server = cluster_member(
            member.data,
            f"127.0.0.1:{member.port}",
            ClusterMember(member.name, f"127.0.0.1:{member.cluster_port}", routes),
            member.data / "nats.log",
        )
        await server.start()
        member.server = server

    async def start(self) -> None:
        for member in self.members:
            try:
                await self.start_member(member)
            except NatsServerError:
                # A port picked free was taken before the server bound it: another.
                member.port, member.cluster_port = free_port(), free_port()
                await self.start_member(member)
        await self.wait_jetstream()

    async def client(self) -> Client:
        return await connect(self.urls, **self.login, max_reconnect_attempts=-1)

    async def wait_jetstream(self, timeout: float = 30) -> None:
        """Until the cluster answers JetStream requests (a meta leader is elected)."""
        nc = await self.client()
        try:

            async def answers() -> bool:
                try:
                    await nc.jetstream(timeout=2).account_info()
                    return True
                except (nats.errors.Error, TimeoutError):
                    return False

            await wait_until(answers, timeout=timeout, message="JetStream cluster ready")
        finally:
            await nc.close()

    async def leader(self, stream: str = EVENTS_STREAM) -> Member:
        """The member that leads `stream` now."""
        nc = await self.client()
        try:

            async def found() -> str | None:
                try:
                    info = await nc.jetstream(timeout=2).stream_info(stream)
                except (nats.errors.Error, TimeoutError):
                    return None
                return info.cluster.leader if info.cluster else None

            name = await wait_until(found, timeout=20, message=f"a leader of {stream}")
        finally:
            await nc.close()
        assert name is not None
        return self.member(name)

    async def kill(self, member: Member) -> None:
        """kill -9."""
        assert member.server is not None
        await member.server.kill()
        member.server = None

    async def restart(self, member: Member, *, empty: bool = False) -> None:
        """Start a member again; with `empty`, its JetStream store wiped first
        (a replaced disk)."""
        if empty:
            shutil.rmtree(member.data / "jetstream", ignore_errors=True)
        await self.start_member(member)

    async def stop(self) -> None:
        for member in self.members:
            if member.server is not None:
                await member.server.stop()
                member.server = None


class ControlPlaneProcess:
    """`netmesh server --nats-url <every broker> --replicas 3`, as a user runs it."""

    def __init__(self, data: Path, cluster: Cluster, replicas: int = 3, home: int = 0) -> None:
        self.data = data
        self.cluster = cluster
        # The index of its own broker, listed first (README: one per plane).
        self.home = home
        self.replicas = replicas
        self.log = data.parent / f"{data.name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def urls(self) -> str:
        """Every broker, this plane's home first, the others in turn."""
        members = self.cluster.members
        first = self.home % len(members)
        return ",".join(m.url for m in members[first:] + members[:first])

    async def start(self) -> None:
        self.data.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.cluster.root_dir / "signing.key", self.data / "signing.key")
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                NETMESH, "server", "--data-dir", str(self.data),
                "--nats-url", self.urls, "--replicas", str(self.replicas),
                "--log-format", "json",
                stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip

        def ready() -> bool:
            assert self.proc is not None and self.proc.returncode is None, self.log.read_text()
            for line in self.log.read_bytes()[offset:].splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("event") == "control plane ready":
                        return True
            return False

        await wait_until(ready, timeout=60, message=f"control plane {self.data.name} ready")

    async def kill(self) -> None:
        """kill -9."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                os.kill(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
