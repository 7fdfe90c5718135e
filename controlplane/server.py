"""`netmesh server`: the control plane process, with an embedded NATS unless
given one."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import ssl
from pathlib import Path
from typing import Any

import nats
import nats.errors
import structlog

from controlplane.brokerauth import BrokerKeys, server_config
from controlplane.brokertls import BrokerTls, ensure_broker_tls
from controlplane.embedded import NATS_CONF, EmbeddedNats, NatsServerError
from controlplane.http import HttpServer, ReadApi, serve_http
from controlplane.metrics import NO_METRICS, ControlPlaneMetrics, PrometheusMetrics
from controlplane.service import ControlPlane
from events import natsid
from events.connect import (
    broker_guarded,
    connect,
    connect_once,
    refused_by_broker,
    server_urls,
    tls_options,
    uses_tls,
)
from events.metrics import MetricsServer, serve_metrics, split_metrics_listen
from events.signing import load_or_create

log = structlog.get_logger("netmesh.server")


# A cluster's brokers in the order --nats-url gives them, not shuffled: the
# first is this control plane's own (the broker on its machine), the others
# where it goes when that one dies. Listing a different broker first on each
# control plane keeps them apart, so a broker's death costs at most one of them
# its connection (and the auth callout keeps an answer: every login waits for
# one). Measured here, even both planes on the killed broker were back within
# a second (nats-py tries the next broker at once); the wait before trying a
# broker again is cut from 2 s to 0.5 s all the same.
HOME_BROKER_FIRST: dict[str, Any] = {
    "dont_randomize": True,
    "max_reconnect_attempts": -1,
    "reconnect_time_wait": 0.5,
}


class ControlPlaneFailed(Exception):
    """A part the control plane cannot run without has stopped."""


def split_listen(listen: str) -> tuple[str, int]:
    """ "HOST:PORT" -> (host, port). Raises ValueError with a readable message."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid --listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:4222")
    return host.strip("[]") or "0.0.0.0", int(port)


def broker_config(data_dir: Path) -> str:
    """The nats-server configuration for an external broker this control plane
    guards (with TLS: clients beyond loopback are the usual case there)."""
    keys = BrokerKeys.derive(load_or_create(data_dir / "signing.key"))
    return server_config(NATS_CONF.read_text(), keys, ensure_broker_tls(data_dir).config())


def write_broker_config(data_dir: Path, keys: BrokerKeys, tls: BrokerTls | None = None) -> Path:
    """Written on every start (0600: it names the control plane's users)."""
    path = data_dir / "nats-server.conf"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(server_config(NATS_CONF.read_text(), keys, tls.config() if tls else ""))
    tmp.replace(path)
    return path


def beyond_loopback(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def as_tls_url(url: str) -> str:
    """Agents are told tls://: the broker speaks nothing else (each URL of
    several, comma-separated)."""
    out = []
    for one in server_urls(url):
        scheme, sep, rest = one.partition("://")
        out.append(f"tls://{rest}" if sep and scheme.lower() == "nats" else one)
    return ",".join(out)


def read_api(control_plane: ControlPlane) -> ReadApi:
    """The read API over a started control plane's queries, write model and stream."""
    return ReadApi(
        control_plane.queries,
        lambda: control_plane.write_model,
        control_plane.store,
        control_plane.commands.record,
        control_plane.consumers.connected_hosts,
    )


async def run_server(
    data_dir: Path,
    listen: str,
    nats_url: str | None,
    advertise: str | None,
    ready: asyncio.Event | None = None,
    *,
    snapshots_only: bool = False,
    metrics_listen: str | None = None,
    http_listen: str | None = None,
    replicas: int = 1,
) -> None:
    """Run until SIGINT/SIGTERM (or cancellation); stop everything cleanly.
    With `metrics_listen` (HOST:PORT), serve Prometheus metrics there; with
    `http_listen`, the read API and the dashboard. `nats_url` may name several
    brokers (a JetStream cluster, comma-separated): the connections fail over
    between them, and the streams get `replicas` copies."""
    embedded: EmbeddedNats | None = None
    metrics: ControlPlaneMetrics = NO_METRICS
    metrics_server: MetricsServer | None = None
    http_server: HttpServer | None = None
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = BrokerKeys.derive(load_or_create(data_dir / "signing.key"))
    login = natsid.client_options(keys.controlplane)
    secure: dict[str, Any] = {}  # TLS options, when the broker speaks TLS
    broker_ca: bytes | None = None
    if nats_url is None:
        host, port = split_listen(listen)
        # Reachable beyond this machine: TLS, with a CA of our own.
        tls = ensure_broker_tls(data_dir) if beyond_loopback(host) else None
        if tls is not None:
            broker_ca = tls.ca_der()
            secure = tls_options("tls://", broker_ca)
            if advertise is not None:
                advertise = as_tls_url(advertise)
        embedded = EmbeddedNats(
            data_dir / "jetstream",
            host=host,
            port=port,
            log_file=data_dir / "nats-server.log",
            config=write_broker_config(data_dir, keys, tls),
            client_options=login | secure,
            tls=tls is not None,
        )
        await embedded.start()
        nats_url = embedded.url
        log.info("embedded nats-server started", url=nats_url, pid=embedded.pid)
    else:
        if uses_tls(nats_url):
            # The CA that --print-nats-config made and configured the broker
            # with; made afresh here it could not match the broker's certificate.
            ca_file = data_dir / "tls" / "ca.pem"
            if not ca_file.exists():
                raise NatsServerError(
                    f"{nats_url} speaks TLS but {ca_file} does not exist: configure the "
                    "broker with `netmesh server --print-nats-config` (which makes it)"
                )
            broker_ca = ssl.PEM_cert_to_DER_cert(ca_file.read_text())
            secure = tls_options(nats_url, broker_ca)
        # nats-py would retry a dead URL forever, deaf to signals: ask once first.
        try:
            probe = await connect_once(nats_url, timeout=5, **login, **secure)
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            if refused_by_broker(exc):
                raise NatsServerError(
                    f"the NATS server at {nats_url} refused the control plane's key: configure "
                    "it with `netmesh server --print-nats-config` (see README, Security)"
                ) from None
            raise NatsServerError(f"cannot connect to {nats_url}: nothing answers there") from None
        await probe.close()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = None
    system_nc = None
    control_plane = None
    try:
        if metrics_listen is not None:
            prometheus = PrometheusMetrics()
            metrics = prometheus
            metrics_server = serve_metrics(prometheus.registry, metrics_listen)
            log.info("metrics served", url=metrics_server.url)
        nc = await connect(
            nats_url, name="netmesh-controlplane", **HOME_BROKER_FIRST, **login, **secure
        )
        if broker_guarded(nc):
            system_nc = await connect(
                nats_url,
                name="netmesh-controlplane-system",
                **HOME_BROKER_FIRST,
                **natsid.client_options(keys.system),
                **secure,
            )
        else:
            log.warning(
                "the NATS server admits anonymous connections: anyone who reaches it can "
                "read and publish everything (see README, Security)"
            )
        control_plane = ControlPlane(
            nc,
            data_dir,
            advertise or nats_url,
            snapshots_only=snapshots_only,
            system_nc=system_nc,
            broker_ca=broker_ca,
            metrics=metrics,
            replicas=replicas,
        )
        await control_plane.start()
        if http_listen is not None:
            try:
                http_server = await serve_http(
                    read_api(control_plane), *split_metrics_listen(http_listen, "--http")
                )
            except OSError as exc:
                raise OSError(exc.errno, f"--http {http_listen}: {exc.strerror or exc}") from None
            log.info("read API and dashboard served", url=http_server.url)
        if ready is not None:
            ready.set()
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(control_plane.failed.wait())
        await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        if control_plane.failed.is_set():
            # Exit non-zero so that a supervisor (systemd) restarts us.
            raise ControlPlaneFailed(control_plane.failure or "failed")
        log.info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if http_server is not None:
            await http_server.close()
        if control_plane is not None:
            await control_plane.stop()
        for conn in (nc, system_nc):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.drain()
        if metrics_server is not None:
            metrics_server.close()
        if embedded is not None:
            await embedded.stop()
            log.info("embedded nats-server stopped")
