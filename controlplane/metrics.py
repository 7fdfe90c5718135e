"""What the control plane counts, for `netmesh server --metrics-listen`.

The pure core (decide, evolve, desired_for) counts nothing: the edges that do
I/O (the command pipeline, the projection runner, the broker gate) are handed
a `ControlPlaneMetrics` and tell it what happened. The base class counts
nothing (the default everywhere); `PrometheusMetrics` counts into a registry
of its own.

| metric | labels |
| --- | --- |
| `netmesh_commands_total` | verb (a known verb, or `unknown`), outcome (`ok` or the error code) |
| `netmesh_command_duration_seconds` (histogram) | verb |
| `netmesh_events_appended_total` | |
| `netmesh_projection_lag_events`, `netmesh_projection_lag_seconds` | |
| `netmesh_desired_messages_total` | kind (`snapshot`, `delta`) |
| `netmesh_desired_bytes_total` | |
| `netmesh_agents_connected` | |
| `netmesh_broker_admissions_total` | identity (`admin`, `host`, `enroll`) |
| `netmesh_broker_refusals_total` | reason (`brokerauth.REFUSAL_REASONS`) |
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from controlplane.rules import spec_for_verb

# (events behind, event time behind in seconds) of the projection, now.
LagReading = Callable[[], tuple[int, float]]
# How many agents listen now (asked of JetStream at each scrape).
AgentCount = Callable[[], Awaitable[int]]
# A scrape waits at most this long for the event loop's answer.
SCRAPE_WAIT = 2.0


class ControlPlaneMetrics:
    """Counts nothing: the default. Subclasses count."""

    def command(self, verb: str, outcome: str, seconds: float) -> None:
        """A command answered: `outcome` is "ok" or the refusal's error code."""

    def appended(self, events: int) -> None:
        """Events this process appended to the event stream."""

    def desired_published(self, kind: str, size: int) -> None:
        """A desired-state message (`snapshot` or `delta`) of `size` bytes landed."""

    def broker_admitted(self, identity: str) -> None:
        """The auth callout admitted a connection as `identity` (admin, host, enroll)."""

    def broker_refused(self, reason: str) -> None:
        """The auth callout refused a connection, for `reason` (a bounded code)."""

    def watch_projection(self, lag: LagReading) -> None:
        """Read the projection's lag at each scrape."""

    def watch_agents(self, count: AgentCount, loop: asyncio.AbstractEventLoop) -> None:
        """Count the connected agents at each scrape (run on `loop`)."""

    def hook_delivery(self, outcome: str) -> None:
        """A webhook POST by this control plane: `ok` or `failed`."""

    def watch_hooks(self, failing: Callable[[], int]) -> None:
        """Read how many hooks fail now (their last POST here failed) at each scrape."""


NO_METRICS = ControlPlaneMetrics()


def verb_label(verb: str) -> str:
    """The verb as a label: a known one, or `unknown` (label values stay bounded
    whatever subjects clients send to)."""
    return verb if spec_for_verb(verb) is not None else "unknown"


class _ProjectionLag(Collector):
    def __init__(self, lag: LagReading) -> None:
        self._lag = lag

    def collect(self) -> Iterator[GaugeMetricFamily]:
        events, seconds = self._lag()
        yield GaugeMetricFamily(
            "netmesh_projection_lag_events",
            "Events in the stream (as this control plane knows it) not yet in the read model.",
            value=events,
        )
        yield GaugeMetricFamily(
            "netmesh_projection_lag_seconds",
            "Event time between the newest event and the last one in the read model.",
            value=seconds,
        )


class _AgentsConnected(Collector):
    """Asks at each scrape (from the HTTP server's thread) on the control
    plane's event loop; nothing when it does not answer in time."""

    def __init__(self, count: AgentCount, loop: asyncio.AbstractEventLoop) -> None:
        self._count = count
        self._loop = loop

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is self._loop:
                return  # scraped from the loop itself: it cannot answer while we wait
        try:
            future = asyncio.run_coroutine_threadsafe(self._ask(), self._loop)
            count = future.result(SCRAPE_WAIT)
        except Exception:  # the loop gone, JetStream not answering: no value
            return
        yield GaugeMetricFamily(
            "netmesh_agents_connected",
            "Hosts whose agent is subscribed to its desired state now.",
            value=count,
        )

    async def _ask(self) -> int:
        return await self._count()


class _HooksFailing(Collector):
    def __init__(self, failing: Callable[[], int]) -> None:
        self._failing = failing

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "netmesh_hooks_failing",
            "Webhooks whose last delivery attempt by this control plane failed.",
            value=self._failing(),
        )


class PrometheusMetrics(ControlPlaneMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._commands = Counter(
            "netmesh_commands_total", "Commands answered.", ["verb", "outcome"], registry=r
        )
        self._duration = Histogram(
            "netmesh_command_duration_seconds",
            "Time from a command's arrival to its answer (read-your-writes included).",
            ["verb"],
            registry=r,
        )
        self._appended = Counter(
            "netmesh_events_appended", "Events appended by this control plane.", registry=r
        )
        self._desired_messages = Counter(
            "netmesh_desired_messages",
            "Desired-state messages published.",
            ["kind"],
            registry=r,
        )
        self._desired_bytes = Counter(
            "netmesh_desired_bytes", "Bytes of desired-state messages published.", registry=r
        )
        self._admissions = Counter(
            "netmesh_broker_admissions",
            "Connections the auth callout admitted.",
            ["identity"],
            registry=r,
        )
        self._refusals = Counter(
            "netmesh_broker_refusals",
            "Connections the auth callout refused.",
            ["reason"],
            registry=r,
        )
        self._hook_deliveries = Counter(
            "netmesh_hook_deliveries", "Webhook POSTs, by outcome.", ["outcome"], registry=r
        )

    def command(self, verb: str, outcome: str, seconds: float) -> None:
        label = verb_label(verb)
        self._commands.labels(label, outcome).inc()
        self._duration.labels(label).observe(seconds)

    def appended(self, events: int) -> None:
        self._appended.inc(events)

    def desired_published(self, kind: str, size: int) -> None:
        self._desired_messages.labels(kind).inc()
        self._desired_bytes.inc(size)

    def broker_admitted(self, identity: str) -> None:
        self._admissions.labels(identity).inc()

    def broker_refused(self, reason: str) -> None:
        self._refusals.labels(reason).inc()

    def watch_projection(self, lag: LagReading) -> None:
        self.registry.register(_ProjectionLag(lag))

    def watch_agents(self, count: AgentCount, loop: asyncio.AbstractEventLoop) -> None:
        self.registry.register(_AgentsConnected(count, loop))

    def hook_delivery(self, outcome: str) -> None:
        self._hook_deliveries.labels(outcome).inc()

    def watch_hooks(self, failing: Callable[[], int]) -> None:
        self.registry.register(_HooksFailing(failing))
