"""Prometheus metrics, scraped over HTTP from real parts: a control plane on a
real (guarded) nats-server, and an agent on the fake machine against it."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from prometheus_client.parser import text_string_to_metric_families

from agent.daemon import Agent, enroll
from agent.fake import FakeBackend, FakeDns, FakeFirewall, FakeLink, FakeMachine
from agent.metrics import PrometheusAgentMetrics
from agent.statedir import Identity, StateDir, private_key_b64, public_key_of
from controlplane.embedded import EmbeddedNats
from controlplane.metrics import PrometheusMetrics
from controlplane.service import ControlPlane
from events import natsid
from events.commands import ErrorCode
from events.connect import connect_once, refused_by_broker
from events.metrics import MetricsServer, serve_metrics, split_metrics_listen
from events.signing import load_or_create
from events.tokens import parse_token
from tests.factories import public_key
from tests.meshnet import Mesh, mesh_fixture  # noqa: F401
from tests.netns import ping, testnet_fixture, wait_until  # noqa: F401
from tests.test_broker_access import guarded_broker
from tests.test_controlplane import Admin, network_with_token

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(server: MetricsServer) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(server.url, timeout=5) as answer:
            assert answer.status == 200
            return str(answer.read().decode())

    samples: Samples = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 when absent (a counter not moved yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class Plane:
    server: EmbeddedNats
    plane: ControlPlane
    admin: Admin
    metrics: MetricsServer

    async def scrape(self) -> Samples:
        return await scrape(self.metrics)


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    data = tmp_path / "cp"
    server, keys = await guarded_broker(tmp_path, data)
    cp_nc = await nats.connect(server.url, **natsid.client_options(keys.controlplane))
    system_nc = await nats.connect(server.url, **natsid.client_options(keys.system))
    metrics = PrometheusMetrics()
    control_plane = ControlPlane(cp_nc, data, server.url, system_nc=system_nc, metrics=metrics)
    endpoint = serve_metrics(metrics.registry, "127.0.0.1:0")
    admin_nc = None
    try:
        await control_plane.start()
        admin_key = load_or_create(data / "admin.key")
        admin_nc = await nats.connect(server.url, **natsid.client_options(admin_key))
        yield Plane(server, control_plane, Admin(admin_nc, admin_key), endpoint)
    finally:
        endpoint.close()
        if admin_nc is not None:
            await admin_nc.close()
        assert await control_plane.stop() == []
        await cp_nc.close()
        await system_nc.close()
        await server.stop()


async def test_control_plane_metrics_move_with_commands_joins_and_connections(
    plane: Plane,
) -> None:
    before = await plane.scrape()
    assert value(before, "netmesh_commands_total", verb="network.create", outcome="ok") == 0
    appended = value(before, "netmesh_events_appended_total")
    assert appended >= 1  # the first admin, at start

    await plane.admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    refused = await plane.admin.send(
        "netmesh.cmd.network.create", {"name": "office", "cidr": "10.20.0.0/24"}
    )
    assert not refused.ok and refused.code == ErrorCode.CONFLICT
    unknown = await plane.admin.send("netmesh.cmd.no.such.verb", {})
    assert unknown.code == ErrorCode.INVALID

    after = await plane.scrape()
    assert value(after, "netmesh_commands_total", verb="network.create", outcome="ok") == 1
    assert value(after, "netmesh_commands_total", verb="network.create", outcome="conflict") == 1
    # Verbs nobody knows share one label value: the set stays bounded.
    assert value(after, "netmesh_commands_total", verb="unknown", outcome="invalid") == 1
    assert value(after, "netmesh_command_duration_seconds_count", verb="network.create") == 2
    assert value(after, "netmesh_events_appended_total") > appended

    # A join (enrolling over the guarded broker) publishes desired states.
    token = str((await plane.admin.ok("key.create", network="office", uses=5))["token"])
    for name in ("one", "two"):
        await enroll(
            token,
            plane.server.url,
            name,
            public_key_of(PrivateKey.generate()),
            ["192.0.2.1"],
            None,
            SigningKey.generate(),
        )

    def messages(samples: Samples) -> float:
        kinds = ("snapshot", "delta")
        return sum(value(samples, "netmesh_desired_messages_total", kind=kind) for kind in kinds)

    async def published() -> Samples | None:
        # Both joins' messages out and nothing behind (between the two joins
        # the lag is 0 too: waiting on it alone raced the second join).
        samples = await plane.scrape()
        lag = value(samples, "netmesh_projection_lag_events")
        return samples if messages(samples) >= 3 and not lag else None

    joined = await wait_until(published, message="desired states published, no lag")
    assert joined is not None
    assert value(joined, "netmesh_commands_total", verb="join", outcome="ok") == 2
    # The first host's snapshot, then the second's snapshot and a delta to the first.
    assert messages(joined) == 3
    assert value(joined, "netmesh_desired_messages_total", kind="snapshot") >= 2
    assert value(joined, "netmesh_projection_lag_seconds") == 0
    # Enrolled, but no agent runs: none listens to its desired state.
    assert ("netmesh_agents_connected", frozenset()) in joined
    assert value(joined, "netmesh_agents_connected") == 0

    # The broker's gate: admissions by kind of identity, refusals by reason.
    assert value(joined, "netmesh_broker_admissions_total", identity="admin") >= 1
    assert value(joined, "netmesh_broker_admissions_total", identity="enroll") == 2
    with pytest.raises((OSError, nats.errors.Error, TimeoutError)) as caught:
        await connect_once(plane.server.url, **natsid.client_options(SigningKey.generate()))
    assert refused_by_broker(caught.value)
    refusals = await plane.scrape()  # counted before the broker was answered
    assert value(refusals, "netmesh_broker_refusals_total", reason="unknown_key") == 1


@pytest.fixture
async def agent_setup(
    nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[tuple[Admin, Agent, str, MetricsServer, MetricsServer]]:
    """A control plane, and an agent on the fake machine serving its metrics."""
    cp_nc = await nats.connect(nats_server.url)
    admin_nc = await nats.connect(nats_server.url)
    plane_metrics = PrometheusMetrics()
    control_plane = ControlPlane(cp_nc, tmp_path / "cp", nats_server.url, metrics=plane_metrics)
    await control_plane.start()
    plane_endpoint = serve_metrics(plane_metrics.registry, "127.0.0.1:0")
    admin = Admin(admin_nc, load_or_create(tmp_path / "cp" / "admin.key"))
    token = await network_with_token(admin)
    key = PrivateKey.generate()
    state = StateDir(tmp_path / "agent")
    state.ensure()
    _, joined = await enroll(
        token, nats_server.url, "me", public_key_of(key), ["192.0.2.1"], None, state.signing_key()
    )
    machine = FakeMachine()
    metrics = PrometheusAgentMetrics()
    agent = Agent(
        identity=Identity(
            host_id=joined["host_id"],
            name="me",
            server=nats_server.url,
            server_key=parse_token(token).server_key,
        ),
        state=state,
        backend=FakeBackend("nm0", machine),
        link=FakeLink("nm0", machine),
        firewall=FakeFirewall(),
        dns=FakeDns(),
        private_key=private_key_b64(key),
        public_key=public_key_of(key),
        metrics=metrics,
    )
    endpoint = serve_metrics(metrics.registry, "127.0.0.1:0")
    loop = asyncio.create_task(agent.reconcile_forever())
    try:
        await agent.connect_forever()
        yield admin, agent, token, endpoint, plane_endpoint
    finally:
        endpoint.close()
        plane_endpoint.close()
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await agent.close()
        assert await control_plane.stop() == []
        await cp_nc.close()
        await admin_nc.close()


async def test_agent_metrics_follow_what_it_applied(
    agent_setup: tuple[Admin, Agent, str, MetricsServer, MetricsServer],
) -> None:
    admin, agent, token, endpoint, plane_endpoint = agent_setup
    # The control plane sees the agent listening on its desired state.
    await wait_until(
        lambda: _agents_connected(plane_endpoint, 1), message="the control plane counts the agent"
    )
    await admin.ok("join", token=token, public_key=public_key(2), name="two")

    async def applied_with_peer() -> Samples | None:
        samples = await scrape(endpoint)
        desired = agent.desired
        if desired is None or agent.applied is None or agent.applied.revision != desired.revision:
            return None
        if ("netmesh_agent_peer_rx_bytes_total", frozenset({("peer", "two")})) not in samples:
            return None
        return samples

    samples = await wait_until(applied_with_peer, message="the peer applied and scraped")
    assert samples is not None
    assert agent.applied is not None
    assert value(samples, "netmesh_agent_applied_revision") == agent.applied.revision
    assert value(samples, "netmesh_agent_reconcile_passes_total", outcome="ok") >= 1
    assert value(samples, "netmesh_agent_ops_total", reconciler="peers") >= 1
    assert value(samples, "netmesh_agent_ops_total", reconciler="interface") >= 1
    assert value(samples, "netmesh_agent_reconcile_errors_total", reconciler="peers") == 0
    assert value(samples, "netmesh_agent_apply_seconds_count") >= 1
    assert value(samples, "netmesh_agent_peer_tx_bytes_total", peer="two") == 0

    # Another change: the revision follows, passes move on.
    passes = value(samples, "netmesh_agent_reconcile_passes_total", outcome="ok")
    await admin.ok("join", token=token, public_key=public_key(3), name="three")

    async def moved() -> Samples | None:
        samples = await scrape(endpoint)
        applied = agent.applied
        if applied is None or value(samples, "netmesh_agent_applied_revision") != applied.revision:
            return None
        three = ("netmesh_agent_peer_rx_bytes_total", frozenset({("peer", "three")}))
        return samples if three in samples else None

    later = await wait_until(moved, message="the second peer applied and scraped")
    assert later is not None
    assert value(later, "netmesh_agent_reconcile_passes_total", outcome="ok") > passes


async def _agents_connected(endpoint: MetricsServer, count: int) -> bool:
    return value(await scrape(endpoint), "netmesh_agents_connected") == count


@pytest.mark.parametrize("listen", ["9470", ":9470", "127.0.0.1:", "127.0.0.1:99999", "x:y"])
def test_metrics_listen_must_name_host_and_port(listen: str) -> None:
    with pytest.raises(ValueError, match="--metrics-listen"):
        split_metrics_listen(listen)


def test_metrics_listen_binds_what_it_is_told() -> None:
    assert split_metrics_listen("[::1]:9470") == ("::1", 9470)
    endpoint = serve_metrics(PrometheusMetrics().registry, "127.0.0.1:0")
    try:
        assert endpoint.server.server_address[0] == "127.0.0.1"
        assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
    finally:
        endpoint.close()


# -- real tunnels: wireguard-go in network namespaces --------------------------

_SCRAPE = (
    "import urllib.request, sys; "
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
)


@pytest.mark.netns
async def test_agent_peer_bytes_move_with_pings(mesh: Mesh) -> None:
    await mesh.start_server()
    await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
    token = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
    for name in ("a", "b"):
        await mesh.start_agent(
            name, token, ("--resync-interval", "1", "--metrics-listen", "127.0.0.1:9470")
        )
    nodes = await wait_until(
        lambda: _joined(mesh, ("a", "b")), timeout=60, interval=0.3, message="both joined"
    )
    b_address = nodes["b"]["address"]
    assert await wait_until(
        lambda: ping(mesh.hosts["a"], b_address), timeout=20, message="ping a -> b"
    )

    async def scrape_a() -> Samples:
        # The agent listens on a's loopback: scrape from inside a.
        result = await mesh.hosts["a"].run(
            sys.executable, "-c", _SCRAPE, "http://127.0.0.1:9470/metrics"
        )
        samples: Samples = {}
        for family in text_string_to_metric_families(result.stdout):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    async def peer_b() -> Samples | None:
        samples = await scrape_a()
        age = ("netmesh_agent_peer_last_handshake_age_seconds", frozenset({("peer", "b")}))
        return samples if age in samples else None

    before = await wait_until(peer_b, timeout=20, message="a's metrics show peer b")
    assert before is not None
    rx = value(before, "netmesh_agent_peer_rx_bytes_total", peer="b")
    tx = value(before, "netmesh_agent_peer_tx_bytes_total", peer="b")
    assert value(before, "netmesh_agent_peer_last_handshake_age_seconds", peer="b") < 180
    assert await ping(mesh.hosts["a"], b_address, count=5)
    # 5 echo requests and replies of 84 bytes each, inside WireGuard's framing.

    async def moved() -> bool:
        samples = await scrape_a()
        return (
            value(samples, "netmesh_agent_peer_rx_bytes_total", peer="b") >= rx + 5 * 84
            and value(samples, "netmesh_agent_peer_tx_bytes_total", peer="b") >= tx + 5 * 84
        )

    await wait_until(moved, timeout=10, message="rx/tx bytes to b moved with the pings")


async def _joined(mesh: Mesh, names: tuple[str, ...]) -> dict[str, Any] | None:
    rows = {r["name"]: r for r in await mesh.cli_json("status")}
    if not all(name in rows and rows[name]["state"] == "in sync" for name in names):
        return None
    return {n["name"]: n for n in await mesh.cli_json("node", "list")}


@pytest.mark.parametrize("command", [["server"], ["agent", "up"]])
def test_a_bad_metrics_listen_is_refused_before_anything_starts(
    command: list[str], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from cli.main import cli

    args = [*command, "--metrics-listen", "9470"]
    args += ["--data-dir", str(tmp_path)] if command == ["server"] else []
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "--metrics-listen" in result.output
    assert not list(tmp_path.iterdir())  # nothing was started
