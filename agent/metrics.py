"""What the agent counts, for `netmesh agent up --metrics-listen`.

The daemon tells an `AgentMetrics` about each pass (`passed`) and each reading
of the device (`observed`); the base class counts nothing (the default).
`PrometheusAgentMetrics` counts into a registry of its own, and reads the
last device reading at each scrape for the per-peer values, each peer labelled
by its node name from the desired state (bounded by the peer count; a peer the
desired state does not name is labelled by its public key's first characters).

| metric | labels |
| --- | --- |
| `netmesh_agent_applied_revision` | |
| `netmesh_agent_reconcile_passes_total` | outcome (`ok`, `error`) |
| `netmesh_agent_ops_total` | reconciler |
| `netmesh_agent_reconcile_errors_total` | reconciler |
| `netmesh_agent_apply_seconds` (histogram) | |
| `netmesh_agent_peer_last_handshake_age_seconds` | peer (peers that ever handshook) |
| `netmesh_agent_peer_rx_bytes_total`, `netmesh_agent_peer_tx_bytes_total` | peer |
| `netmesh_agent_relay_forwarded_datagrams_total`, `..._forwarded_bytes_total` | pair, side |
| `netmesh_agent_relay_dropped_datagrams_total` | pair, side, reason (`unknown`, `junk`) |

The relay metrics (a relay host, agent/relay.py) are read from the forwarder
at each scrape: `pair` is the pair's key (its host ids), `side` the host the
datagrams came from (its name, else its id).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.backend import DeviceState
from agent.reconcile import RECONCILERS, PassResult
from agent.relay import PairStatus
from events.desired import DesiredState


class AgentMetrics:
    """Counts nothing: the default. Subclasses count."""

    def passed(self, result: PassResult | None, seconds: float) -> None:
        """A pass ended after `seconds`: its result, or None when the machine
        could not be read."""

    def applied(self, revision: int) -> None:
        """The machine matches the desired state of `revision`."""

    def observed(self, device: DeviceState | None, desired: DesiredState | None) -> None:
        """A reading of the device (peers named from `desired`)."""

    def relaying(self, pairs: Callable[[], list[PairStatus]]) -> None:
        """Where the relay's counters are read from (at each scrape)."""


NO_METRICS = AgentMetrics()


def peer_names(desired: DesiredState | None) -> dict[str, str]:
    """public key -> the peer's node name (from the desired state)."""
    if desired is None:
        return {}
    return {key: entry.name for key, entry in desired.sections.peers.items() if entry.name}


class _Peers(Collector):
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        # The last reading and the names of its peers, replaced as one.
        self.reading: tuple[DeviceState | None, dict[str, str]] = (None, {})

    def collect(self) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "netmesh_agent_peer_last_handshake_age_seconds",
            "Seconds since the last handshake with a peer (peers that had one).",
            labels=["peer"],
        )
        rx = CounterMetricFamily(
            "netmesh_agent_peer_rx_bytes", "Bytes received from a peer.", labels=["peer"]
        )
        tx = CounterMetricFamily(
            "netmesh_agent_peer_tx_bytes", "Bytes sent to a peer.", labels=["peer"]
        )
        device, names = self.reading
        now = self._clock()
        for peer in device.peers if device is not None else ():
            name = names.get(peer.public_key) or peer.public_key[:8]
            if peer.last_handshake:
                age.add_metric([name], max(0.0, now - peer.last_handshake))
            rx.add_metric([name], peer.rx_bytes)
            tx.add_metric([name], peer.tx_bytes)
        yield age
        yield rx
        yield tx


class _Relays(Collector):
    def __init__(self) -> None:
        self.pairs: Callable[[], list[PairStatus]] = list

    def collect(self) -> Iterator[Metric]:
        datagrams = CounterMetricFamily(
            "netmesh_agent_relay_forwarded_datagrams",
            "Datagrams a relayed pair's side sent that were forwarded to the other side.",
            labels=["pair", "side"],
        )
        sizes = CounterMetricFamily(
            "netmesh_agent_relay_forwarded_bytes",
            "Bytes (UDP payload) forwarded from a relayed pair's side.",
            labels=["pair", "side"],
        )
        dropped = CounterMetricFamily(
            "netmesh_agent_relay_dropped_datagrams",
            "Datagrams from a relayed pair's side not forwarded: the other side not yet "
            "heard from (unknown), or not shaped like WireGuard (junk).",
            labels=["pair", "side", "reason"],
        )
        for pair in self.pairs():
            for side in pair.sides:
                labels = [pair.key, side.name or side.host]
                datagrams.add_metric(labels, side.forwarded)
                sizes.add_metric(labels, side.forwarded_bytes)
                dropped.add_metric([*labels, "unknown"], side.dropped_unknown)
                dropped.add_metric([*labels, "junk"], side.dropped_junk)
        yield datagrams
        yield sizes
        yield dropped


class PrometheusAgentMetrics(AgentMetrics):
    def __init__(
        self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._revision = Gauge(
            "netmesh_agent_applied_revision",
            "Revision of the desired state the machine last matched in full.",
            registry=r,
        )
        self._passes = Counter(
            "netmesh_agent_reconcile_passes",
            "Reconcile passes (error: the machine could not be read or a reconciler failed).",
            ["outcome"],
            registry=r,
        )
        self._ops = Counter(
            "netmesh_agent_ops", "Ops planned, per reconciler.", ["reconciler"], registry=r
        )
        self._errors = Counter(
            "netmesh_agent_reconcile_errors",
            "Passes in which a reconciler failed.",
            ["reconciler"],
            registry=r,
        )
        self._apply = Histogram(
            "netmesh_agent_apply_seconds",
            "Time of a reconcile pass that changed something (read, plan, apply).",
            registry=r,
        )
        for reconciler in RECONCILERS:  # present at 0 from the start
            self._ops.labels(reconciler.name)
            self._errors.labels(reconciler.name)
        for outcome in ("ok", "error"):
            self._passes.labels(outcome)
        self._peers = _Peers(clock)
        r.register(self._peers)
        self._relays = _Relays()
        r.register(self._relays)

    def passed(self, result: PassResult | None, seconds: float) -> None:
        self._passes.labels("ok" if result is not None and result.ok else "error").inc()
        if result is None:
            return
        for outcome in result.outcomes:
            if outcome.ops:
                self._ops.labels(outcome.name).inc(len(outcome.ops))
            if not outcome.ok:
                self._errors.labels(outcome.name).inc()
        if result.ops:
            self._apply.observe(seconds)

    def applied(self, revision: int) -> None:
        self._revision.set(revision)

    def observed(self, device: DeviceState | None, desired: DesiredState | None) -> None:
        self._peers.reading = (device, peer_names(desired))

    def relaying(self, pairs: Callable[[], list[PairStatus]]) -> None:
        self._relays.pairs = pairs
