"""`make bench`, the cluster section: what three brokers cost and what a
broker's death costs, measured on real parts on loopback.

Three `netmesh broker` members (real nats-servers, configured as the command
configures them) and two `netmesh server --nats-url` processes, each with its
own broker listed first. In one run, on one cluster:

1. The streams are made with one copy (R1); 20,000 events are appended (100
   hosts joining, then endpoint observations), and a fresh read model replays
   them (events/s).
2. The control planes start with `--replicas 1`; CLIENTS admin clients send
   COMMANDS signed commands (the mix of tests/test_cluster.py: a network made,
   an enrollment key made, a refused overlap), CONCURRENCY in flight each:
   commands/s, p50 and p99.
3. The control planes stop; the streams are raised to three copies (R3, every
   copy current); the same replay from the R3 stream; the control planes
   start with `--replicas 3`; the same commands again.
4. Failover, TRIALS times: kill -9 of the broker leading the events stream, a
   command sent every 0.1 s (each with 1 s to answer) until one is applied:
   the time from the kill to that answer; the broker is started again and
   caught up before the next trial.

Ratios are R3 over R1 in the same run. A benchmark, not a test: figures depend
on the machine (the JSON's "machine" field) and on what else runs on it.

    .venv/bin/python bench/cluster.py [--commands 1000] [--trials 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.client import Client

# The repository's root: the test helpers run the cluster as the tests do.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import seed_network

from cli.client import checked_command
from controlplane.publisher import MemoryDesiredPublisher
from controlplane.streams import ensure_streams
from events.commands import Reply
from events.connect import connect
from events.jetstream import JetStreamEventStore
from events.natsid import client_options
from events.signing import command_headers, event_mac_key, load_or_create
from events.subjects import EVENTS_STREAM, command_subject
from projections.runner import ProjectionRunner
from projections.sqlite import ReadModel
from tests.cluster import Cluster, ControlPlaneProcess

RESULTS = Path(__file__).resolve().parent / "results"
CLIENTS = 4
CONCURRENCY = 8  # commands in flight per client
REPLAY_EVENTS = 20_000
REPLAY_HOSTS = 100


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Admin:
    """One admin client: a connection kept open, signed commands on it."""

    def __init__(self, nc: Client, key: Any) -> None:
        self.nc = nc
        self.key = key

    async def send(self, verb: str, timeout: float = 15.0, **fields: Any) -> Reply:
        fields = {"command_id": uuid.uuid4().hex, "signed_at": time.time(), **fields}
        payload = checked_command(verb, fields)
        msg = await self.nc.request(
            command_subject(verb),
            payload,
            headers=command_headers(self.key, verb, payload),
            timeout=timeout,
        )
        return msgspec.json.decode(msg.data, type=Reply)


async def quiet(exc: Exception) -> None:
    """A broker killed on purpose: its clients' reconnects are expected."""


async def admin(cluster: Cluster, key_file: Path) -> Admin:
    key = load_or_create(key_file)
    nc = await connect(
        cluster.urls,
        **client_options(key),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        error_cb=quiet,
    )
    return Admin(nc, key)


async def run_commands(
    cluster: Cluster, key_file: Path, count: int, tag: str, octet: int
) -> dict[str, Any]:
    """CLIENTS clients, CONCURRENCY in flight each: the mix of
    tests/test_cluster.py, in 10.<octet+>.x.0/24 (the seed has 10.128.0.0/9)."""
    admins = [await admin(cluster, key_file) for _ in range(CLIENTS)]
    base = await admins[0].send("network.create", name=f"{tag}base", cidr=f"172.{octet}.0.0/16")
    assert base.ok, base.error
    latencies: list[float] = []
    outcomes: dict[str, int] = {"ok": 0, "refused": 0}
    counter = iter(range(count))

    async def worker(client: Admin) -> None:
        for i in counter:
            fields: dict[str, Any]
            if i % 5 == 0:  # refused: inside the base network
                verb = "network.create"
                fields = {"name": f"{tag}x{i}", "cidr": f"172.{octet}.{i % 256}.0/24"}
            elif i % 5 == 1:
                verb, fields = "key.create", {"network": f"{tag}base", "uses": 1}
            else:
                verb = "network.create"
                fields = {"name": f"{tag}n{i}", "cidr": f"10.{octet + i // 256}.{i % 256}.0/24"}
            t0 = time.perf_counter()
            reply = await client.send(verb, **fields)
            latencies.append(time.perf_counter() - t0)
            outcomes["ok" if reply.ok else "refused"] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(a) for a in admins for _ in range(CONCURRENCY)))
    elapsed = time.perf_counter() - start
    for a in admins:
        await a.nc.close()
    return {
        "commands": count,
        "clients": CLIENTS,
        "in_flight": CLIENTS * CONCURRENCY,
        "per_second": count / elapsed,
        "latency_ms": {"p50": pct(latencies, 0.5) * 1000, "p99": pct(latencies, 0.99) * 1000},
        "outcomes": outcomes,
    }


async def replay(cluster: Cluster, workdir: Path, upto: int, tag: str) -> dict[str, Any]:
    """A fresh read model from the events stream, to event `upto`."""
    nc = await cluster.client()
    store = JetStreamEventStore(nc, timeout=60, mac_key=event_mac_key(cluster.root))
    model = await ReadModel.open(workdir / f"replay-{tag}.sqlite3")
    try:
        runner = ProjectionRunner(store, model, MemoryDesiredPublisher())
        start = time.perf_counter()
        task = asyncio.create_task(runner.run())
        await runner.wait_for(upto, 600)
        elapsed = time.perf_counter() - start
        await store.close()
        await asyncio.wait([task], timeout=30)
        return {"events": upto, "seconds": elapsed, "events_per_second": upto / elapsed}
    finally:
        await model.close()
        await nc.close()


async def seed(cluster: Cluster) -> int:
    nc = await cluster.client()
    store = JetStreamEventStore(nc, timeout=60, mac_key=event_mac_key(cluster.root))
    try:
        await ensure_streams(nc.jetstream(), 1)
        extra = REPLAY_EVENTS - 3 * REPLAY_HOSTS - 2
        await seed_network(store, REPLAY_HOSTS, extra_events=extra)
        return await store.last_sequence()
    finally:
        await store.close()
        await nc.close()


async def raise_to_r3(cluster: Cluster) -> float:
    """Streams to three copies; the seconds until every copy is current."""
    nc = await cluster.client()
    try:
        start = time.perf_counter()
        await ensure_streams(nc.jetstream(timeout=10), 3)
    finally:
        await nc.close()
    await every_copy_current(cluster)
    return time.perf_counter() - start


async def every_copy_current(cluster: Cluster) -> None:
    nc = await cluster.client()
    js = nc.jetstream(timeout=5)
    try:
        while True:
            try:
                info = await js.stream_info(EVENTS_STREAM)
            except Exception:  # no leader yet
                info = None
            peers = (info.cluster.replicas or []) if info and info.cluster else []
            if len(peers) == 2 and all(p.current and not p.lag for p in peers):
                return
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def failover(cluster: Cluster, key_file: Path, trial: int) -> dict[str, Any]:
    """kill -9 of the events stream's leader; seconds until a command is applied."""
    client = await admin(cluster, key_file)
    try:
        leader = await cluster.leader()
        await cluster.kill(leader)
        killed = time.perf_counter()
        attempts = 0
        while True:
            attempts += 1
            sent = time.perf_counter()
            name = f"fo{trial}a{attempts}"
            try:
                cidr = f"10.{100 + trial}.{attempts % 256}.0/24"
                reply = await client.send("network.create", timeout=1.0, name=name, cidr=cidr)
                if reply.ok:
                    break
            except Exception:  # no answer within 1 s: the next attempt
                pass
            await asyncio.sleep(max(0.0, 0.1 - (time.perf_counter() - sent)))
        took = time.perf_counter() - killed
    finally:
        await client.nc.close()
    await cluster.restart(leader)
    await every_copy_current(cluster)
    new = await cluster.leader()
    return {"killed": leader.name, "new_leader": new.name, "seconds": took, "attempts": attempts}


def machine() -> dict[str, Any]:
    import os

    return {
        "cpus": os.cpu_count(),
        "load_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": machine(), "at": time.time()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cluster = Cluster.make(workdir / "cluster")
        await cluster.start()
        planes: list[ControlPlaneProcess] = []
        try:
            seeded = await seed(cluster)
            out["replay_r1"] = await replay(cluster, workdir, seeded, "r1")
            key_file = workdir / "cpa" / "admin.key"
            for replicas in (1, 3):
                if replicas == 3:
                    out["raise_to_r3_seconds"] = await raise_to_r3(cluster)
                    out["replay_r3"] = await replay(cluster, workdir, seeded, "r3")
                planes = [
                    ControlPlaneProcess(workdir / name, cluster, replicas=replicas, home=i)
                    for i, name in enumerate(("cpa", "cpb"))
                ]
                for plane in planes:
                    await plane.start()
                out[f"commands_r{replicas}"] = await run_commands(
                    cluster, key_file, args.commands, f"r{replicas}", 10 * replicas
                )
                if replicas == 1:
                    for plane in planes:
                        await plane.stop()
            trials = [await failover(cluster, key_file, t) for t in range(args.trials)]
            out["failover"] = {
                "trials": trials,
                "median_seconds": statistics.median(t["seconds"] for t in trials),
            }
        finally:
            for plane in planes:
                await plane.stop()
            await cluster.stop()
    r1, r3 = out["commands_r1"], out["commands_r3"]
    out["ratios_r3_over_r1"] = {
        "commands_per_second": r3["per_second"] / r1["per_second"],
        "p50": r3["latency_ms"]["p50"] / r1["latency_ms"]["p50"],
        "p99": r3["latency_ms"]["p99"] / r1["latency_ms"]["p99"],
        "replay_events_per_second": out["replay_r3"]["events_per_second"]
        / out["replay_r1"]["events_per_second"],
    }
    ratios = out["ratios_r3_over_r1"]
    for label, c in (("R1", r1), ("R3", r3)):
        print(
            f"cluster commands {label}: {c['per_second']:,.0f}/s, {c['in_flight']} in flight "
            f"({c['clients']} clients), p50 {c['latency_ms']['p50']:.1f} ms, "
            f"p99 {c['latency_ms']['p99']:.1f} ms",
            flush=True,
        )
    print(
        f"cluster R3/R1: commands/s x{ratios['commands_per_second']:.2f}, "
        f"p50 x{ratios['p50']:.2f}, p99 x{ratios['p99']:.2f}",
        flush=True,
    )
    print(
        f"cluster replay of {out['replay_r1']['events']:,} events: "
        f"R1 {out['replay_r1']['events_per_second']:,.0f}/s, "
        f"R3 {out['replay_r3']['events_per_second']:,.0f}/s "
        f"(x{ratios['replay_events_per_second']:.2f}); raised to R3 in "
        f"{out['raise_to_r3_seconds']:.1f} s",
        flush=True,
    )
    fo = out["failover"]
    print(
        "cluster failover, events leader killed: writes again after "
        + ", ".join(f"{t['seconds']:.1f} s" for t in fo["trials"])
        + f" (median {fo['median_seconds']:.1f} s)",
        flush=True,
    )
    out["seconds"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"cluster-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    from cli.logs import configure_logging

    configure_logging("console", "warning")

    async def run_until_signalled() -> None:
        # SIGTERM cancels like Ctrl-C: the finally blocks stop what this run started.
        task = asyncio.ensure_future(main())
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await task

    asyncio.run(run_until_signalled())
