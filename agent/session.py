"""The agent's connection to the broker: connect with capped, jittered backoff,
read the host's desired-state subject through a consumer the control plane
makes for it, send the host's signed commands and its reports.

It knows nothing of WireGuard: what a message means is the receiver's, what
follows a (re)subscription is the daemon's (callbacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
import nats
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from agent.reconcile import ENFORCED_SECTIONS
from agent.statedir import Identity, StateDir
from events.commands import Reply
from events.connect import (
    BrokerTlsMissing,
    close_quickly,
    connect_once,
    refused_by_broker,
    server_urls,
    tls_options,
)
from events.desired import PROTOCOL
from events.natsid import client_options
from events.signing import signed_payload
from events.subjects import REPORTS_STREAM, command_subject, consume_subject, resync_subject

log = structlog.get_logger("netmesh.agent")

CONNECT_BACKOFF_MIN, CONNECT_BACKOFF_MAX = 0.5, 10.0
# Removed from its networks (or no control plane to ask): the interface stays
# as it was last told, and the agent keeps asking.
REFUSED = "the broker refuses this host; keeping the last desired state"


class AgentError(Exception):
    """Stops the agent with a one-line message (bad token, refused join, ...)."""


def reconnect_backoff(servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
    """nats-py reconnect policy: capped exponential backoff with jitter, so that
    a thousand agents do not hit a restarted server in the same second."""
    server = min(servers, key=lambda s: s.reconnects)
    delay = min(CONNECT_BACKOFF_MAX, CONNECT_BACKOFF_MIN * 2 ** min(server.reconnects, 16))
    return server, delay * random.uniform(0.5, 1.0)


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


def _consumer_name(reply: Reply) -> str:
    result = reply.result
    name = result.get("consumer") if isinstance(result, dict) else None
    return name if isinstance(name, str) else ""


class NotConnected(nats.errors.Error):
    """No connection to the broker right now (the agent runs from its cache)."""


class Session:
    def __init__(
        self,
        identity: Identity,
        state: StateDir,
        *,
        on_message: Callable[[Msg], Awaitable[None]],
        on_subscribed: Callable[[], Awaitable[None]],
        on_change: Callable[[], None],
    ) -> None:
        self.identity = identity
        self.state = state
        self.nc: Client | None = None
        self.sub: Subscription | None = None
        self._on_message = on_message  # a message on our desired-state subject
        self._on_subscribed = on_subscribed  # (re)subscribed: report, reconcile
        self._on_change = on_change  # connected or not: the status file
        self._subscribing = asyncio.Lock()
        # Whether the control plane delivers our desired state to this
        # connection (a consumer made for it since the last (re)connect).
        self.subscribed = False
        self.consumer = ""  # the name of the consumer that delivers to `sub`
        self._closing = False
        self._refused_logged = False
        self._background: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def broker(self) -> str | None:
        """The broker this connection is on now (scheme://host:port), if any."""
        if self.nc is None or not self.nc.is_connected or self.nc.connected_url is None:
            return None
        url = self.nc.connected_url
        return f"{url.scheme}://{url.hostname}:{url.port}"

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run in the background, holding a reference until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def command(self, verb: str, fields: dict[str, Any]) -> Reply:
        """A signed host command. Raises nats.errors.Error (NotConnected
        included) or TimeoutError when it is not answered."""
        if self.nc is None or not self.nc.is_connected:
            raise NotConnected("not connected")
        return await send_host_command(self.nc, self.state, self.identity, verb, fields)

    async def publish_report(self, subject: str, data: bytes) -> None:
        """Into the reports stream; best effort (logged when not delivered)."""
        if self.nc is None or not self.nc.is_connected:
            return
        try:
            await self.nc.jetstream().publish(subject, data, stream=REPORTS_STREAM, timeout=5)
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("report not delivered", error=repr(exc))

    async def request_snapshot(self) -> None:
        """Have the control plane append a fresh snapshot to our subject."""
        if self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(nats.errors.Error):
                await self.nc.publish(resync_subject(self.identity.host_id), b"")

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
                    server_urls(self.identity.server),  # every broker of a cluster
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
        log.info("connected", server=self.identity.server, broker=self.broker)
        self._on_change()
        await self.resubscribe()

    async def resubscribe(self, *, keep: bool = False) -> None:
        # A gap's re-read and a reconnect can ask at once: one at a time, or
        # two subscriptions would be made and one leaked.
        async with self._subscribing:
            await self._resubscribe_now(keep)

    async def _resubscribe_now(self, keep: bool) -> None:
        delay = CONNECT_BACKOFF_MIN
        while True:
            try:
                await self.subscribe(keep=keep)
                self.subscribed = True
                self._on_change()
                await self._on_subscribed()
                return
            except (nats.errors.Error, TimeoutError) as exc:
                log.info("subscribe failed, retrying", error=repr(exc))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, CONNECT_BACKOFF_MAX)

    async def subscribe(self, *, keep: bool = False) -> None:
        """Read the subject from its start: the latest snapshot, then the deltas
        since (what we already hold is skipped). With `keep` (after a
        reconnect, which subscribed our inbox again on the new broker), first
        ask to go on with the consumer we read from: it holds our place."""
        if self.nc is None:  # closed by the broker meanwhile: the connect loop resumes
            raise NotConnected("not connected")
        if keep and self.sub is not None and self.consumer and await self._kept():
            self.subscribed = True
            return
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
        self.subscribed = False
        # Listen first, then ask the control plane for a consumer of our
        # subject delivering here: it starts with the latest snapshot. (Agents
        # may not create consumers themselves: see events/subjects.py.) Gaps
        # are the feed's to notice: it re-reads, then asks for a snapshot.
        inbox = self.nc.new_inbox()
        self.sub = await self.nc.subscribe(inbox, cb=self._on_message)
        answer = await self.nc.request(
            consume_subject(self.identity.host_id),
            msgspec.json.encode(
                # What this agent reads and enforces: a control plane that would
                # send it something else refuses, saying to upgrade the agent.
                {"deliver_subject": inbox, "protocol": PROTOCOL, "sections": ENFORCED_SECTIONS}
            ),
            timeout=10,
        )
        try:
            reply = msgspec.json.decode(answer.data, type=Reply)
        except msgspec.DecodeError:
            raise nats.errors.Error("the control plane sent an unreadable answer") from None
        if not reply.ok:
            raise nats.errors.Error(f"no consumer for our desired state: {reply.error}")
        self.consumer = _consumer_name(reply)

    async def _kept(self) -> bool:
        """Whether the control plane lets us go on reading from our consumer
        (or made a new one into the same inbox). False: subscribe afresh
        (also what a control plane that does not know `consumer` causes)."""
        assert self.nc is not None and self.sub is not None
        answer = await self.nc.request(
            consume_subject(self.identity.host_id),
            msgspec.json.encode(
                {
                    "deliver_subject": self.sub.subject,
                    "protocol": PROTOCOL,
                    "sections": ENFORCED_SECTIONS,
                    "consumer": self.consumer,
                }
            ),
            timeout=10,
        )
        try:
            reply = msgspec.json.decode(answer.data, type=Reply)
        except msgspec.DecodeError:
            return False
        if not reply.ok:
            log.info("consumer not kept, reading our subject afresh", error=reply.error)
            return False
        kept = isinstance(reply.result, dict) and bool(reply.result.get("kept"))
        log.info("desired state delivered again", consumer_kept=kept)
        self.consumer = _consumer_name(reply)
        return True

    async def _on_reconnected(self) -> None:
        self._refused_logged = False
        log.info("reconnected", broker=self.broker)
        self._on_change()
        self.spawn(self.resubscribe(keep=True))

    async def _on_disconnected(self) -> None:
        log.info("disconnected from the control plane; keeping the last desired state")
        self.subscribed = False
        self._on_change()

    async def _on_closed(self) -> None:
        # nats-py gives up for good when the broker refuses us mid-session (a
        # removed host, kicked): start over with the connect loop and its backoff.
        if self._closing:
            return
        log.info("connection closed by the broker; reconnecting with backoff")
        self.nc = None
        self.sub = None
        self.subscribed = False
        self._on_change()
        self.spawn(self.connect_forever())

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
        for task in list(self._background):
            task.cancel()
        if self.nc is not None:
            await close_quickly(self.nc)
