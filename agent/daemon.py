"""`netmesh agent up`: enroll once, then keep the machine as the control plane says.

The daemon wires its parts: the session with the broker (agent/session.py),
the desired-state receiver (agent/receiver.py), the reconcilers, one per part
of the machine (agent/reconcile.py), the host key (agent/keys.py), and the
reports.

Level-triggered: a desired-state message, a periodic resync (with jitter) or a
failed apply's retry wakes the loop; each pass reads the machine, plans, applies
what differs, and reports the applied revision. The last desired state is kept
on disk, so with NATS or the control plane down the agent keeps enforcing what it
last knew. SIGTERM stops the agent and leaves the interface up, and its firewall
(nftables table `inet netmesh`) with it; `netmesh agent down` removes both.
Its DNS server stops with it; the host's resolver stays pointed at the
overlay address (which refuses queries meanwhile, so resolvers move on at
once) until `agent down` gives it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import structlog
from nacl.signing import SigningKey
from nats.aio.client import Client
from nats.aio.msg import Msg

from agent.backend import BackendError, DeviceState, WireGuardBackend
from agent.dns import AgentDns, DnsControl
from agent.egress import PROBE_INTERVAL, PROBE_PORT, Liveness, candidates
from agent.endpoints import detect_endpoints
from agent.exit import ExitControl, ExitRouting, exempt_addresses
from agent.firewall import FirewallControl, NftFirewall
from agent.forwarding import ForwardingControl, SysctlForwarding
from agent.kernel import KernelBackend, kernel_wireguard_available
from agent.keys import HostKey
from agent.link import Link, LinkControl
from agent.metrics import NO_METRICS, AgentMetrics, PrometheusAgentMetrics
from agent.nat import PathKeeper
from agent.plan import Op
from agent.receiver import DesiredReceiver
from agent.reconcile import reconcile
from agent.relay import Forwarder, RelayControl
from agent.resolver import host_resolver
from agent.session import (
    CONNECT_BACKOFF_MIN,
    AgentError,
    Session,
    broker_login,
)
from agent.statedir import (
    AgentStatus,
    Identity,
    StateDir,
    StateDirError,
    private_key_b64,
    public_key_of,
)
from agent.userspace import UserspaceBackend
from agent.watch import watch_interface
from events.commands import ErrorCode, Reply
from events.connect import (
    BrokerTlsMissing,
    connect_once,
    refused_by_broker,
    tls_options,
)
from events.desired import DesiredMessage, DesiredState, UnknownSection, decode_message
from events.feed import DesiredFeed, Outcome
from events.metrics import MetricsServer, serve_metrics
from events.natsid import client_options
from events.reports import APPLIED, AppliedReport, PeerReport, applied_encoder
from events.signing import (
    ENROLLMENT_TOKEN_HEADER,
    SIGNATURE_HEADER,
    public_text,
    signed_payload,
    token_digest,
)
from events.subjects import (
    command_subject,
    report_subject,
)
from events.tokens import InvalidToken, parse_token

# AgentError is the CLI's to catch from here too.
__all__ = ["Agent", "AgentError", "enroll", "make_backend", "run_agent"]

log = structlog.get_logger("netmesh.agent")

RESYNC_INTERVAL = 30.0
SETTLE_DELAY = 3.0
# How often a relay host's status file is rewritten with its relays' counters.
RELAY_STATUS_INTERVAL = 2.0
RETRY_MIN, RETRY_MAX = 1.0, 60.0
JOIN_RETRY_MAX = 60.0  # an enrolled host's join with a token from its config
JOIN_TURNED_AWAY_TRIES = 5
# Refusals a retry may get past (the control plane was busy or starting).
RETRY_LATER = frozenset({ErrorCode.BUSY, ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED})


def _overlay_address(allowed_ips: tuple[str, ...]) -> str | None:
    """A peer's own IPv4 overlay address (its /32 among its allowed IPs)."""
    for cidr in allowed_ips:
        if cidr.endswith("/32"):
            return cidr.removesuffix("/32")
    return None


async def make_backend(kind: str, interface: str) -> WireGuardBackend:
    """`auto`: the kernel's WireGuard where the module is there, else wireguard-go."""
    if kind == "auto":
        kind = "kernel" if await kernel_wireguard_available() else "userspace"
    if kind == "kernel":
        return KernelBackend(interface)
    return UserspaceBackend(interface)


class Unreachable(AgentError):
    """No control plane answered (down, or the network is not up yet), or it
    was too busy: trying again later may work."""


class TurnedAway(AgentError):
    """The broker refused the enrolling connection: a token that does not
    authenticate, too many failures, or no control plane answering its login
    callout yet."""


async def enroll(
    token: str,
    server: str | None,
    name: str,
    public_key: str,
    endpoints: Sequence[str],
    listen_port: int | None,
    signing_key: SigningKey,
) -> tuple[str, dict[str, Any]]:
    """Join with the token. Returns (server URL, join result). Raises
    Unreachable (retryable) or AgentError (a refusal: retrying will not help)."""
    try:
        parts = parse_token(token)
    except InvalidToken as exc:
        raise AgentError(str(exc)) from None
    url = server or parts.server
    try:
        nc = await connect_once(
            url,
            timeout=5,
            name=f"netmesh-agent-enroll-{name}",
            **client_options(signing_key, token),
            **tls_options(url, parts.ca_der()),
        )
    except BrokerTlsMissing as exc:
        raise AgentError(f"{exc}: use a token made by this control plane") from None
    except nats.errors.NoServersError:
        raise Unreachable(f"cannot reach the control plane at {url}: nothing answers") from None
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        if refused_by_broker(exc):
            raise TurnedAway(
                f"join refused: the broker at {url} turned this agent away: enrollment token "
                "not recognised (damaged or tampered), or too many failed attempts"
            ) from None
        raise Unreachable(f"cannot reach the control plane at {url}: {exc}") from None
    try:
        # Signed with the host's own key, which the join registers: from now
        # on only this machine can speak for this host.
        payload, signature = signed_payload(
            signing_key,
            "join",
            {
                "command_id": uuid.uuid4().hex,
                # The token goes beside the signed join, its digest in it:
                # the signed text is kept in the log as the join's proof.
                "token_sha256": token_digest(token),
                "public_key": public_key,
                "name": name,
                "endpoints": list(endpoints),
                "listen_port": listen_port,
                "signing_key": public_text(signing_key),
            },
        )
        try:
            msg = await nc.request(
                command_subject("join"),
                payload,
                timeout=15,
                headers={
                    "Netmesh-Actor": f"agent:{name}",
                    ENROLLMENT_TOKEN_HEADER: token,
                    **signature,
                },
            )
        except nats.errors.NoRespondersError:
            raise Unreachable(f"no netmesh control plane is answering at {url}") from None
        except nats.errors.TimeoutError:
            raise Unreachable(f"the control plane at {url} did not answer in time") from None
        try:
            reply = msgspec.json.decode(msg.data, type=Reply)
        except msgspec.DecodeError:
            raise AgentError(f"the server at {url} sent an answer this agent cannot read") from None
        if not reply.ok and reply.code in RETRY_LATER:
            raise Unreachable(f"join refused for now: {reply.error}")
        if not reply.ok or not isinstance(reply.result, dict):
            raise AgentError(f"join refused: {reply.error or 'no result'}")
        return url, dict(reply.result)
    finally:
        await nc.close()


async def join(
    state: StateDir,
    identity: Identity | None,
    token: str,
    server: str | None,
    name: str,
    endpoints: Sequence[str],
    listen_port: int | None,
) -> Identity:
    """Join a network with `token`; a new host gets its identity, an enrolled
    one (`identity`, updated in place: the running agent shares it) one more
    network. Saved either way. Raises AgentError (Unreachable, TurnedAway)."""
    public_key = public_key_of(state.private_key())
    url, result = await enroll(
        token,
        server or (identity.server if identity else None),
        name,
        public_key,
        endpoints,
        listen_port,
        state.signing_key(),
    )
    parts = parse_token(token)  # enroll() has parsed it already
    if identity is None:
        identity = Identity(
            host_id=result["host_id"],
            name=name,
            server=url,
            endpoints=list(endpoints),
            # Pinned from the token.
            server_key=parts.server_key,
            server_ca=parts.ca,
        )
    identity.networks = sorted({*identity.networks, result["network"]})
    identity.joined_keys = sorted({*identity.joined_keys, parts.key_id})
    state.save_identity(identity)
    log.info(
        "joined",
        network=result["network"],
        address=result["interface_address"],
        host_id=result["host_id"],
        node_id=result["node_id"],
    )
    return identity


async def join_later(
    state: StateDir,
    identity: Identity,
    token: str | None,
    server: str | None,
    listen_port: int | None,
    key: HostKey,
    wake: Callable[[], None],
) -> None:
    """An enrolled host given a token (its config file has one on every start):
    join in the background, never holding up the start. A token it already
    used is not used again; one that does not work is said once, at info
    level: the host runs with the networks it has."""
    if token is None:
        return
    try:
        parts = parse_token(token)
    except InvalidToken as exc:
        log.info("enrollment token not used", why=str(exc))
        return
    if parts.key_id in identity.joined_keys:
        log.debug("enrollment token already used by this host", key_id=parts.key_id)
        return
    if parts.server_key and identity.server_key and parts.server_key != identity.server_key:
        log.info(
            "enrollment token not used: it is from another control plane than the one this "
            "host is enrolled with (enroll from a fresh state dir to move)",
            key_id=parts.key_id,
        )
        return
    delay, turned_away = CONNECT_BACKOFF_MIN, 0
    while True:
        try:
            # Not while the WireGuard key is being rotated: the join names it.
            async with key.lock:
                await join(
                    state, identity, token, server, identity.name, identity.endpoints, listen_port
                )
        except (Unreachable, TurnedAway) as exc:
            # The broker turns us away while no control plane answers its login
            # callout, and for a token that does not authenticate: try a few times.
            turned_away += isinstance(exc, TurnedAway)
            if turned_away > JOIN_TURNED_AWAY_TRIES:
                log.info("enrollment token not used", key_id=parts.key_id, why=str(exc))
                return
            if delay == CONNECT_BACKOFF_MIN:
                log.info("joining with the token when the control plane answers", why=str(exc))
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, JOIN_RETRY_MAX)
            continue
        except AgentError as exc:
            log.info("enrollment token not used", key_id=parts.key_id, why=str(exc))
            return
        wake()
        return


@dataclass
class ApplyProgress:
    """How far the machine is from the desired state, as the last pass left it."""

    applied: DesiredState | None = None  # the last desired state applied in full
    # Per reconciler, the desired state it last applied in full.
    applied_by: dict[str, DesiredState] = field(default_factory=dict)
    reconciler_errors: dict[str, str] = field(default_factory=dict)  # reconciler -> why it failed
    last_error: str | None = None
    retry_delay: float = RETRY_MIN
    retry: asyncio.TimerHandle | None = None


class Agent:
    """The daemon: wires the desired-state receiver, the session with the
    broker, the reconcilers and the reports. Each pass reads the machine,
    plans and applies per reconciler, and reports the applied revision."""

    def __init__(
        self,
        *,
        identity: Identity,
        state: StateDir,
        backend: WireGuardBackend,
        link: LinkControl,
        firewall: FirewallControl,
        dns: DnsControl,
        private_key: str,
        public_key: str,
        forwarding: ForwardingControl | None = None,
        exit_routing: ExitControl | None = None,
        relays: RelayControl | None = None,
        resync_interval: float = RESYNC_INTERVAL,
        rotate_every: float | None = None,
        metrics: AgentMetrics = NO_METRICS,
    ) -> None:
        self.identity = identity
        self.metrics = metrics
        self.state = state
        self.backend = backend
        self.link = link
        self.firewall = firewall
        self.forwarding = forwarding
        self.exit_routing = exit_routing
        # The brokers' addresses, kept off the tunnel when the host exits through a gateway.
        self.exempt: tuple[str, ...] = ()
        self.liveness = Liveness()
        self.dead_gateways: frozenset[str] = frozenset()
        self.dns = dns
        self.relays = relays
        if relays is not None:
            metrics.relaying(relays.status)
        self.key = HostKey(state, private_key, public_key, rotate_every)
        self.resync_interval = resync_interval
        self.detect_endpoints = False  # True when endpoints were found, not given
        self.session = Session(
            identity,
            state,
            on_message=self._on_desired,
            on_subscribed=self._on_subscribed,
            on_change=self.write_status,
        )
        self.receiver = DesiredReceiver(
            identity.host_id,
            state,
            identity.server_key,
            on_state=self.wake,
            on_rejection=self._on_rejection,
            reread=lambda: self.session.spawn(self.session.resubscribe()),
            ask_for_snapshot=lambda: self.session.spawn(self.session.request_snapshot()),
        )
        self.progress = ApplyProgress()
        self._wake = asyncio.Event()
        # NAT traversal (agent/nat.py): endpoints tried per peer, sightings told.
        self.paths = PathKeeper()

    # What the rest of the agent (and its tests) read of its parts.

    @property
    def desired(self) -> DesiredState | None:
        return self.receiver.feed.state

    @property
    def applied(self) -> DesiredState | None:
        return self.progress.applied

    @property
    def feed(self) -> DesiredFeed:
        return self.receiver.feed

    @property
    def rejected(self) -> int:
        return self.receiver.rejected

    @property
    def last_rejection(self) -> str | None:
        return self.receiver.last_rejection

    @property
    def public_key(self) -> str:
        return self.key.public_key

    @property
    def nc(self) -> Client | None:
        return self.session.nc

    def wake(self) -> None:
        """Run a reconcile pass soon (a change was seen)."""
        self._wake.set()

    def reload_key(self) -> None:
        """SIGHUP (from `netmesh agent rotate-key`): take the key now in the state
        dir; the next pass sets it on the device, peers already expect it."""
        if self.key.reload():
            self._wake.set()

    def offer(self, message: DesiredMessage, *, pending: int = 0) -> Outcome:
        """See `DesiredReceiver.offer`."""
        return self.receiver.offer(message, pending=pending)

    def authentic(self, data: bytes, signature: str | None) -> bool:
        return self.receiver.authentic(data, signature)

    def rotation_due(self, now: float) -> str | None:
        return self.key.rotation_due(self.desired, self.identity, now)

    # -- the session's callbacks ------------------------------------------------

    async def _on_desired(self, msg: Msg) -> None:
        if not self.authentic(msg.data, (msg.headers or {}).get(SIGNATURE_HEADER)):
            return
        try:
            message = decode_message(msg.data)
        except UnknownSection as exc:
            log.error("desired state this agent cannot enforce ignored", error=str(exc))
            return
        except msgspec.DecodeError as exc:
            log.warning("undecodable desired state ignored", error=str(exc))
            return
        try:
            pending = msg.metadata.num_pending
        except Exception:  # not a JetStream message: treat it as the last one
            pending = 0
        self.offer(message, pending=pending)

    async def _on_subscribed(self) -> None:
        await self.report_endpoints()
        self._wake.set()

    def _on_rejection(self) -> None:
        self.write_status()
        self.session.spawn(self.report())

    async def connect_forever(self) -> None:
        await self.session.connect_forever()

    async def subscribe(self) -> None:
        await self.session.subscribe()

    # -- reconcile -----------------------------------------------------------

    async def reconcile_once(self) -> bool:
        """One pass. Returns True when the machine matches the desired state."""
        desired = self.desired
        if desired is None:
            return True
        desired = await self.choose_paths(desired)
        progress = self.progress
        drift = progress.applied is not None and progress.applied.revision == desired.revision

        def log_op(section: str, op: Op) -> None:
            log.info(
                "drift repair" if drift else "apply",
                section=section,
                op=str(op),
                revision=desired.revision,
            )

        started = time.monotonic()
        try:
            result = await reconcile(
                desired,
                self.backend,
                self.link,
                firewall=self.firewall,
                forwarding=self.forwarding,
                dead_gateways=self.dead_gateways,
                exit_routing=self.exit_routing,
                exempt=self.exempt,
                dns=self.dns,
                relays=self.relays,
                public_key=self.key.public_key,
                private_key=self.key.private_key,
                previous=progress.applied_by,
                on_op=log_op,
            )
        except BackendError as exc:
            self.metrics.passed(None, time.monotonic() - started)
            return self._failed(desired, f"read: {exc}")
        self.metrics.passed(result, time.monotonic() - started)
        self.metrics.observed(result.actual.device, desired)
        for outcome in result.outcomes:
            if outcome.ok:
                progress.applied_by[outcome.name] = desired
        progress.reconciler_errors = result.errors()
        if not result.ok:
            return self._failed(
                desired,
                "; ".join(f"{name}: {why}" for name, why in progress.reconciler_errors.items()),
            )
        newly = progress.applied is None or progress.applied.revision != desired.revision
        progress.applied = desired
        self.metrics.applied(desired.revision)
        progress.last_error = None
        progress.retry_delay = RETRY_MIN
        if newly or result.ops:
            log.info("in sync", revision=desired.revision, ops=result.ops)
        if result.ops:
            # Look again soon: new peers handshake within seconds, and the
            # control plane should hear about it before the next resync.
            asyncio.get_running_loop().call_later(SETTLE_DELAY, self._wake.set)
        self.write_status()
        # An empty plan means the device we just read is still current.
        await self.report(None if result.ops else result.actual.device)
        await self.report_sightings(result.actual.device)
        return True

    def _failed(self, desired: DesiredState, why: str) -> bool:
        progress = self.progress
        progress.last_error = why
        self.write_status()
        # Said at once, not only once it works again: `status` and `--wait`
        # then tell a host that fails from one that is slow or gone.
        self.session.spawn(self.report())
        log.warning(
            "apply failed, will retry",
            revision=desired.revision,
            error=why,
            retry_in=round(progress.retry_delay, 1),
        )
        loop = asyncio.get_running_loop()
        progress.retry = loop.call_later(progress.retry_delay, self._wake.set)
        progress.retry_delay = min(progress.retry_delay * 2, RETRY_MAX)
        return False

    async def watch_gateways(self, interval: float = PROBE_INTERVAL) -> None:
        """Every `interval`: read what each peer answers, probe the gateways
        of every range that has a second one and the peers whose bytes go
        unanswered, run a pass when a gateway is taken for gone or comes back
        (agent/egress.py) or a peer's path moves on (agent/nat.py), and ask
        for relays where every direct path failed."""
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe.setblocking(False)
        try:
            while True:
                await asyncio.sleep(interval)
                await self._watch_peers(probe)
        finally:
            probe.close()

    async def _watch_peers(self, probe: socket.socket) -> None:
        desired = self.desired
        if desired is None or not desired.sections.peers:
            return
        watched = candidates(desired.sections.egress)
        self.liveness.forget_others(watched)
        try:
            device = await self.backend.read()
        except BackendError:
            return  # the pass says why
        now_monotonic, now = time.monotonic(), time.time()
        self.paths.observe(device, now)
        probed = self.paths.to_probe(now) | watched
        for peer in device.peers:
            if peer.public_key in watched:
                self.liveness.observe(peer.public_key, peer.rx_bytes, now_monotonic)
            entry = desired.sections.peers.get(peer.public_key)
            if peer.public_key in probed and entry is not None:
                address = _overlay_address(entry.allowed_ips)
                if address is not None:
                    with contextlib.suppress(OSError):  # unreachable now: that is the point
                        probe.sendto(b"netmesh probe", (address, PROBE_PORT))
        dead = self.liveness.dead(now_monotonic) if watched else frozenset()
        if dead != self.dead_gateways:
            log.warning(
                "gateways taken for gone" if dead else "every gateway answers",
                gone=sorted(dead),
                back=sorted(self.dead_gateways - dead),
            )
            self.dead_gateways = dead
            self._wake.set()
        if self.paths.moved(desired, device, now):
            self._wake.set()
        for key in self.paths.to_ask(desired, now):
            self.session.spawn(self.ask_for_relay(key))

    async def ask_for_relay(self, key: str) -> None:
        """Every direct path to peer `key` failed: ask for a relay (again
        later if none is granted)."""
        now = time.time()
        self.paths.asked_for(key, now, granted=False)  # not twice at once
        if not self.session.connected:
            return
        try:
            reply = await self.session.command("relay.request", {"peer_key": key})
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("relay request not delivered", peer=key, error=repr(exc))
            return
        if reply.ok:
            self.paths.asked_for(key, now, granted=True)
            log.info("relay granted", peer=key, result=reply.result)
        else:
            log.info("no relay for a peer", peer=key, error=reply.error)

    async def reconcile_forever(self) -> None:
        while True:
            jitter = random.uniform(0.8, 1.2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.resync_interval * jitter)
            self._wake.clear()
            try:
                await self.reconcile_once()
                await self.check_key_rotation()
                if self.detect_endpoints:
                    await self.check_endpoints()
            except Exception as exc:  # the loop is the agent: it must outlive any pass
                log.exception("reconcile pass failed", error=repr(exc))
                self.progress.last_error = f"pass failed: {exc!r}"
                await asyncio.sleep(min(self.resync_interval, RETRY_MAX))

    async def show_relays(self, interval: float = RELAY_STATUS_INTERVAL) -> None:
        """Keep the relays' counters in the status file current (`agent
        status`), while there are any: a host that relays nothing writes nothing."""
        while True:
            await asyncio.sleep(interval)
            if self.relays is not None and self.relays.status():
                self.write_status()

    async def check_key_rotation(self) -> None:
        if await self.key.rotate_if_due(self.desired, self.identity, self.session):
            self._wake.set()

    # -- what the agent tells: status file, reports, endpoints -----------------

    def write_status(self) -> None:
        """Best effort: a full disk must not stop the agent."""
        status = AgentStatus(
            pid=os.getpid(),
            interface=self.backend.interface,
            backend=type(self.backend).__name__,
            connected=self.session.connected,
            broker=self.session.broker,
            subscribed=self.session.connected and self.session.subscribed,
            desired_revision=self.desired.revision if self.desired else 0,
            applied_revision=self.applied.revision if self.applied else 0,
            last_error=self.progress.last_error,
            rejected=self.rejected,
            last_rejection=self.last_rejection,
            updated_at=time.time(),
            relays=self.relays.status() if self.relays is not None else [],
        )
        try:
            self.state.save_status(status)
        except OSError as exc:
            log.warning("status file not written", error=str(exc))

    async def report(self, device: DeviceState | None = None) -> None:
        """Best effort: without NATS the report waits for the next pass.
        `device` is a fresh read of the interface, if the caller has one."""
        if not self.session.connected:
            return
        peers: tuple[PeerReport, ...] = ()
        with contextlib.suppress(BackendError):
            if device is None:
                device = await self.backend.read()
                self.metrics.observed(device, self.desired)
            peers = tuple(
                PeerReport(
                    public_key=p.public_key,
                    endpoint=p.endpoint,
                    last_handshake=p.last_handshake,
                    rx_bytes=p.rx_bytes,
                    tx_bytes=p.tx_bytes,
                )
                for p in device.peers
            )
        report = AppliedReport(
            host_id=self.identity.host_id,
            revision=self.applied.revision if self.applied else 0,
            at=time.time(),
            interface=self.backend.interface,
            error=self.progress.last_error,
            reconciler_errors=self.progress.reconciler_errors,
            peers=peers,
            rejected=self.rejected,
            last_rejection=self.last_rejection,
        )
        await self.session.publish_report(
            report_subject(self.identity.host_id, APPLIED), applied_encoder.encode(report)
        )

    async def check_endpoints(self) -> None:
        """Endpoints found on this machine (not given with --endpoint) can move:
        a new DHCP lease, a moved VM. Peers learn it through the control plane."""
        try:
            found = await detect_endpoints(exclude=self.backend.interface)
        except Exception as exc:  # netlink trouble must not stop the loop
            log.warning("endpoint detection failed", error=repr(exc))
            return
        if found == self.identity.endpoints or not found:
            return
        log.info("local endpoints changed", before=self.identity.endpoints, now=found)
        self.identity.endpoints = found
        self.state.save_identity(self.identity)
        if self.session.connected:
            await self.report_endpoints()

    async def report_endpoints(self) -> None:
        """Tell the control plane where this host can be reached, when that changed."""
        # Without a desired state we do not know our port: let the control plane
        # keep the one it chose (the network's) rather than claim a default.
        listen_port = self.desired.interface.listen_port if self.desired else None
        try:
            reply = await self.session.command(
                "endpoint.report",
                {"endpoints": list(self.identity.endpoints), "listen_port": listen_port},
            )
            if not reply.ok:
                log.warning("endpoint report refused", error=reply.error)
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("endpoint report not delivered", error=repr(exc))

    # -- NAT traversal (agent/nat.py) -------------------------------------------

    async def choose_paths(self, desired: DesiredState) -> DesiredState:
        """`desired` with the endpoint to try now for each peer that has a
        `paths` entry (the watcher wakes a pass when one moves on)."""
        if not desired.sections.paths:
            return desired
        device = None
        with contextlib.suppress(BackendError):
            device = await self.backend.read()
        return self.paths.apply(desired, device, time.time())

    async def report_sightings(self, device: DeviceState | None) -> None:
        """Tell the control plane where peers were seen from (their NAT mappings)."""
        desired = self.desired
        if device is None or desired is None or not self.session.connected:
            return
        for key, endpoint in self.paths.new_sightings(desired, device, time.time()).items():
            try:
                reply = await self.session.command(
                    "endpoint.seen", {"peer_key": key, "endpoint": endpoint}
                )
            except (nats.errors.Error, TimeoutError) as exc:
                log.info("sighting not delivered", error=repr(exc))
                return
            if reply.ok:
                self.paths.reported[key] = endpoint
                log.info("peer seen", peer=key, endpoint=endpoint, result=reply.result)
            else:
                log.warning("sighting refused", peer=key, endpoint=endpoint, error=reply.error)
                self.paths.reported[key] = endpoint  # said once, not every pass

    async def close(self) -> None:
        if self.progress.retry is not None:
            self.progress.retry.cancel()
        await self.session.close()
        await self.dns.close()
        if self.relays is not None:
            await self.relays.close()
        await self.backend.close()
        await self.link.close()


async def run_agent(
    *,
    token: str | None,
    server: str | None,
    name: str | None,
    state_dir: Path,
    endpoints: Sequence[str],
    backend: str,
    interface: str,
    listen_port: int | None = None,
    resync_interval: float = RESYNC_INTERVAL,
    rotate_every: float | None = None,
    metrics_listen: str | None = None,
) -> None:
    """Enroll if needed and run until SIGINT/SIGTERM; with `metrics_listen`
    (HOST:PORT), serve Prometheus metrics there. Raises AgentError."""
    state = StateDir(state_dir)
    try:
        state.ensure()
        key = state.private_key()
        identity = state.load_identity()
    except StateDirError as exc:
        raise AgentError(str(exc)) from None
    public_key = public_key_of(key)
    host_name = name or (identity.name if identity else socket.gethostname().split(".")[0])
    offered = list(endpoints) or await detect_endpoints(exclude=interface)
    if identity is None:
        # Only a host that has never enrolled needs the control plane to start.
        if token is None:
            raise AgentError(f"not enrolled yet ({state_dir} has no identity): pass --token")
        identity = await join(state, None, token, server, host_name, offered, listen_port)
        token = None
    elif server is not None or endpoints:
        identity.server = server or identity.server
        identity.endpoints = offered
        state.save_identity(identity)
    broker_login(state, identity, identity.server)  # a tls:// server without a CA: say so now
    prometheus = PrometheusAgentMetrics() if metrics_listen is not None else None

    agent = Agent(
        identity=identity,
        state=state,
        backend=await make_backend(backend, interface),
        link=Link(interface),
        firewall=NftFirewall(),
        forwarding=SysctlForwarding(state_dir),
        exit_routing=ExitRouting(interface),
        dns=AgentDns(host_resolver(interface)),
        relays=Forwarder(),
        private_key=private_key_b64(key),
        public_key=public_key,
        resync_interval=resync_interval,
        rotate_every=rotate_every,
        metrics=prometheus or NO_METRICS,
    )
    metrics_server: MetricsServer | None = None
    if metrics_listen is not None and prometheus is not None:
        try:
            metrics_server = serve_metrics(prometheus.registry, metrics_listen)
        except (OSError, ValueError) as exc:
            await agent.close()
            raise AgentError(f"cannot serve metrics on {metrics_listen}: {exc}") from None
        log.info("metrics served", url=metrics_server.url)
    agent.detect_endpoints = not endpoints
    agent.exempt = await exempt_addresses((identity.server,))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, agent.reload_key)
    tasks = [
        asyncio.create_task(agent.reconcile_forever(), name="reconcile"),
        asyncio.create_task(
            join_later(state, identity, token, server, listen_port, agent.key, agent.wake),
            name="join",
        ),
        asyncio.create_task(agent.connect_forever(), name="connect"),
        asyncio.create_task(watch_interface(interface, agent.wake), name="watch"),
        asyncio.create_task(agent.watch_gateways(), name="gateways"),
        asyncio.create_task(agent.show_relays(), name="relays"),
    ]
    log.info(
        "agent running",
        host_id=identity.host_id,
        interface=interface,
        cached_revision=agent.desired.revision if agent.desired else None,
    )
    agent.wake()
    try:
        await stop.wait()
        log.info("stopping; the interface stays up")
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await agent.close()
        state.clear_status()
        if metrics_server is not None:
            metrics_server.close()
