"""The control plane process: wires the command pipeline, queries, consumers,
broker access and the projections together; each is its own module.

Commands arrive on `netmesh.cmd.<verb>` (request/reply), are decided against
an in-memory topology kept current from the stream (the write model), and
become events appended with optimistic concurrency (`pipeline`). Queries on
`netmesh.query.<what>` are answered from the SQLite read model (`queries`).
Agents and readers ask here for their consumers (`consumers`); a guarded broker
asks here who may connect (`access`). Several replicas may run: they share the
subjects through a queue group.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js.errors import ServiceUnavailableError

from controlplane.access import Access
from controlplane.brokerauth import BrokerGate
from controlplane.consumers import Consumers
from controlplane.convergence import Convergence
from controlplane.enrollment import EnrollmentSecrets
from controlplane.hooks import HookDelivery
from controlplane.metrics import NO_METRICS, ControlPlaneMetrics
from controlplane.pipeline import CommandPipeline
from controlplane.publisher import JetStreamDesiredPublisher
from controlplane.queries import QueryService
from controlplane.replies import Responder
from controlplane.streams import ensure_streams
from controlplane.throttle import FailureWindow
from controlplane.timetravel import TimeTravel
from controlplane.writemodel import WriteModel
from events.commands import Reply
from events.connect import server_has_seen_everything
from events.jetstream import JetStreamEventStore
from events.signing import event_mac_key, load_or_create
from events.store import StoreError
from events.subjects import (
    COMMAND_PREFIX,
    CONSUME_PREFIX,
    QUERY_PREFIX,
    READ_EVENTS_PREFIX,
    RESYNC_PREFIX,
)
from projections.runner import ProjectionRunner
from projections.sqlite import ReadModel
from projections.topology import Topology

log = structlog.get_logger("netmesh.controlplane")

QUEUE_GROUP = "netmesh-controlplane"
# How long a starting control plane waits for JetStream to answer.
JETSTREAM_WAIT = 30.0


class ControlPlane:
    def __init__(
        self,
        nc: Client,
        data_dir: Path,
        advertise_url: str,
        *,
        snapshots_only: bool = False,
        system_nc: Client | None = None,
        broker_ca: bytes | None = None,
        metrics: ControlPlaneMetrics = NO_METRICS,
        replicas: int = 1,
    ) -> None:
        self._nc = nc
        self._replicas = replicas  # copies of each stream, on a JetStream cluster
        self._metrics = metrics
        self._snapshots_only = snapshots_only
        self.data_dir = data_dir
        # The key desired states are signed with; its public half goes into
        # every enrollment token, and agents pin it. Raises SigningKeyError.
        self.signing_key = load_or_create(data_dir / "signing.key")
        self.advertise_url = advertise_url
        self.broker_ca = broker_ca  # goes into tokens: agents pin it for tls://
        self.store = JetStreamEventStore(nc, mac_key=event_mac_key(self.signing_key))
        self.write = WriteModel(self.store)
        self.model: ReadModel | None = None
        self.runner: ProjectionRunner | None = None
        self.failed = asyncio.Event()  # set when a consumer the service needs has died
        self.failure: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Subscription] = []
        self._stopping = False
        self._responder = Responder(nc)
        join_failures = FailureWindow()
        secrets = EnrollmentSecrets(self.signing_key, advertise_url, broker_ca)
        self.commands = CommandPipeline(
            self.store,
            self.write,
            self._responder,
            join_failures,
            secrets,
            self._read_your_writes,
            metrics,
        )
        self.timetravel = TimeTravel(self.store)
        self.queries = QueryService(
            nc, self._responder, lambda: self.model, self._topology, self._plan, self.timetravel
        )
        # With a connection to the broker's system account, this control plane
        # decides who may connect (auth callout) and disconnects who lost access.
        self.access: Access | None = None
        if system_nc is not None:
            self.access = Access(
                nc,
                system_nc,
                self.signing_key,
                self._topology,
                QUEUE_GROUP,
                join_failures,
                metrics,
            )
            self.write.observer = self.access.observe
        self.consumers = Consumers(
            nc, self._responder, self._topology, lambda: self.runner, self.access is not None
        )
        self.hooks = HookDelivery(
            nc, event_mac_key(self.signing_key), secrets, self._topology, metrics
        )
        metrics.watch_hooks(lambda: len(self.hooks.failing))
        self.queries.hooks = self.hooks
        self.queries.caught_up = self._caught_up_to
        self.queries.convergence = Convergence(
            self.store,
            lambda: self.model,
            self._read_your_writes,
            self.consumers.connected_hosts,
            self.queries.applied_report,
        )

    @property
    def write_model(self) -> Topology:
        return self.write.topology

    @property
    def gate(self) -> BrokerGate | None:
        return self.access.gate if self.access is not None else None

    @property
    def not_answered(self) -> int:
        """Requests whose reply address was not an inbox."""
        return self._responder.not_answered

    def _topology(self) -> Topology:
        return self.write.topology

    def projection_lag(self) -> tuple[int, float]:
        """(events, seconds of event time) the read model is behind the stream's
        head as this process knows it (its write model, which has its own
        appends at once and others' as they arrive)."""
        runner = self.runner
        if runner is None:
            return 0, 0.0
        behind = max(0, self.write.topology.last_seq - runner.checkpoint)
        if not behind or not runner.checkpoint_time:
            # Not behind, or nothing applied since start (no time to compare with).
            return behind, 0.0
        return behind, max(0.0, self.write.last_time - runner.checkpoint_time)

    def _plan(self, verb: str, payload: bytes, signer: str | None, signature: str | None) -> Reply:
        return self.commands.plan(verb, payload, signer=signer, signature=signature)

    async def _read_your_writes(self, seq: int, timeout: float) -> None:
        assert self.runner is not None
        await self.runner.wait_for(seq, timeout)

    async def _caught_up_to(self, seq: int, timeout: float) -> int | None:
        """Read-your-writes across replicas: wait until this replica's write
        and read models have applied event `seq` (or the stream's last event,
        when the stream is shorter: then `seq` came from another stream). The
        sequence applied so far when it takes longer than `timeout`, else None."""
        runner = self.runner
        assert runner is not None
        if runner.checkpoint >= seq and self.write.topology.last_seq >= seq:
            return None
        try:
            async with asyncio.timeout(timeout):
                seq = min(seq, await self.store.last_sequence())
                await self.write.wait_for(seq, timeout)
                if await runner.wait_for(seq, timeout):
                    return None
        except (TimeoutError, StoreError):
            pass
        return min(runner.checkpoint, self.write.topology.last_seq)

    async def _ensure_streams(self, wait: float = JETSTREAM_WAIT) -> None:
        """The streams, once JetStream answers: a cluster's brokers started
        together elect a JetStream leader first (a few seconds). Raises
        nats.errors.Error when it does not answer within `wait`, and at once on
        a refusal (such as `insufficient resources` for --replicas)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            try:
                await ensure_streams(self._nc.jetstream(), self._replicas)
                return
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                ServiceUnavailableError,
            ) as exc:
                if loop.time() > deadline:
                    raise
                log.info("JetStream not ready yet, waiting", error=repr(exc))
                await asyncio.sleep(0.5)

    async def start(self) -> None:
        """Create streams, catch up, then start answering. Raises on NATS errors."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self._ensure_streams()
        self.model = await ReadModel.open(self.data_dir / "readmodel.sqlite3")
        self.runner = ProjectionRunner(
            self.store,
            self.model,
            JetStreamDesiredPublisher(self._nc, self.signing_key),
            snapshots_only=self._snapshots_only,
            metrics=self._metrics,
        )
        self._metrics.watch_projection(self.projection_lag)
        self._metrics.watch_agents(self.consumers.connected_agents, asyncio.get_running_loop())
        self._tasks.append(
            asyncio.create_task(self._supervised("write model", self.write.follow()))
        )
        self._tasks.append(asyncio.create_task(self._supervised("projection", self.runner.run())))
        await self.write.catch_up()
        await self.commands.bootstrap_admin(self.data_dir)
        if self.access is not None:
            await self.access.start(self.runner)
        await asyncio.wait_for(self.runner.caught_up.wait(), 120)
        self._tasks.append(asyncio.create_task(self._supervised("webhooks", self.hooks.run())))
        for prefix, callback in (
            (f"{COMMAND_PREFIX}.>", self.commands.on_command),
            (f"{QUERY_PREFIX}.>", self.queries.on_query),
            (f"{RESYNC_PREFIX}.*", self.consumers.on_resync),
            (f"{CONSUME_PREFIX}.*", self.consumers.on_consume),
            (f"{READ_EVENTS_PREFIX}.*", self.consumers.on_read_events),
        ):
            self._subs.append(await self._nc.subscribe(prefix, queue=QUEUE_GROUP, cb=callback))
        # Make sure the server has our subscriptions before we say we are ready.
        await server_has_seen_everything(self._nc)
        log.info("control plane ready", seq=self.write_model.last_seq, url=self.advertise_url)

    async def stop(self, timeout: float = 10.0) -> list[str]:
        """Stop answering, stop the consumers, close the read model (bounded).

        Returns the names of tasks that did not stop in time (none, normally).
        """
        self._stopping = True
        if self.access is not None:
            await self.access.stop(timeout / 4)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        await self.consumers.close()
        # Ending the consumers ends the tasks that follow them; cancellation is
        # only the fallback (cancelling a task inside nats-py's subscription
        # iterator has been seen to leave it stuck).
        await self.store.close()
        self.hooks.close()
        stuck: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=timeout / 2)
            for task in stuck:
                task.cancel()
        if stuck:
            _, stuck = await asyncio.wait(stuck, timeout=timeout / 2)
        for task in stuck:
            # Should not happen; say where it is stuck rather than hang.
            log.error("task did not stop", task=task.get_name(), awaiting=awaiting(task))
        self._tasks.clear()
        await self.timetravel.close()
        if self.model is not None:
            await self.model.close()
            self.model = None
        return sorted(task.get_name() for task in stuck)

    async def _supervised(self, what: str, work: Coroutine[Any, Any, None]) -> None:
        """Run a consumer the service cannot live without; if it ends, the
        service has failed (and says why) rather than answering from a dead view."""
        try:
            await work
            why = "stopped following the event stream"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("consumer failed", consumer=what)
            why = f"{type(exc).__name__}: {exc}"
        if not self._stopping:
            self.failure = f"{what} {why}"
            self.failed.set()


def awaiting(task: asyncio.Task[Any]) -> list[str]:
    """Where a suspended task is, innermost last (for diagnostics)."""
    where: list[str] = []
    awaitable: Any = task.get_coro()
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
        if frame is not None:
            where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "ag_await", None)
    return where
