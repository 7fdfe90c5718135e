"""Broker access, wired into the control plane: the auth callout gate (the
decisions are in `brokerauth`), and cutting off identities that lose access
(at once after the event that took it, and by a sweep every minute)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from nacl.signing import SigningKey
from nats.aio.client import Client

from controlplane.brokerauth import (
    SWEEP_INTERVAL,
    BrokerCounter,
    BrokerGate,
    BrokerKeys,
    names_at_stake,
    still_admitted,
)
from controlplane.throttle import FailureWindow
from events.envelope import RecordedEvent
from projections.runner import ProjectionRunner
from projections.topology import Topology

log = structlog.get_logger("netmesh.controlplane")


class Access:
    def __init__(
        self,
        nc: Client,
        system_nc: Client,
        signing_key: SigningKey,
        topology: Callable[[], Topology],
        queue: str,
        failures: FailureWindow,
        metrics: BrokerCounter | None = None,
    ) -> None:
        self._topology = topology
        self.gate = BrokerGate(
            nc, system_nc, BrokerKeys.derive(signing_key), topology, queue, failures, metrics
        )
        self._runner: ProjectionRunner | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self, runner: ProjectionRunner) -> None:
        self._runner = runner
        await self.gate.start()
        self._spawn(self._sweep_forever(runner), "sweep")

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        await self.gate.stop()
        for task in self._background:
            task.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=timeout)

    def observe(self, topology: Topology, recorded: RecordedEvent) -> Callable[[], None] | None:
        """Before an event is applied to the write model: if it may take access
        from someone, what to do once it is applied (disconnect who lost it)."""
        at_stake = names_at_stake(topology, recorded.envelope.data)
        if not at_stake:
            return None

        def after() -> None:
            lost = {n for n in at_stake if not still_admitted(topology, n)}
            runner = self._runner
            # While catching up at start, the sweep does it, once.
            if lost and runner is not None and runner.caught_up.is_set():
                self._spawn(
                    self._disconnect(runner, lost, recorded.seq), f"disconnect {sorted(lost)}"
                )

        return after

    async def _disconnect(self, runner: ProjectionRunner, names: set[str], seq: int) -> None:
        # First let the host receive the desired state that removes it (its
        # agent tears its interface down), then cut it off.
        await runner.wait_published(seq, timeout=5)
        try:
            await self.gate.disconnect(names)
        except Exception as exc:  # the minute's sweep tries again
            log.info("disconnect failed", names=sorted(names), error=repr(exc))

    async def _sweep_forever(self, runner: ProjectionRunner) -> None:
        """Once caught up (a removal may have happened just before a restart)
        and then every minute: disconnect whoever is connected but no longer
        admitted. Only when every desired state the write model implies is
        published: a removed host gets its last state before it is cut off."""
        await runner.caught_up.wait()
        while not self._stopping:
            if runner.published_through >= self._topology().last_seq:
                try:
                    await self.gate.sweep()
                except Exception as exc:  # the broker is away: try again later
                    log.info("connection sweep failed", error=repr(exc))
            await asyncio.sleep(SWEEP_INTERVAL)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
