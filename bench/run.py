"""`make bench`: how much a change costs, measured on real parts.

A real nats-server, the real control plane (`netmesh server --nats-url`, a
separate process so that its CPU time can be read), and N simulated agents in
this process sharing a few NATS connections. Each simulated agent does what a
real one does with its messages: decode, check the revision, plan against a
fake machine, apply. Prints a table and writes JSON under bench/results/.

    .venv/bin/python bench/run.py [--hosts 10,100,300] [--joins 20]

A benchmark, not a test: figures depend on the machine (see the JSON's
"machine" field) and on what else it is doing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
from nacl.public import PrivateKey
from nats.aio.client import Client

from agent.apply import apply
from agent.fake import FakeBackend, FakeLink, FakeMachine
from agent.plan import Actual, plan
from controlplane.decide import host_id_for
from controlplane.embedded import EmbeddedNats, free_port
from events.commands import Reply
from events.connect import server_has_seen_everything
from events.desired import DesiredState, desired_decoder
from events.envelope import make_envelope
from events.jetstream import JetStreamEventStore
from events.model import HostEndpointObserved
from events.store import PendingEvent
from events.subjects import DESIRED_PREFIX, aggregate_subject
from projections.runner import ProjectionRunner
from projections.sqlite import ReadModel

RESULTS = Path(__file__).resolve().parent / "results"
CONNECTIONS = 4
SIM_KEY = PrivateKey(bytes(32))
SIM_PRIVATE = base64.b64encode(bytes(SIM_KEY)).decode()
SIM_PUBLIC = base64.b64encode(bytes(SIM_KEY.public_key)).decode()


def public_key(n: int) -> str:
    return base64.b64encode(hashlib.sha256(f"bench-host-{n}".encode()).digest()).decode()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class SimAgent:
    host_id: str
    machine: FakeMachine = field(default_factory=FakeMachine)
    desired: DesiredState | None = None
    bytes_in: int = 0
    messages: int = 0

    async def on_message(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.messages += 1
        state = desired_decoder.decode(data)
        if self.desired is not None and state.revision <= self.desired.revision:
            return
        backend = FakeBackend("nm0", self.machine)
        link = FakeLink("nm0", self.machine)
        device = await backend.read() if await backend.exists() else None
        link_state = await link.state() if await link.exists() else None
        ops = plan(state, Actual(device, link_state), public_key=SIM_PUBLIC, previous=self.desired)
        await apply(ops, backend, link, SIM_PRIVATE)
        self.machine.ops.clear()
        self.desired = state


class Bench:
    def __init__(self, url: str, conns: list[Client]) -> None:
        self.url = url
        self.conns = conns
        self.admin = conns[0]
        self.agents: dict[str, SimAgent] = {}
        self.progress = asyncio.Condition()

    async def request(self, verb: str, **fields: Any) -> Any:
        fields.setdefault("command_id", uuid.uuid4().hex)
        msg = await self.admin.request(
            f"netmesh.cmd.{verb}", msgspec.json.encode(fields), timeout=60
        )
        reply = msgspec.json.decode(msg.data, type=Reply)
        if not reply.ok:
            raise RuntimeError(f"{verb}: {reply.error}")
        return reply.result, reply.seq

    async def wait_ready(self, cp: asyncio.subprocess.Process, timeout: float = 60) -> None:
        """Until the control plane answers a query (it starts up asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.admin.request("netmesh.query.networks", b"{}", timeout=1)
                return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if cp.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError("the control plane did not start") from None
                await asyncio.sleep(0.05)

    async def network_token(self) -> str:
        """A network wide enough for any N here, and an unlimited key to it."""
        await self.request("network.create", name="bench", cidr="10.128.0.0/9")
        key, _ = await self.request("key.create", network="bench", uses=None)
        return str(key["token"])

    async def add_agent(self, n: int, token: str) -> tuple[str, int]:
        # Subscribe before joining (the host id follows from the key), as a real
        # agent's JetStream consumer would not miss its first state.
        host_id = host_id_for(public_key(n))
        agent = SimAgent(host_id)
        self.agents[host_id] = agent
        conn = self.conns[1 + n % (len(self.conns) - 1)] if len(self.conns) > 1 else self.conns[0]

        async def deliver(msg: Any) -> None:
            await agent.on_message(msg.data)
            async with self.progress:
                self.progress.notify_all()

        await conn.subscribe(f"{DESIRED_PREFIX}.{host_id}", cb=deliver)
        await server_has_seen_everything(conn)
        result, seq = await self.request(
            "join",
            token=token,
            public_key=public_key(n),
            name=f"h{n}",
            endpoints=[f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"],
        )
        assert result["host_id"] == host_id
        return host_id, seq or 0

    async def wait_all_at(self, revision: int, hosts: list[str], timeout: float = 300) -> None:
        def done() -> bool:
            return all(
                (a.desired is not None and a.desired.revision >= revision)
                for a in (self.agents[h] for h in hosts)
            )

        async with self.progress:
            await asyncio.wait_for(self.progress.wait_for(done), timeout)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@contextlib.asynccontextmanager
async def control_plane(
    workdir: Path, tag: str, connections: int
) -> AsyncIterator[tuple[Bench, int]]:
    """A nats-server, `netmesh server --nats-url` as its own process (so its CPU
    time can be read), and `connections` client connections; yields the Bench
    and the control plane's pid once it answers."""
    server = EmbeddedNats(workdir / f"js-{tag}", port=free_port(), server_name=f"bench-{tag}")
    await server.start()
    cp = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "server", "--nats-url", server.url,
        "--data-dir", str(workdir / f"cp-{tag}"), "--log-level", "warning",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    conns = [
        await nats.connect(server.url, pending_size=64 * 1024 * 1024) for _ in range(connections)
    ]
    try:
        bench = Bench(server.url, conns)
        await bench.wait_ready(cp)
        yield bench, cp.pid
    finally:
        for c in conns:
            await c.close()
        cp.terminate()
        await cp.wait()
        await server.stop()


async def bench_joins(hosts: int, joins: int, workdir: Path) -> dict[str, Any]:
    async with control_plane(workdir, f"joins{hosts}", CONNECTIONS) as (bench, cp_pid):
        token = await bench.network_token()
        for n in range(hosts):
            await bench.add_agent(n, token)
        everyone = list(bench.agents)
        last = max(a.desired.revision if a.desired else 0 for a in bench.agents.values())
        await bench.wait_all_at(last, everyone)

        latencies, bytes_per_join, cpu = [], [], []
        for j in range(joins):
            before_bytes = sum(a.bytes_in for a in bench.agents.values())
            before_cpu = cpu_seconds(cp_pid)
            start = time.perf_counter()
            _host_id, seq = await bench.add_agent(hosts + j, token)
            await bench.wait_all_at(seq, list(bench.agents))
            latencies.append(time.perf_counter() - start)
            cpu.append(cpu_seconds(cp_pid) - before_cpu)
            bytes_per_join.append(sum(a.bytes_in for a in bench.agents.values()) - before_bytes)
        return {
            "hosts": hosts,
            "join_converged_ms": {
                "p50": pct(latencies, 0.5) * 1000,
                "p95": pct(latencies, 0.95) * 1000,
                "max": max(latencies) * 1000,
            },
            "bytes_per_join": statistics.mean(bytes_per_join),
            "cp_cpu_ms_per_join": statistics.mean(cpu) * 1000,
        }


async def bench_commands(count: int, concurrency: int, workdir: Path) -> dict[str, Any]:
    async with control_plane(workdir, "commands", 1) as (bench, _cp_pid):
        token = await bench.network_token()
        joined, _ = await bench.request("join", token=token, public_key=public_key(0), name="h0")
        host_id = joined["host_id"]
        latencies: list[float] = []
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with semaphore:
                t0 = time.perf_counter()
                await bench.request(
                    "endpoint.report", host_id=host_id, endpoints=[f"192.0.2.{i % 250 + 1}"]
                )
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        elapsed = time.perf_counter() - start
        return {
            "commands": count,
            "concurrency": concurrency,
            "per_second": count / elapsed,
            "latency_ms": {"p50": pct(latencies, 0.5) * 1000, "p99": pct(latencies, 0.99) * 1000},
        }


class NullPublisher:
    async def publish(self, state: DesiredState) -> None:
        return None

    async def last_revision(self, host_id: str) -> int | None:
        return None


async def bench_rebuild(events: int, workdir: Path) -> dict[str, Any]:
    """Rebuild the read model from `events` stored events (endpoint observations
    of 1,000 hosts: the commonest event in a live network)."""
    server = EmbeddedNats(workdir / "js-rebuild", port=free_port(), server_name="benchrebuild")
    await server.start()
    nc = await nats.connect(server.url)
    try:
        store = JetStreamEventStore(nc, timeout=30)
        await store.ensure_stream()
        batch: list[PendingEvent] = []
        for i in range(events):
            host = f"h{i % 1000:012d}"
            event = HostEndpointObserved(host_id=host, endpoints=(f"192.0.2.{i % 250 + 1}",))
            env = make_envelope(event, event_id=str(i), time=1.0, actor="bench", command_id=str(i))
            batch.append(PendingEvent(aggregate_subject("host", host), env))
            if len(batch) == 1000:
                await store.append(batch)
                batch = []
        if batch:
            await store.append(batch)
        model = await ReadModel.open(workdir / "rebuild.sqlite3")
        runner = ProjectionRunner(store, model, NullPublisher())
        start = time.perf_counter()
        task = asyncio.create_task(runner.run())
        await runner.wait_for(events, 600)
        elapsed = time.perf_counter() - start
        await store.close()
        await asyncio.wait([task], timeout=10)
        await model.close()
        return {"events": events, "seconds": elapsed, "events_per_second": events / elapsed}
    finally:
        await nc.close()
        await server.stop()


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg": os.getloadavg(),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="10,100,300")
    parser.add_argument("--joins", type=int, default=20)
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--rebuild-events", type=int, default=100_000)
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": machine(), "joins": [], "at": time.time()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for hosts in (int(h) for h in args.hosts.split(",")):
            result = await bench_joins(hosts, args.joins, workdir)
            out["joins"].append(result)
            c = result["join_converged_ms"]
            print(
                f"join, {hosts:>5} hosts: converged p50 {c['p50']:8.1f} ms  p95 {c['p95']:8.1f} ms"
                f"  max {c['max']:8.1f} ms | {result['bytes_per_join']:>12,.0f} B/join"
                f" | control plane {result['cp_cpu_ms_per_join']:7.1f} ms CPU/join",
                flush=True,
            )
        out["commands"] = await bench_commands(args.commands, 32, workdir)
        cmd = out["commands"]
        print(
            f"commands: {cmd['per_second']:,.0f}/s at concurrency {cmd['concurrency']}, "
            f"p50 {cmd['latency_ms']['p50']:.1f} ms, p99 {cmd['latency_ms']['p99']:.1f} ms",
            flush=True,
        )
        out["rebuild"] = await bench_rebuild(args.rebuild_events, workdir)
        print(
            f"rebuild: {out['rebuild']['events']:,} events in {out['rebuild']['seconds']:.1f} s "
            f"= {out['rebuild']['events_per_second']:,.0f} events/s",
            flush=True,
        )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    from cli.logs import configure_logging

    configure_logging("console", "warning")
    asyncio.run(main())
