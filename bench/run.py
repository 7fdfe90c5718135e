"""`make bench`: how much a change costs, measured on real parts.

A real nats-server, the real control plane (`netmesh server --nats-url`, a
separate process so that its CPU time can be read), and N simulated agents in
this process sharing a few NATS connections. Each simulated agent does what a
real one does with its messages: decode, check the revision chain (the same
`DesiredFeed` the agent uses), plan against a fake machine, apply.

Setting up N hosts by N joins would cost N^2/2 messages before anything is
measured, so the network is seeded instead: the bench decides the joins itself
(the control plane's pure `decide`) and appends the events; the control plane
then starts, replays them and publishes each host its snapshot. Simulated
agents start from their host's revision and interface without the seed's
peers (N agents holding N peers each would not fit in one process at 5,000);
what is measured after that (joins, endpoint moves) goes through the whole
system. A real agent also reads its device and plans over all its peers on
every pass: that is measured on its own, with real wireguard-go, by
`bench/agent_apply.py`.

    .venv/bin/python bench/run.py [--hosts 10,100,1000,5000] [--joins 20]

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
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nacl.signing
import nats
import nats.errors
from nacl.public import PrivateKey
from nacl.signing import VerifyKey
from nats.aio.client import Client

# Beside this script (its folder is on sys.path when it runs): the policy
# both policy benches measure.
from policy import EXTRA_RULE, TAGS, policy_document, policy_tags

from agent.apply import apply, read_actual
from agent.fake import FakeBackend, FakeLink, FakeMachine
from agent.plan import plan
from cli.client import checked_command
from controlplane.decide import Context, decide, host_id_for
from controlplane.embedded import REPO_NATS_CONF, EmbeddedNats, free_port
from controlplane.publisher import MemoryDesiredPublisher
from events import natsid
from events.commands import (
    AddEgress,
    AddIngress,
    AnyCommand,
    CreateClient,
    CreateEnrollmentKey,
    CreateNetwork,
    Join,
    RemoveClient,
    RemoveEgress,
    Reply,
    SetPolicy,
    TagNode,
    UntagNode,
)
from events.connect import connect, connect_once, server_has_seen_everything
from events.desired import DesiredMessage, DesiredState, Sections, decode_message
from events.envelope import RecordedEvent, make_envelope
from events.feed import DesiredFeed, Outcome
from events.jetstream import JetStreamEventStore
from events.model import HostEndpointObserved
from events.signing import (
    SIGNATURE_HEADER,
    command_headers,
    event_mac_key,
    load_or_create,
    public_text,
    verify,
)
from events.store import PendingEvent
from events.subjects import DESIRED_PREFIX, aggregate_subject
from events.tokens import make_token
from projections.desired import Builders, fold
from projections.runner import ProjectionRunner
from projections.sections.addresses import AddressSection
from projections.sections.interface import InterfaceSection
from projections.sqlite import ReadModel
from projections.topology import Topology

RESULTS = Path(__file__).resolve().parent / "results"
# Simulated agents share these connections. The full-state baseline pushes
# 166 MB per join at 1,000 hosts: spread over fewer connections, one exceeds
# the server's per-client pending limit and is cut as a slow consumer.
CONNECTIONS = 9
SIM_KEY = PrivateKey(bytes(32))
SIM_PRIVATE = base64.b64encode(bytes(SIM_KEY)).decode()
SIM_PUBLIC = base64.b64encode(bytes(SIM_KEY.public_key)).decode()
NETWORK = "bench"


def public_key(n: int) -> str:
    return base64.b64encode(hashlib.sha256(f"bench-host-{n}".encode()).digest()).decode()


def endpoint(n: int) -> str:
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class SimAgent:
    feed: DesiredFeed
    verify_key: VerifyKey
    machine: FakeMachine = field(default_factory=FakeMachine)
    applied: DesiredState | None = None
    bytes_in: int = 0
    messages: int = 0
    gaps: int = 0

    async def take(self, message: DesiredMessage) -> None:
        outcome = self.feed.take(message)
        if outcome is Outcome.GAP:
            self.gaps += 1  # a real agent would re-read its subject; here it is a bug
        if outcome is not Outcome.TAKEN or self.feed.state is None:
            return
        backend = FakeBackend("nm0", self.machine)
        link = FakeLink("nm0", self.machine)
        state = self.feed.state
        actual = await read_actual(backend, link)
        ops = plan(state, actual, public_key=SIM_PUBLIC, previous=self.applied)
        await apply(ops, backend, link, SIM_PRIVATE)
        self.machine.ops.clear()
        self.applied = state

    async def on_message(self, data: bytes, signature: str | None) -> None:
        self.bytes_in += len(data)
        self.messages += 1
        if verify(self.verify_key, data, signature) is not None:
            raise RuntimeError("a desired state failed its signature check")
        await self.take(decode_message(data))


class Bench:
    def __init__(self, url: str, conns: list[Client], verify_key: VerifyKey) -> None:
        self.url = url
        self.verify_key = verify_key  # the control plane's, as agents pin it
        self.conns = conns
        self.admin = conns[0]
        self.agents: dict[str, SimAgent] = {}
        self._threshold = 0
        self._remaining = 0
        self._all_past = asyncio.Event()
        self.head = 0  # stream sequence of the last event the bench caused
        self.failed = asyncio.Event()  # a connection broke: results would be wrong
        self.failures: list[str] = []
        self.broker_log: Path | None = None
        self.setup_seconds: dict[str, float] = {}  # where a stage's time went before measuring
        self.admin_key: nacl.signing.SigningKey | None = None  # the first admin's, to sign with
        # When each agent first held a revision past `_mark` (for changes that
        # reach some hosts only: the bench learns which once it has folded them).
        self._mark = 0
        self.passed_at: dict[str, float] = {}

    def broker_says(self) -> list[str]:
        """The broker's reasons for closing connections (slow consumer, stale
        connection, ...), from its log: what a client only sees as an EOF."""
        if self.broker_log is None or not self.broker_log.exists():
            return []
        lines = self.broker_log.read_text(errors="replace").splitlines()
        reasons = ("[ERR]", "[WRN]", "Slow Consumer", "Stale", "Closed", "Maximum")
        return [line for line in lines if any(r in line for r in reasons)][-20:]

    async def request(self, verb: str, **fields: Any) -> Any:
        fields.setdefault("command_id", uuid.uuid4().hex)
        msg = await self.admin.request(
            f"netmesh.cmd.{verb}", msgspec.json.encode(fields), timeout=120
        )
        reply = msgspec.json.decode(msg.data, type=Reply)
        if not reply.ok:
            raise RuntimeError(f"{verb}: {reply.error}")
        self.head = max(self.head, reply.seq or 0)
        return reply.result

    async def admin_request(self, verb: str, **fields: Any) -> Reply:
        """An admin command, signed with the first admin's key, as the CLI sends it."""
        assert self.admin_key is not None
        fields.setdefault("command_id", uuid.uuid4().hex)
        fields["signed_at"] = time.time()
        payload = checked_command(verb, fields)
        msg = await self.admin.request(
            f"netmesh.cmd.{verb}",
            payload,
            timeout=120,
            headers=command_headers(self.admin_key, verb, payload),
        )
        reply = msgspec.json.decode(msg.data, type=Reply)
        if not reply.ok:
            raise RuntimeError(f"{verb}: {reply.error}")
        self.head = max(self.head, reply.seq or 0)
        return reply

    async def until_applied(self, hosts: Collection[str], timeout: float = 120) -> float:
        """Wait until each of `hosts` holds a revision past the mark; when the last did."""
        deadline = time.monotonic() + timeout
        while not all(h in self.passed_at for h in hosts):
            if self.failed.is_set() or time.monotonic() > deadline:
                missing = sum(1 for h in hosts if h not in self.passed_at)
                raise RuntimeError(f"{missing} of {len(hosts)} agents did not apply the change")
            await asyncio.sleep(0.002)  # messages arrive on this loop: a short poll
        return max((self.passed_at[h] for h in hosts), default=time.perf_counter())

    async def wait_ready(self, cp: asyncio.subprocess.Process, timeout: float = 600) -> None:
        """Until the control plane answers a query (it answers once caught up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.admin.request("netmesh.query.networks", b"{}", timeout=1)
                return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if cp.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError("the control plane did not start") from None
                await asyncio.sleep(0.05)

    async def attach(self, n: int, host_id: str, seed: DesiredState | None) -> None:
        agent = SimAgent(DesiredFeed(host_id), self.verify_key)
        if seed is not None:
            await agent.take(seed)
        self.agents[host_id] = agent
        conn = self.conns[1 + n % (len(self.conns) - 1)] if len(self.conns) > 1 else self.conns[0]

        async def deliver(msg: Any) -> None:
            had = agent.feed.revision
            await agent.on_message(msg.data, (msg.headers or {}).get(SIGNATURE_HEADER))
            if had <= self._threshold < agent.feed.revision:
                self._remaining -= 1
                if self._remaining == 0:
                    self._all_past.set()
            if had <= self._mark < agent.feed.revision:
                self.passed_at.setdefault(host_id, time.perf_counter())

        await conn.subscribe(f"{DESIRED_PREFIX}.{host_id}", cb=deliver)

    async def join(self, n: int, token: str) -> str:
        """Join host n and wait until every agent, the new one included, has it."""
        # Subscribe before joining (the host id follows from the key), as a
        # real agent's consumer would not miss its first state.
        host_id = host_id_for(public_key(n))
        await self.attach(n, host_id, None)
        for conn in self.conns:
            await server_has_seen_everything(conn)
        async with self.all_past(self.head):
            result = await self.request(
                "join", token=token, public_key=public_key(n), name=f"h{n}", endpoints=[endpoint(n)]
            )
        assert result["host_id"] == host_id
        return host_id

    @contextlib.asynccontextmanager
    async def all_past(self, seq: int, timeout: float = 600) -> AsyncIterator[None]:
        """Around a command: on exit, wait until every agent holds a revision
        after `seq` (it has what the command caused). Counted as messages
        arrive, so that waiting costs O(1) per message, not O(N)."""
        self._threshold = seq
        self._remaining = sum(1 for a in self.agents.values() if a.feed.revision <= seq)
        self._all_past.clear()
        yield
        if self._remaining > 0:
            done = asyncio.ensure_future(self._all_past.wait())
            broken = asyncio.ensure_future(self.failed.wait())
            await asyncio.wait([done, broken], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            broken.cancel()
            if self.failed.is_set():
                raise RuntimeError(
                    f"a bench connection failed: {'; '.join(self.failures)}"
                    + "".join(f"\n  broker: {line}" for line in self.broker_says())
                )
            if not self._all_past.is_set():
                raise TimeoutError(f"{self._remaining} agents did not converge in {timeout} s")

    def received(self) -> int:
        return sum(a.bytes_in for a in self.agents.values())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 0.5), "p95": pct(values, 0.95), "max": max(values)}


@dataclass
class Seed:
    topology: Topology
    token_parts: tuple[str, str]  # key id, secret
    hosts: list[str]


async def seed_network(
    store: JetStreamEventStore,
    hosts: int,
    extra_events: int = 0,
    signing_keys: list[nacl.signing.SigningKey] | None = None,
    policy: str | None = None,
    tags: Callable[[int], tuple[str, ...]] | None = None,
) -> Seed:
    """Decide a network and `hosts` joins here and append the events (and
    `extra_events` endpoint observations), folding them as the control plane
    will, so that the bench knows every host's revision. With `policy`, the
    network has it from the start and host n carries `tags(n)`."""
    topology = Topology()
    pending: list[PendingEvent] = []
    seq = await store.last_sequence()
    now = time.time()

    def run(command: AnyCommand, key_id: str = "", secret: str = "") -> Any:
        nonlocal seq
        ctx = Context(now=now, actor="bench", new_key_id=key_id, new_secret=secret)
        decision = decide(topology, command, ctx)
        for subject, event in decision.events:
            seq += 1
            env = make_envelope(
                event, event_id=str(seq), time=now, actor="bench", command_id=str(seq)
            )
            pending.append(PendingEvent(subject, env))
            fold(topology, RecordedEvent(seq=seq, subject=subject, envelope=env))
        return decision.result

    async def flush(force: bool = False) -> None:
        nonlocal pending
        while len(pending) >= 900 or (force and pending):
            chunk, pending = pending[:900], pending[900:]
            await store.append(chunk)

    run(CreateNetwork(name=NETWORK, cidr="10.128.0.0/9"))
    if policy is not None:
        run(SetPolicy(network=NETWORK, document=policy))
    key = run(CreateEnrollmentKey(network=NETWORK, uses=None), "kbench", "sbench")
    token = make_token("nats://bench", key["key_id"], "sbench")
    ids = []
    for n in range(hosts):
        signing = public_text(signing_keys[n]) if signing_keys else ""
        result = run(
            Join(
                token=token,
                public_key=public_key(n),
                name=f"h{n}",
                endpoints=(endpoint(n),),
                signing_key=signing,
            )
        )
        ids.append(result["host_id"])
        if tags is not None and tags(n):
            run(TagNode(node=result["node_id"], tags=tags(n)))
        await flush()
    for i in range(extra_events):
        host_id = ids[i % len(ids)]
        event = HostEndpointObserved(host_id=host_id, endpoints=(f"192.0.2.{i % 250 + 1}",))
        seq += 1
        env = make_envelope(event, event_id=str(seq), time=now, actor="bench", command_id=str(seq))
        subject = aggregate_subject("host", host_id)
        pending.append(PendingEvent(subject, env))
        fold(topology, RecordedEvent(seq=seq, subject=subject, envelope=env))
        await flush()
    await flush(force=True)
    assert await store.last_sequence() == seq
    return Seed(topology, (key["key_id"], "sbench"), ids)


def seed_state(topology: Topology, host_id: str, builders: Builders | None = None) -> DesiredState:
    """What a simulated agent starts from: its host's revision and interface
    (the seed's peers left out, see the module's docstring), or with
    `builders` its whole state, peers included (the full-state baseline, whose
    agents hold every peer after their first message anyway)."""
    if builders is not None:
        state = builders.state(host_id)
        assert state is not None
        return state
    return DesiredState(
        host_id=host_id,
        revision=topology.revision_of(host_id),
        sections=Sections(
            interface=InterfaceSection(topology).entries(host_id),
            addresses=AddressSection(topology).entries(host_id),
        ),
    )


@contextlib.asynccontextmanager
async def control_plane(
    workdir: Path,
    tag: str,
    *,
    hosts: int = 0,
    full_states: bool = False,
    policy: str | None = None,
    tags: Callable[[int], tuple[str, ...]] | None = None,
) -> AsyncIterator[tuple[Bench, int, Seed | None]]:
    """A nats-server seeded with `hosts` joined hosts, `netmesh server
    --nats-url` as its own process (so that its CPU time can be read), and
    client connections; yields the Bench, the control plane's pid and the seed
    once it answers."""
    # The broker runs the repository's configuration, as `netmesh server` does
    # (its log, at debug level with BENCH_NATS_DEBUG=1, says why it closed a
    # connection: the bench quotes it when one of its connections breaks).
    config = workdir / "bench-nats.conf"
    debug = "\ndebug: true\n" if os.environ.get("BENCH_NATS_DEBUG") else ""
    config.write_text(REPO_NATS_CONF.read_text() + debug)
    server = EmbeddedNats(
        workdir / f"js-{tag}",
        port=free_port(),
        server_name=f"bench-{tag}",
        config=config,
        log_file=workdir / f"nats-{tag}.log",
    )
    await server.start()
    failures: list[str] = []
    broken = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        failures.append(repr(exc))
        broken.set()

    async def on_disconnect() -> None:
        failures.append("disconnected")
        broken.set()

    conns: list[Client] = []
    seed = None
    cp = None
    try:
        for _ in range(CONNECTIONS):
            conns.append(
                await nats.connect(
                    server.url,
                    pending_size=256 * 1024 * 1024,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    max_reconnect_attempts=0,
                )
            )
        setup: dict[str, float] = {}
        started = time.perf_counter()
        if hosts:
            from controlplane.streams import ensure_streams

            await ensure_streams(conns[0].jetstream())
            seed = await seed_network(
                JetStreamEventStore(conns[0], timeout=60), hosts, policy=policy, tags=tags
            )
        setup["seed"] = time.perf_counter() - started
        started = time.perf_counter()
        cp = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "server", "--nats-url", server.url,
            "--data-dir", str(workdir / f"cp-{tag}"), "--log-level", "warning",
            "--desired-states", "full" if full_states else "deltas",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        # The control plane makes its signing key on start; read it the way
        # an agent gets it (the public half) once the file is there.
        key_file = workdir / f"cp-{tag}" / "signing.key"
        deadline = time.monotonic() + 60
        while not key_file.exists():
            if cp.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError("the control plane made no signing key")
            await asyncio.sleep(0.05)
        bench = Bench(server.url, conns, load_or_create(key_file).verify_key)
        bench.admin_key = load_or_create(workdir / f"cp-{tag}" / "admin.key")
        bench.failed = broken
        bench.failures = failures
        bench.broker_log = workdir / f"nats-{tag}.log"
        await bench.wait_ready(cp)
        # Replaying the seed and publishing every host its snapshot (N x N peers).
        setup["control_plane_ready"] = time.perf_counter() - started
        started = time.perf_counter()
        if seed is not None:
            bench.head = await JetStreamEventStore(conns[0]).last_sequence()
            # The baseline's agents start with their whole state: otherwise the
            # first join sends each of them every peer at once, and one process
            # planning and applying N x N peers stops reading its sockets for
            # longer than the broker's write deadline (10 s), which then cuts
            # the connections as slow consumers (seen as "UnexpectedEOF").
            builders = Builders(seed.topology) if full_states else None
            for n, host_id in enumerate(seed.hosts):
                await bench.attach(n, host_id, seed_state(seed.topology, host_id, builders))
                await asyncio.sleep(0)  # the connections keep answering the broker's pings
            for conn in conns:
                await server_has_seen_everything(conn)
        setup["agents_attached"] = time.perf_counter() - started
        bench.setup_seconds = setup
        yield bench, cp.pid, seed
    finally:
        for c in conns:
            await c.close()
        if cp is not None:
            cp.terminate()
            await cp.wait()
        await server.stop()


async def bench_joins(
    hosts: int, joins: int, endpoint_moves: int, workdir: Path, *, full_states: bool = False
) -> dict[str, Any]:
    tag = f"{'full' if full_states else 'delta'}{hosts}"
    stage_started = time.perf_counter()
    async with control_plane(workdir, tag, hosts=hosts, full_states=full_states) as (
        bench,
        cp_pid,
        seed,
    ):
        assert seed is not None
        token = make_token(bench.url, *seed.token_parts)
        # One join first, not measured: it brings simulated agents' fake
        # machines to their full state in the baseline (and warms caches).
        await bench.join(hosts, token)

        latencies, sizes, cpu = [], [], []
        for j in range(joins):
            before_bytes, before_cpu = bench.received(), cpu_seconds(cp_pid)
            start = time.perf_counter()
            await bench.join(hosts + 1 + j, token)
            latencies.append(time.perf_counter() - start)
            cpu.append(cpu_seconds(cp_pid) - before_cpu)
            sizes.append(bench.received() - before_bytes)

        move_latencies, move_sizes = [], []
        for m in range(endpoint_moves):
            host_id = seed.hosts[m % len(seed.hosts)]
            before_bytes = bench.received()
            start = time.perf_counter()
            async with bench.all_past(bench.head):
                await bench.request(
                    "endpoint.report", host_id=host_id, endpoints=[f"198.51.100.{m % 250 + 1}"]
                )
            move_latencies.append(time.perf_counter() - start)
            move_sizes.append(bench.received() - before_bytes)
        gaps = sum(a.gaps for a in bench.agents.values())
        return {
            "hosts": hosts,
            "mode": "full states" if full_states else "deltas",
            "joins": joins,
            "join_converged_ms": {k: v * 1000 for k, v in summary(latencies).items()},
            "bytes_per_join": statistics.mean(sizes),
            "cp_cpu_ms_per_join": statistics.mean(cpu) * 1000,
            "endpoint_moves": endpoint_moves,
            "endpoint_converged_ms": {k: v * 1000 for k, v in summary(move_latencies).items()}
            if move_latencies
            else None,
            "bytes_per_endpoint_change": statistics.mean(move_sizes) if move_sizes else None,
            "gaps": gaps,
            "setup_seconds": bench.setup_seconds,
            "stage_seconds": time.perf_counter() - stage_started,
        }


async def measured_change(
    bench: Bench, mirror: Topology, cp_pid: int, verb: str, command: AnyCommand
) -> tuple[float, int, int, float]:
    """Send `command`; wait until every agent whose state it changed applied
    it. (seconds, hosts changed, bytes they read, control-plane CPU seconds).
    Which hosts it concerns the bench learns by folding the same command into
    `mirror`, its own copy of the topology, as the control plane does."""
    bench._mark = bench.head
    bench.passed_at = {}
    before_bytes, before_cpu = bench.received(), cpu_seconds(cp_pid)
    start = time.perf_counter()
    fields = {
        k: v
        for k, v in msgspec.to_builtins(command).items()
        if k not in ("type", "command_id", "signed_at")
    }
    reply = await bench.admin_request(verb, **fields)
    ctx = Context(now=time.time(), actor="bench", new_key_id="", new_secret="")
    decision = decide(mirror, command, ctx)
    assert len(decision.events) == 1, decision.events
    subject, event = decision.events[0]
    env = make_envelope(event, event_id="m", time=0.0, actor="bench", command_id="m")
    assert reply.seq is not None
    fold(mirror, RecordedEvent(seq=reply.seq, subject=subject, envelope=env))
    affected = [h for h in mirror.hosts if mirror.revision_of(h) == reply.seq]
    done = await bench.until_applied(affected)
    return (
        done - start,
        len(affected),
        bench.received() - before_bytes,
        cpu_seconds(cp_pid) - before_cpu,
    )


async def bench_egress(hosts: int, changes: int, workdir: Path) -> dict[str, Any]:
    """An egress range added to (and taken from) a gateway in a network of
    `hosts`: time until every member applied it, and the bytes: each member
    should read one small delta (a route and its gateway), not a snapshot."""
    stage_started = time.perf_counter()
    async with control_plane(workdir, f"egress{hosts}", hosts=hosts) as (bench, cp_pid, seed):
        assert seed is not None
        mirror = seed.topology
        gateway = next(iter(mirror.nodes_by_host[seed.hosts[0]]))
        results: dict[str, Any] = {"hosts": hosts}
        for name in ("range added", "range removed"):
            ranges = []
            for i in range(changes):
                cidr = f"172.{16 + i // 256}.{i % 256}.0/24"
                if name == "range added":
                    command: AnyCommand = AddEgress(node=gateway, ranges=(cidr,))
                    verb = "egress.add"
                else:
                    command, verb = RemoveEgress(node=gateway, ranges=(cidr,)), "egress.remove"
                ranges.append(await measured_change(bench, mirror, cp_pid, verb, command))
            results[name] = _change_summary(ranges)
        # External clients through the same node as an ingress gateway: the
        # gateway gets the peer and its forwarding, every member the client's
        # address on the gateway's allowed IPs (one small delta each).
        await measured_change(bench, mirror, cp_pid, "ingress.add", AddIngress(node=gateway))
        for name in ("client created", "client removed"):
            runs = []
            for i in range(changes):
                if name == "client created":
                    key = base64.b64encode(hashlib.sha256(b"client%d" % i).digest()).decode()
                    command = CreateClient(
                        network=mirror.nodes[gateway].network,
                        name=f"c{i}",
                        via=gateway,
                        public_key=key,
                    )
                    verb = "client.create"
                else:
                    command = RemoveClient(network=mirror.nodes[gateway].network, name=f"c{i}")
                    verb = "client.remove"
                runs.append(await measured_change(bench, mirror, cp_pid, verb, command))
            results[name] = _change_summary(runs)
        results["gaps"] = sum(a.gaps for a in bench.agents.values())
        results["stage_seconds"] = time.perf_counter() - stage_started
        return results


def _change_summary(runs: list[tuple[float, int, int, float]]) -> dict[str, Any]:
    """What `measured_change` measured over several changes: medians and spread."""
    return {
        "converged_ms": {k: v * 1000 for k, v in summary([r[0] for r in runs]).items()},
        "hosts_changed": statistics.median(r[1] for r in runs),
        "bytes_per_host": statistics.median(r[2] / max(r[1], 1) for r in runs),
        "cp_cpu_ms": statistics.median(r[3] for r in runs) * 1000,
    }


def print_egress(result: dict[str, Any]) -> None:
    for name in ("range added", "range removed", "client created", "client removed"):
        r = result[name]
        print(
            f"egress, {result['hosts']:>5} hosts, {name}: converged p50 "
            f"{r['converged_ms']['p50']:.0f} ms (max {r['converged_ms']['max']:.0f}), "
            f"{r['hosts_changed']:.0f} hosts changed, {r['bytes_per_host']:,.0f} B per host, "
            f"control plane {r['cp_cpu_ms']:.0f} ms CPU"
            + (f" | {result['gaps']} GAPS" if result["gaps"] else ""),
            flush=True,
        )


async def bench_policy(hosts: int, changes: int, workdir: Path) -> dict[str, Any]:
    """A policy change and a tag change under a policy of 51 rules over 50
    tags: time until every agent whose state it changed has applied it, the
    hosts that got a message and the bytes they read. Which hosts a change
    concerns the bench learns by folding the same command into its own copy
    of the topology (the seed), as the control plane does."""
    stage_started = time.perf_counter()
    async with control_plane(
        workdir, f"policy{hosts}", hosts=hosts, policy=policy_document(), tags=policy_tags
    ) as (bench, cp_pid, seed):
        assert seed is not None
        mirror = seed.topology

        results: dict[str, Any] = {"hosts": hosts, "tags": TAGS}
        for name in ("policy change", "tag change"):
            latencies, affected, sizes, cpu = [], [], [], []
            for i in range(changes):
                if name == "policy change":
                    command: AnyCommand = SetPolicy(
                        network=NETWORK, document=policy_document(EXTRA_RULE if i % 2 == 0 else "")
                    )
                    verb = "policy.set"
                else:
                    host_id = seed.hosts[(i * 37) % len(seed.hosts)]
                    node = next(iter(mirror.nodes_by_host[host_id]))
                    tag = f"t{(i * 11 + 5) % TAGS}"
                    verb = "node.untag" if tag in mirror.nodes[node].tags else "node.tag"
                    cls = UntagNode if verb == "node.untag" else TagNode
                    command = cls(node=node, tags=(tag,))
                took, hosts_changed, size, spent = await measured_change(
                    bench, mirror, cp_pid, verb, command
                )
                latencies.append(took)
                affected.append(hosts_changed)
                sizes.append(size)
                cpu.append(spent)
            results[name] = {
                "converged_ms": {k: v * 1000 for k, v in summary(latencies).items()},
                "hosts_changed": statistics.median(affected),
                "bytes": statistics.median(sizes),
                "cp_cpu_ms": statistics.median(cpu) * 1000,
            }
        results["gaps"] = sum(a.gaps for a in bench.agents.values())
        results["setup_seconds"] = bench.setup_seconds
        results["stage_seconds"] = time.perf_counter() - stage_started
        return results


def print_policy(result: dict[str, Any]) -> None:
    for name in ("policy change", "tag change"):
        r = result[name]
        print(
            f"policy, {result['hosts']:>5} hosts, {name}: converged p50 "
            f"{r['converged_ms']['p50']:.0f} ms (max {r['converged_ms']['max']:.0f}), "
            f"{r['hosts_changed']:.0f} hosts changed, {r['bytes'] / 1e3:,.1f} kB, "
            f"control plane {r['cp_cpu_ms']:.0f} ms CPU",
            flush=True,
        )


async def bench_commands(count: int, concurrency: int, workdir: Path) -> dict[str, Any]:
    async with control_plane(workdir, "commands", hosts=1) as (bench, cp_pid, seed):
        assert seed is not None
        host_id = seed.hosts[0]
        latencies: list[float] = []
        semaphore = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with semaphore:
                t0 = time.perf_counter()
                await bench.request(
                    "endpoint.report", host_id=host_id, endpoints=[f"192.0.2.{i % 250 + 1}"]
                )
                latencies.append(time.perf_counter() - t0)

        start, cpu = time.perf_counter(), cpu_seconds(cp_pid)
        await asyncio.gather(*(one(i) for i in range(count)))
        elapsed = time.perf_counter() - start
        return {
            "commands": count,
            "cp_cpu_ms_per_command": (cpu_seconds(cp_pid) - cpu) / count * 1000,
            "concurrency": concurrency,
            "per_second": count / elapsed,
            "latency_ms": {"p50": pct(latencies, 0.5) * 1000, "p99": pct(latencies, 0.99) * 1000},
        }


async def bench_rebuild(events: int, workdir: Path) -> dict[str, Any]:
    """Rebuild the read model from `events` stored events: 1,000 hosts joining
    one network, then endpoint observations (the commonest event in a live
    network), each of which moves every member's revision."""
    server = EmbeddedNats(workdir / "js-rebuild", port=free_port(), server_name="benchrebuild")
    await server.start()
    nc = await connect(server.url)  # as the control plane connects
    try:
        # As the control plane does: events carry a MAC and every one is checked.
        store = JetStreamEventStore(
            nc, timeout=60, mac_key=event_mac_key(nacl.signing.SigningKey.generate())
        )
        await store.ensure_stream()
        hosts = 1000
        await seed_network(store, hosts, extra_events=max(events - 3 * hosts - 2, 0))
        total = await store.last_sequence()
        model = await ReadModel.open(workdir / "rebuild.sqlite3")
        runner = ProjectionRunner(store, model, MemoryDesiredPublisher())
        start = time.perf_counter()
        task = asyncio.create_task(runner.run())
        await runner.wait_for(total, 600)
        elapsed = time.perf_counter() - start
        await store.close()
        await asyncio.wait([task], timeout=30)
        await model.close()
        return {"events": total, "seconds": elapsed, "events_per_second": total / elapsed}
    finally:
        await nc.close()
        await server.stop()


async def storm(
    url: str, keys: list[nacl.signing.SigningKey], cp_pid: int | None
) -> dict[str, Any]:
    """Every host connects at once (as after a broker restart); timed per connection."""
    latencies: list[float] = []
    clients: list[Client] = []

    async def one(key: nacl.signing.SigningKey) -> None:
        t0 = time.perf_counter()
        clients.append(await connect_once(url, timeout=60, **natsid.client_options(key)))
        latencies.append(time.perf_counter() - t0)

    cpu = cpu_seconds(cp_pid) if cp_pid else 0.0
    start = time.perf_counter()
    try:
        await asyncio.gather(*(one(k) for k in keys))
        elapsed = time.perf_counter() - start
    finally:
        for client in clients:
            await client.close()
    result: dict[str, Any] = {
        "connections": len(keys),
        "per_second": len(keys) / elapsed,
        "latency_ms": {"p50": pct(latencies, 0.5) * 1000, "p95": pct(latencies, 0.95) * 1000},
    }
    if cp_pid:
        result["cp_cpu_ms_per_connection"] = (cpu_seconds(cp_pid) - cpu) / len(keys) * 1000
    return result


async def bench_connect_storm(hosts: int, workdir: Path) -> dict[str, Any]:
    """`hosts` agents connecting at once to a guarded broker (each connection
    decided by the control plane through the auth callout), against the same
    connections to a broker that admits anyone."""
    import resource

    from controlplane.brokerauth import BrokerKeys
    from controlplane.server import write_broker_config
    from controlplane.streams import ensure_streams

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * hosts + 1024)), hard))
    keys = [
        nacl.signing.SigningKey(hashlib.sha256(f"storm-{n}".encode()).digest())
        for n in range(hosts)
    ]
    data = workdir / "cp-storm"
    data.mkdir()
    broker_keys = BrokerKeys.derive(load_or_create(data / "signing.key"))
    login = natsid.client_options(broker_keys.controlplane)
    server = EmbeddedNats(
        workdir / "js-storm",
        port=free_port(),
        server_name="bench-storm",
        config=write_broker_config(data, broker_keys),
        client_options=login,
    )
    await server.start()
    cp = None
    try:
        nc = await nats.connect(server.url, **login)
        try:
            await ensure_streams(nc.jetstream())
            await seed_network(JetStreamEventStore(nc, timeout=60), hosts, signing_keys=keys)
        finally:
            await nc.close()
        cp = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "server", "--nats-url", server.url,
            "--data-dir", str(data), "--log-level", "warning",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:  # ready once it admits a host
            try:
                probe = await connect_once(server.url, **natsid.client_options(keys[0]))
                await probe.close()
                break
            except (OSError, nats.errors.Error, TimeoutError):
                if cp.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError("the control plane did not start admitting hosts") from None
                await asyncio.sleep(0.1)
        guarded = await storm(server.url, keys, cp.pid)
    finally:
        if cp is not None and cp.returncode is None:
            cp.terminate()
            await cp.wait()
        await server.stop()
    plain_server = EmbeddedNats(
        workdir / "js-storm-plain", port=free_port(), server_name="bench-plain"
    )
    await plain_server.start()
    try:
        plain = await storm(plain_server.url, keys, None)
    finally:
        await plain_server.stop()
    return {"guarded": guarded, "open": plain}


def bench_agent_apply(peers: int) -> dict[str, Any] | None:
    """bench/agent_apply.py in a network namespace of its own (needs root and wireguard-go)."""
    script = Path(__file__).resolve().parent / "agent_apply.py"
    result = subprocess.run(
        [sys.executable, str(script), "--peers", str(peers)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        return {"skipped": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_avg": os.getloadavg(),
    }


def print_joins(result: dict[str, Any]) -> None:
    c = result["join_converged_ms"]
    line = (
        f"{result['mode']:>11}, {result['hosts']:>5} hosts: join converged p50 {c['p50']:8.1f} ms"
        f"  p95 {c['p95']:8.1f}  max {c['max']:8.1f} | {result['bytes_per_join']:>12,.0f} B/join"
        f" | control plane {result['cp_cpu_ms_per_join']:7.1f} ms CPU/join"
    )
    if result["endpoint_converged_ms"]:
        e = result["endpoint_converged_ms"]
        line += (
            f" | endpoint move p50 {e['p50']:7.1f} ms,"
            f" {result['bytes_per_endpoint_change']:>12,.0f} B"
        )
    if result["gaps"]:
        line += f" | {result['gaps']} GAPS"
    setup = ", ".join(
        f"{what.replace('_', ' ')} {seconds:.0f} s"
        for what, seconds in result["setup_seconds"].items()
    )
    line += f" | stage {result['stage_seconds']:.0f} s ({setup})"
    print(line, flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="10,100,1000,5000")
    parser.add_argument("--baseline-hosts", default="10,100,1000")
    parser.add_argument("--joins", type=int, default=20)
    parser.add_argument("--baseline-joins", type=int, default=5)
    parser.add_argument("--endpoint-moves", type=int, default=10)
    parser.add_argument("--commands", type=int, default=2000)
    parser.add_argument("--rebuild-events", type=int, default=100_000)
    parser.add_argument("--agent-peers", type=int, default=1000)
    parser.add_argument("--storm-hosts", type=int, default=1000)
    parser.add_argument("--policy-hosts", default="1000,5000")
    parser.add_argument("--policy-changes", type=int, default=10)
    parser.add_argument("--egress-hosts", default="1000")
    parser.add_argument("--egress-changes", type=int, default=10)
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": machine(), "joins": [], "baseline": [], "at": time.time()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for hosts in (int(h) for h in args.hosts.split(",") if h):
            result = await bench_joins(hosts, args.joins, args.endpoint_moves, workdir)
            out["joins"].append(result)
            print_joins(result)
        for hosts in (int(h) for h in args.baseline_hosts.split(",") if h):
            result = await bench_joins(
                hosts, args.baseline_joins, args.endpoint_moves // 2, workdir, full_states=True
            )
            out["baseline"].append(result)
            print_joins(result)
        for base in out["baseline"]:
            ours = next((r for r in out["joins"] if r["hosts"] == base["hosts"]), None)
            if ours is None:
                continue
            print(
                f"baseline / deltas at {base['hosts']:>5} hosts:"
                f" bytes per join x{base['bytes_per_join'] / ours['bytes_per_join']:,.1f},"
                f" control plane CPU x"
                f"{base['cp_cpu_ms_per_join'] / max(ours['cp_cpu_ms_per_join'], 0.1):,.1f},"
                f" convergence p50 x"
                f"{base['join_converged_ms']['p50'] / ours['join_converged_ms']['p50']:,.1f}",
                flush=True,
            )
        out["policy"] = []
        for hosts in (int(h) for h in args.policy_hosts.split(",") if h):
            result = await bench_policy(hosts, args.policy_changes, workdir)
            out["policy"].append(result)
            print_policy(result)
        out["egress"] = []
        for hosts in (int(h) for h in args.egress_hosts.split(",") if h):
            result = await bench_egress(hosts, args.egress_changes, workdir)
            out["egress"].append(result)
            print_egress(result)
        out["commands"] = await bench_commands(args.commands, 32, workdir)
        cmd = out["commands"]
        print(
            f"commands: {cmd['per_second']:,.0f}/s at concurrency {cmd['concurrency']}, "
            f"p50 {cmd['latency_ms']['p50']:.1f} ms, p99 {cmd['latency_ms']['p99']:.1f} ms, "
            f"control plane {cmd['cp_cpu_ms_per_command']:.2f} ms CPU/command",
            flush=True,
        )
        out["rebuild"] = await bench_rebuild(args.rebuild_events, workdir)
        print(
            f"rebuild: {out['rebuild']['events']:,} events in {out['rebuild']['seconds']:.1f} s "
            f"= {out['rebuild']['events_per_second']:,.0f} events/s",
            flush=True,
        )
        if args.storm_hosts:
            out["connect_storm"] = storm_result = await bench_connect_storm(
                args.storm_hosts, workdir
            )
            g, o = storm_result["guarded"], storm_result["open"]
            print(
                f"connect storm, {g['connections']:,} hosts at once: guarded broker "
                f"{g['per_second']:,.0f}/s (p50 {g['latency_ms']['p50']:.0f} ms, "
                f"p95 {g['latency_ms']['p95']:.0f} ms, control plane "
                f"{g['cp_cpu_ms_per_connection']:.2f} ms CPU/connection); open broker "
                f"{o['per_second']:,.0f}/s: x{o['per_second'] / g['per_second']:.1f}",
                flush=True,
            )
    if args.agent_peers:
        out["agent"] = bench_agent_apply(args.agent_peers)
        agent = out["agent"] or {}
        if "skipped" in agent:
            print(f"agent: skipped ({agent['skipped']})", flush=True)
        else:
            print(
                f"agent, {agent['peers']} peers on {agent['backend']}: "
                f"first apply {agent['first_apply_ms']:.0f} ms, "
                f"one-peer change {agent['change_ms']:.1f} ms "
                f"(read {agent['read_ms']:.1f}, plan {agent['plan_ms']:.1f}, "
                f"apply {agent['apply_ms']:.1f})",
                flush=True,
            )
    out["seconds"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    from cli.logs import configure_logging

    configure_logging("console", "warning")

    async def run_until_signalled() -> None:
        # SIGTERM cancels like Ctrl-C, so that the finally blocks stop the
        # nats-server and control plane this run started.
        task = asyncio.ensure_future(main())
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await task

    asyncio.run(run_until_signalled())
