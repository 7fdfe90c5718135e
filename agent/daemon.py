"""`netmesh agent up`: enroll once, then keep the interface as the control plane says.

Level-triggered: a desired-state message, a periodic resync (with jitter) or a
failed apply's retry wakes the loop; each pass reads the machine, plans, applies
what differs, and reports the applied revision. The last desired state is kept
on disk, so with NATS or the control plane down the agent keeps enforcing what it
last knew. SIGTERM stops the agent and leaves the interface up.
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
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import structlog
from nacl.signing import SigningKey
from nats.aio.client import Client
from nats.aio.msg import Msg

from agent.apply import read_actual
from agent.backend import BackendError, DeviceState, WireGuardBackend
from agent.endpoints import detect_endpoints
from agent.kernel import KernelBackend, kernel_wireguard_available
from agent.link import Link, LinkControl
from agent.plan import Actual, Op
from agent.receiver import DesiredReceiver
from agent.reconcile import reconcile
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
from events.commands import Reply
from events.connect import (
    BrokerTlsMissing,
    close_quickly,
    connect_once,
    refused_by_broker,
    tls_options,
)
from events.desired import DesiredMessage, DesiredState, decode_message
from events.feed import DesiredFeed, Outcome
from events.natsid import client_options
from events.reports import APPLIED, AppliedReport, PeerReport, applied_encoder
from events.signing import (
    SIGNATURE_HEADER,
    public_text,
    signed_payload,
)
from events.subjects import (
    REPORTS_STREAM,
    command_subject,
    consume_subject,
    report_subject,
    resync_subject,
)
from events.tokens import InvalidToken, parse_token

log = structlog.get_logger("netmesh.agent")

RESYNC_INTERVAL = 30.0
SETTLE_DELAY = 3.0
RETRY_MIN, RETRY_MAX = 1.0, 60.0
CONNECT_BACKOFF_MIN, CONNECT_BACKOFF_MAX = 0.5, 10.0
SCHEDULED_ROTATION_RETRY = 3600.0  # after a refused scheduled rotation
# Removed from its networks (or no control plane to ask): the interface stays
# as it was last told, and the agent keeps asking.
REFUSED = "the broker refuses this host; keeping the last desired state"


def reconnect_backoff(servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
    """nats-py reconnect policy: capped exponential backoff with jitter, so that
    a thousand agents do not hit a restarted server in the same second."""
    server = min(servers, key=lambda s: s.reconnects)
    delay = min(CONNECT_BACKOFF_MAX, CONNECT_BACKOFF_MIN * 2 ** min(server.reconnects, 16))
    return server, delay * random.uniform(0.5, 1.0)


class AgentError(Exception):
    """Stops the agent with a one-line message (bad token, refused join, ...)."""


async def send_host_command(
    nc: Client,
    state: StateDir,
    identity: Identity,
    verb: str,
    fields: dict[str, Any],
    timeout: float = 10.0,
) -> Reply:
    """A command from this host, signed with its key (with a fresh id and the
    time). Raises nats.errors.Error / TimeoutError when it is not answered."""
    payload, signature = signed_payload(
        state.signing_key(),
        verb,
        {"command_id": uuid.uuid4().hex, "host_id": identity.host_id, **fields},
    )
    msg = await nc.request(
        command_subject(verb),
        payload,
        timeout=timeout,
        headers={"Netmesh-Actor": f"agent:{identity.name}", **signature},
    )
    try:
        return msgspec.json.decode(msg.data, type=Reply)
    except msgspec.DecodeError:
        return Reply(ok=False, error="the control plane sent an answer this agent cannot read")


def broker_login(state: StateDir, identity: Identity, url: str) -> dict[str, Any]:
    """nats-py options to connect as this host: its key, and TLS against the
    CA pinned at enrollment when the URL is tls://. Raises AgentError."""
    try:
        return {
            **client_options(state.signing_key()),
            **tls_options(url, identity.ca_der()),
        }
    except BrokerTlsMissing as exc:
        raise AgentError(f"{exc}: enroll again with a fresh token") from None


async def make_backend(kind: str, interface: str) -> WireGuardBackend:
    """`auto`: the kernel's WireGuard where the module is there, else wireguard-go."""
    if kind == "auto":
        kind = "kernel" if await kernel_wireguard_available() else "userspace"
    if kind == "kernel":
        return KernelBackend(interface)
    return UserspaceBackend(interface)


async def enroll(
    token: str,
    server: str | None,
    name: str,
    public_key: str,
    endpoints: Sequence[str],
    listen_port: int | None,
    signing_key: SigningKey,
) -> tuple[str, dict[str, Any]]:
    """Join with the token. Returns (server URL, join result). Raises AgentError."""
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
        raise AgentError(f"cannot reach the control plane at {url}: nothing answers") from None
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        if refused_by_broker(exc):
            raise AgentError(
                f"join refused: the broker at {url} turned this agent away: enrollment token "
                "not recognised (damaged or tampered), or too many failed attempts"
            ) from None
        raise AgentError(f"cannot reach the control plane at {url}: {exc}") from None
    try:
        # Signed with the host's own key, which the join registers: from now
        # on only this machine can speak for this host.
        payload, signature = signed_payload(
            signing_key,
            "join",
            {
                "command_id": uuid.uuid4().hex,
                "token": token,
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
                headers={"Netmesh-Actor": f"agent:{name}", **signature},
            )
        except nats.errors.NoRespondersError:
            raise AgentError(f"no netmesh control plane is answering at {url}") from None
        except nats.errors.TimeoutError:
            raise AgentError(f"the control plane at {url} did not answer in time") from None
        try:
            reply = msgspec.json.decode(msg.data, type=Reply)
        except msgspec.DecodeError:
            raise AgentError(f"the server at {url} sent an answer this agent cannot read") from None
        if not reply.ok or not isinstance(reply.result, dict):
            raise AgentError(f"join refused: {reply.error or 'no result'}")
        return url, dict(reply.result)
    finally:
        await nc.close()


class Agent:
    def __init__(
        self,
        *,
        identity: Identity,
        state: StateDir,
        backend: WireGuardBackend,
        link: LinkControl,
        private_key: str,
        public_key: str,
        resync_interval: float = RESYNC_INTERVAL,
        rotate_every: float | None = None,
    ) -> None:
        self.identity = identity
        self.state = state
        self.backend = backend
        self.link = link
        self._private_key = private_key
        self.public_key = public_key
        self.resync_interval = resync_interval
        # Make a new WireGuard key when the current one is this old (seconds).
        self.rotate_every = rotate_every
        self._next_scheduled_rotation = 0.0  # after a refusal: not before this
        self.detect_endpoints = False  # True when endpoints were found, not given
        self.receiver = DesiredReceiver(
            identity.host_id,
            state,
            identity.server_key,
            on_state=self.wake,
            on_rejection=self._on_rejection,
            reread=self._reread_subject,
            ask_for_snapshot=self._ask_for_snapshot,
        )
        self._background: set[asyncio.Task[None]] = set()
        self._subscribing = asyncio.Lock()
        self.applied: DesiredState | None = None
        # Per reconciler, the desired state it last applied in full.
        self._applied_by: dict[str, DesiredState] = {}
        self.section_errors: dict[str, str] = {}  # reconciler -> why its last pass failed
        self.nc: Client | None = None
        self._wake = asyncio.Event()
        self._retry_delay = RETRY_MIN
        self._retry_handle: asyncio.TimerHandle | None = None
        self._sub: Any = None
        self._closing = False
        self._refused_logged = False
        self._last_error: str | None = None

    def reload_key(self) -> None:
        """SIGHUP (from `netmesh agent rotate-key`): take the key now in the state
        dir; the next pass sets it on the device, peers already expect it."""
        try:
            key = self.state.private_key()
        except (OSError, ValueError, StateDirError) as exc:
            log.warning("key not reloaded", error=str(exc))
            return
        self._private_key = private_key_b64(key)
        self.public_key = public_key_of(key)
        log.info("WireGuard key reloaded", public_key=self.public_key)
        self._wake.set()

    def wake(self) -> None:
        """Run a reconcile pass soon (a change was seen)."""
        self._wake.set()

    # -- desired state from the control plane ---------------------------------

    @property
    def desired(self) -> DesiredState | None:
        return self.receiver.feed.state

    @property
    def feed(self) -> DesiredFeed:
        return self.receiver.feed

    @property
    def rejected(self) -> int:
        return self.receiver.rejected

    @property
    def last_rejection(self) -> str | None:
        return self.receiver.last_rejection

    def offer(self, message: DesiredMessage, *, pending: int = 0) -> Outcome:
        """See `DesiredReceiver.offer`."""
        return self.receiver.offer(message, pending=pending)

    def authentic(self, data: bytes, signature: str | None) -> bool:
        return self.receiver.authentic(data, signature)

    def _on_rejection(self) -> None:
        self.write_status()
        self._spawn(self.report())

    def _reread_subject(self) -> None:
        if self.nc is not None:
            self._spawn(self._resubscribe())

    def _ask_for_snapshot(self) -> None:
        if self.nc is not None and self.nc.is_connected:
            self._spawn(self._request_snapshot())

    async def _request_snapshot(self) -> None:
        assert self.nc is not None
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(resync_subject(self.identity.host_id), b"")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run in the background, holding a reference until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _on_desired(self, msg: Msg) -> None:
        if not self.authentic(msg.data, (msg.headers or {}).get(SIGNATURE_HEADER)):
            return
        try:
            message = decode_message(msg.data)
        except msgspec.DecodeError as exc:
            log.warning("undecodable desired state ignored", error=str(exc))
            return
        try:
            pending = msg.metadata.num_pending
        except Exception:  # not a JetStream message: treat it as the last one
            pending = 0
        self.offer(message, pending=pending)

    async def subscribe(self) -> None:
        """Read the subject from its start: the latest snapshot, then the deltas
        since (what we already hold is skipped)."""
        assert self.nc is not None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        # Listen first, then ask the control plane for a consumer of our
        # subject delivering here: it starts with the latest snapshot. (Agents
        # may not create consumers themselves: see events/subjects.py.) Gaps
        # are the feed's to notice: it re-reads, then asks for a snapshot.
        inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(inbox, cb=self._on_desired)
        answer = await self.nc.request(
            consume_subject(self.identity.host_id),
            msgspec.json.encode({"deliver_subject": inbox}),
            timeout=10,
        )
        try:
            reply = msgspec.json.decode(answer.data, type=Reply)
        except msgspec.DecodeError:
            raise nats.errors.Error("the control plane sent an unreadable answer") from None
        if not reply.ok:
            raise nats.errors.Error(f"no consumer for our desired state: {reply.error}")

    # -- reconcile -----------------------------------------------------------

    async def read_actual(self) -> Actual:
        return await read_actual(self.backend, self.link)

    async def reconcile_once(self) -> bool:
        """One pass. Returns True when the machine matches the desired state."""
        desired = self.desired
        if desired is None:
            return True
        drift = self.applied is not None and self.applied.revision == desired.revision

        def log_op(section: str, op: Op) -> None:
            log.info(
                "drift repair" if drift else "apply",
                section=section,
                op=str(op),
                revision=desired.revision,
            )

        try:
            result = await reconcile(
                desired,
                self.backend,
                self.link,
                public_key=self.public_key,
                private_key=self._private_key,
                previous=self._applied_by,
                on_op=log_op,
            )
        except BackendError as exc:
            return self._failed(desired, f"read: {exc}")
        for outcome in result.outcomes:
            if outcome.ok:
                self._applied_by[outcome.name] = desired
        self.section_errors = result.errors()
        if not result.ok:
            return self._failed(
                desired, "; ".join(f"{name}: {why}" for name, why in self.section_errors.items())
            )
        newly = self.applied is None or self.applied.revision != desired.revision
        self.applied = desired
        self._last_error = None
        self._retry_delay = RETRY_MIN
        if newly or result.ops:
            log.info("in sync", revision=desired.revision, ops=result.ops)
        if result.ops:
            # Look again soon: new peers handshake within seconds, and the
            # control plane should hear about it before the next resync.
            asyncio.get_running_loop().call_later(SETTLE_DELAY, self._wake.set)
        self.write_status()
        # An empty plan means the device we just read is still current.
        await self.report(None if result.ops else result.actual.device)
        return True

    def write_status(self) -> None:
        """Best effort: a full disk must not stop the agent."""
        status = AgentStatus(
            pid=os.getpid(),
            interface=self.backend.interface,
            backend=type(self.backend).__name__,
            connected=self.nc is not None and self.nc.is_connected,
            desired_revision=self.desired.revision if self.desired else 0,
            applied_revision=self.applied.revision if self.applied else 0,
            last_error=self._last_error,
            rejected=self.rejected,
            last_rejection=self.last_rejection,
            updated_at=time.time(),
        )
        try:
            self.state.save_status(status)
        except OSError as exc:
            log.warning("status file not written", error=str(exc))

    def _failed(self, desired: DesiredState, why: str) -> bool:
        self._last_error = why
        self.write_status()
        log.warning(
            "apply failed, will retry",
            revision=desired.revision,
            error=why,
            retry_in=round(self._retry_delay, 1),
        )
        loop = asyncio.get_running_loop()
        self._retry_handle = loop.call_later(self._retry_delay, self._wake.set)
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        return False

    async def report(self, device: DeviceState | None = None) -> None:
        """Best effort: without NATS the report waits for the next pass.
        `device` is a fresh read of the interface, if the caller has one."""
        if self.nc is None or not self.nc.is_connected:
            return
        peers: tuple[PeerReport, ...] = ()
        with contextlib.suppress(BackendError):
            if device is None:
                device = await self.backend.read()
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
            error=self._last_error,
            section_errors=self.section_errors,
            peers=peers,
            rejected=self.rejected,
            last_rejection=self.last_rejection,
        )
        try:
            await self.nc.jetstream().publish(
                report_subject(self.identity.host_id, APPLIED),
                applied_encoder.encode(report),
                stream=REPORTS_STREAM,
                timeout=5,
            )
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("report not delivered", error=repr(exc))

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
                self._last_error = f"pass failed: {exc!r}"
                await asyncio.sleep(min(self.resync_interval, RETRY_MAX))

    def rotation_due(self, now: float) -> str | None:
        """Why this host should make a new WireGuard key now, if it should: an
        admin asked (`netmesh node rotate-key`), or the key is older than
        `--rotate-key-every` (its file's age: a rotation replaces the file)."""
        desired = self.desired
        if desired is None:
            return None
        if desired.interface.key_epoch > self.identity.key_epoch:
            return "requested"
        if self.rotate_every is not None and now >= self._next_scheduled_rotation:
            age = now - self.state.private_key_made_at()
            if age >= self.rotate_every:
                return "scheduled"
        return None

    async def check_key_rotation(self) -> None:
        """Make a new WireGuard key here when one is due, announce it (signed),
        then switch to it; peers take it in place."""
        why = self.rotation_due(time.time())
        if why is None:
            return
        if self.nc is None or not self.nc.is_connected:
            return  # the next pass after reconnecting
        desired = self.desired
        assert desired is not None
        public_key = public_key_of(self.state.stage_private_key())
        try:
            reply = await send_host_command(
                self.nc, self.state, self.identity, "host.rotate_key", {"public_key": public_key}
            )
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("key rotation not delivered, will retry", error=repr(exc))
            return
        if reply.ok:
            self.state.commit_private_key()
            log.info("key rotated", why=why)
            self.reload_key()
        else:  # not retried at once: it would fail the same way on every pass
            log.warning("key rotation refused", error=reply.error, why=why)
            self._next_scheduled_rotation = time.time() + SCHEDULED_ROTATION_RETRY
        self.identity.key_epoch = desired.interface.key_epoch
        self.state.save_identity(self.identity)

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
        if self.nc is not None and self.nc.is_connected:
            await self.report_endpoints()

    # -- connection ----------------------------------------------------------

    async def connect_forever(self) -> None:
        """Connect (with capped, jittered backoff), subscribe, and stay subscribed."""
        delay = CONNECT_BACKOFF_MIN
        while self.nc is None:
            try:
                # nats-py retries a failed *first* connect forever on its own, every
                # reconnect_time_wait, silently and without backoff. Probe with a
                # connection that gives up, so the backoff and the log here apply.
                login = broker_login(self.state, self.identity, self.identity.server)
                probe = await connect_once(self.identity.server, timeout=5, **login)
                await probe.close()
                self.nc = await nats.connect(
                    self.identity.server,
                    **login,
                    name=f"netmesh-agent-{self.identity.name}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=CONNECT_BACKOFF_MIN,
                    reconnect_to_server_handler=reconnect_backoff,
                    connect_timeout=5,
                    reconnected_cb=self._on_reconnected,
                    disconnected_cb=self._on_disconnected,
                    error_cb=self._on_error,
                    closed_cb=self._on_closed,
                )
            except (OSError, nats.errors.Error, TimeoutError) as exc:
                if refused_by_broker(exc):
                    log.warning(REFUSED, retry_in=round(CONNECT_BACKOFF_MAX, 1))
                    await asyncio.sleep(CONNECT_BACKOFF_MAX * random.uniform(0.5, 1.0))
                    continue
                log.info(
                    "control plane unreachable, running from cache",
                    error=repr(exc),
                    retry_in=round(delay, 1),
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, CONNECT_BACKOFF_MAX)
        log.info("connected", server=self.identity.server)
        self.write_status()
        await self._resubscribe()

    async def _resubscribe(self) -> None:
        # A gap's re-read and a reconnect can ask at once: one at a time, or
        # two subscriptions would be made and one leaked.
        async with self._subscribing:
            await self._resubscribe_now()

    async def _resubscribe_now(self) -> None:
        delay = CONNECT_BACKOFF_MIN
        while True:
            try:
                await self.subscribe()
                await self.report_endpoints()
                self._wake.set()
                return
            except (nats.errors.Error, TimeoutError) as exc:
                log.info("subscribe failed, retrying", error=repr(exc))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, CONNECT_BACKOFF_MAX)

    async def report_endpoints(self) -> None:
        """Tell the control plane where this host can be reached, when that changed."""
        assert self.nc is not None
        endpoints = list(self.identity.endpoints)
        # Without a desired state we do not know our port: let the control plane
        # keep the one it chose (the network's) rather than claim a default.
        listen_port = self.desired.interface.listen_port if self.desired else None
        try:
            reply = await send_host_command(
                self.nc,
                self.state,
                self.identity,
                "endpoint.report",
                {"endpoints": endpoints, "listen_port": listen_port},
            )
            if not reply.ok:
                log.warning("endpoint report refused", error=reply.error)
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("endpoint report not delivered", error=repr(exc))

    async def _on_reconnected(self) -> None:
        self._refused_logged = False
        log.info("reconnected")
        self._spawn(self._resubscribe())

    async def _on_disconnected(self) -> None:
        log.info("disconnected from the control plane; keeping the last desired state")
        self.write_status()

    async def _on_closed(self) -> None:
        # nats-py gives up for good when the broker refuses us mid-session (a
        # removed host, kicked): start over with the connect loop and its backoff.
        if self._closing:
            return
        log.info("connection closed by the broker; reconnecting with backoff")
        self.nc = None
        self._sub = None
        self.write_status()
        self._spawn(self.connect_forever())

    async def _on_error(self, exc: Exception) -> None:
        if refused_by_broker(exc):
            # nats-py keeps reconnecting on its own (with our backoff); say
            # once per outage why it does not get in.
            if not self._refused_logged:
                self._refused_logged = True
                log.warning(REFUSED, retry_in=round(CONNECT_BACKOFF_MAX, 1))
            return
        if "permissions violation" in str(exc).lower():
            # The broker refused something this agent tried: a bug or a
            # mismatch with the control plane's version; never silent.
            log.warning("denied by the broker", error=str(exc))
            return
        log.debug("nats error", error=repr(exc))

    async def close(self) -> None:
        self._closing = True
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        if self.nc is not None:
            await close_quickly(self.nc)
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
) -> None:
    """Enroll if needed and run until SIGINT/SIGTERM. Raises AgentError."""
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
    if token is not None:
        url, result = await enroll(
            token, server, host_name, public_key, offered, listen_port, state.signing_key()
        )
        networks = sorted({*(identity.networks if identity else []), result["network"]})
        identity = Identity(
            host_id=result["host_id"],
            name=host_name,
            server=url,
            networks=networks,
            endpoints=offered,
            # Pinned from the token (enroll() has parsed it already).
            server_key=parse_token(token).server_key or (identity.server_key if identity else ""),
            server_ca=parse_token(token).ca or (identity.server_ca if identity else ""),
        )
        state.save_identity(identity)
        log.info(
            "joined",
            network=result["network"],
            address=result["interface_address"],
            host_id=result["host_id"],
            node_id=result["node_id"],
        )
    elif identity is None:
        raise AgentError(f"not enrolled yet ({state_dir} has no identity): pass --token")
    else:
        if server is not None or endpoints:
            identity.server = server or identity.server
            identity.endpoints = offered
            state.save_identity(identity)
    broker_login(state, identity, identity.server)  # a tls:// server without a CA: say so now

    agent = Agent(
        identity=identity,
        state=state,
        backend=await make_backend(backend, interface),
        link=Link(interface),
        private_key=private_key_b64(key),
        public_key=public_key,
        resync_interval=resync_interval,
        rotate_every=rotate_every,
    )
    agent.detect_endpoints = not endpoints
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, agent.reload_key)
    tasks = [
        asyncio.create_task(agent.reconcile_forever(), name="reconcile"),
        asyncio.create_task(agent.connect_forever(), name="connect"),
        asyncio.create_task(watch_interface(interface, agent.wake), name="watch"),
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
