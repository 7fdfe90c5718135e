"""Webhook delivery: each hook's events POSTed to its URL, in order,
at least once, signed.

- One durable pull consumer of NETMESH_EVENTS per hook (`hook-<id>`), with at
  most one message unacknowledged: whichever replica pulls it delivers it, and
  the next one is not handed to anyone before it is acknowledged. So with
  several control-plane replicas every hook still has one delivery in flight,
  in order, without electing anyone; a replica that dies mid-delivery lets the
  message be redelivered (at least once) when its ack wait runs out.
- Its position (the last event delivered) is also kept in NETMESH_HOOKS
  (`netmesh.hook.<id>.position`): the event stream lets no consumer outlive a
  minute without a listener, so a control plane down for longer finds the
  consumer gone and makes it again from there, not from the start.
- A failed POST (not 2xx, a timeout, no connection) is retried, with
  exponential backoff up to BACKOFF_MAX, forever: nothing is dropped. While it
  fails, `netmesh.hook.<id>.status` says since when, how often and why, and
  `hook list` shows it (and the log warns).
- Each POST: the envelope as in the log, plus `seq` and `subject`; headers
  `Netmesh-Event-Id` (for dedupe), `Netmesh-Event-Type`, `Netmesh-Delivery`
  (the attempt) and `Netmesh-Signature: sha256=<hex HMAC-SHA256 of the body>`
  under the hook's secret. Events whose MAC does not check out are never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from controlplane.enrollment import EnrollmentSecrets
from controlplane.metrics import NO_METRICS, ControlPlaneMetrics
from controlplane.streams import HOOKS_PREFIX, HOOKS_STREAM
from events.signing import EVENT_MAC_HEADER, event_mac_ok
from events.subjects import EVENTS_PREFIX, EVENTS_STREAM
from projections.topology import Hook, Topology

log = structlog.get_logger("netmesh.hooks")

ACK_WAIT = 30.0  # a delivery's POST must end well within it
POST_TIMEOUT = 10.0
FETCH_WAIT = 1.0
SYNC_EVERY = 0.5  # how soon a hook added or removed is picked up
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 60.0
SIGNATURE_HEADER = "Netmesh-Signature"


def backoff(attempt: int) -> float:
    """Seconds before attempt `attempt + 1` (attempt 1 failed: BACKOFF_FIRST)."""
    return float(min(BACKOFF_FIRST * 2 ** max(attempt - 1, 0), BACKOFF_MAX))


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def wants(hook: Hook, event_type: str) -> bool:
    return fnmatch.fnmatchcase(event_type, hook.events)


class DeliveryStatus(msgspec.Struct, kw_only=True):
    """How a hook's deliveries go (shared by the replicas, in NETMESH_HOOKS)."""

    delivered: int = 0  # the last event delivered (its seq)
    delivered_at: float | None = None
    failing_since: float | None = None  # the first failure of the current run of them
    failures: int = 0  # in the current run
    last_error: str | None = None


def position_subject(hook_id: str) -> str:
    return f"{HOOKS_PREFIX}.{hook_id}.position"


def status_subject(hook_id: str) -> str:
    return f"{HOOKS_PREFIX}.{hook_id}.status"


class HookDelivery:
    def __init__(
        self,
        nc: Client,
        mac_key: bytes,
        secrets: EnrollmentSecrets,
        topology: Callable[[], Topology],
        metrics: ControlPlaneMetrics = NO_METRICS,
    ) -> None:
        self._nc = nc
        self._metrics = metrics
        self.failing: set[str] = set()  # hooks whose last attempt here failed
        self._js = nc.jetstream()
        self._mac_key = mac_key
        self._secrets = secrets
        self._topology = topology
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._closing = asyncio.Event()

    def secret_of(self, hook: Hook) -> str:
        return self._secrets.key_for(hook.command_id)[1]

    def close(self) -> None:
        """End `run` (its deliveries stop where they are: redelivered later)."""
        self._closing.set()

    async def run(self) -> None:
        """Keep one delivery task per hook, until closed."""
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT))
        try:
            while not self._closing.is_set():
                hooks = dict(self._topology().hooks)
                for hook_id, hook in hooks.items():
                    if hook_id not in self._tasks:
                        self._tasks[hook_id] = asyncio.create_task(
                            self._deliver_forever(hook), name=f"hook {hook_id}"
                        )
                for hook_id in set(self._tasks) - set(hooks):
                    await self._stop(hook_id)
                    with contextlib.suppress(NotFoundError, nats.errors.Error):
                        await self._js.delete_consumer(EVENTS_STREAM, f"hook-{hook_id}")
                    with contextlib.suppress(NotFoundError, nats.errors.Error):
                        await self._js.purge_stream(
                            HOOKS_STREAM, subject=f"{HOOKS_PREFIX}.{hook_id}.>"
                        )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), SYNC_EVERY)
        finally:
            for hook_id in list(self._tasks):
                await self._stop(hook_id)
            await self._http.close()

    async def _forget(self, hook_id: str) -> None:
        """A removed hook's consumer, position and status go (every replica
        tries; one succeeds)."""
        with contextlib.suppress(NotFoundError, nats.errors.Error):
            await self._js.delete_consumer(EVENTS_STREAM, f"hook-{hook_id}")
        with contextlib.suppress(NotFoundError, nats.errors.Error):
            await self._js.purge_stream(HOOKS_STREAM, subject=f"{HOOKS_PREFIX}.{hook_id}.>")

    async def _stop(self, hook_id: str) -> None:
        self.failing.discard(hook_id)
        task = self._tasks.pop(hook_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def status(self, hook_id: str) -> DeliveryStatus:
        try:
            msg = await self._js.get_last_msg(HOOKS_STREAM, status_subject(hook_id))
        except NotFoundError:
            return DeliveryStatus()
        return msgspec.json.decode(msg.data or b"{}", type=DeliveryStatus)

    async def pending(self, hook_id: str) -> int | None:
        """Events not yet delivered (None: its consumer is not there now)."""
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, f"hook-{hook_id}")
        except NotFoundError:
            return None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def _deliver_forever(self, hook: Hook) -> None:
        while True:
            try:
                await self._deliver(hook)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker went away: again, soon
                log.warning("hook delivery interrupted", hook=hook.hook_id, error=repr(exc))
                await asyncio.sleep(1.0)

    async def _consumer(self, hook: Hook) -> Any:
        durable = f"hook-{hook.hook_id}"
        try:
            await self._js.consumer_info(EVENTS_STREAM, durable)
        except NotFoundError:
            start = max(hook.added_seq, await self._position(hook.hook_id)) + 1
            await self._js.add_consumer(
                EVENTS_STREAM,
                ConsumerConfig(
                    durable_name=durable,
                    filter_subject=f"{EVENTS_PREFIX}.>",
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=start,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=ACK_WAIT,
                    max_ack_pending=1,
                    max_deliver=-1,
                ),
            )
        return await self._js.pull_subscribe_bind(durable, stream=EVENTS_STREAM)

    async def _position(self, hook_id: str) -> int:
        try:
            msg = await self._js.get_last_msg(HOOKS_STREAM, position_subject(hook_id))
        except NotFoundError:
            return 0
        return int(msg.data or b"0")

    async def _deliver(self, hook: Hook) -> None:
        sub = await self._consumer(hook)
        try:
            while True:
                try:
                    (msg,) = await sub.fetch(1, timeout=FETCH_WAIT)
                except nats.errors.TimeoutError:
                    continue
                await self._one(hook, msg)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _one(self, hook: Hook, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        mac = (msg.headers or {}).get(EVENT_MAC_HEADER)
        if not mac or not event_mac_ok(self._mac_key, msg.data, mac):
            log.warning("not an event of ours: not delivered", hook=hook.hook_id, seq=seq)
            await self._done(hook, msg, seq)
            return
        # Read as JSON, not decoded into our types: an event of a newer version
        # is passed on as it is, not stuck on.
        body = json.loads(msg.data)
        event_type, event_id = str(body.get("type", "")), str(body.get("event_id", ""))
        if not wants(hook, event_type):
            await self._done(hook, msg, seq)
            return
        body["seq"], body["subject"] = seq, msg.subject
        data = json.dumps(body, sort_keys=True).encode()
        attempt = msg.metadata.num_delivered or 1
        headers = {
            "Content-Type": "application/json",
            "Netmesh-Event-Id": event_id,
            "Netmesh-Event-Type": event_type,
            "Netmesh-Delivery": str(attempt),
            SIGNATURE_HEADER: signature(self.secret_of(hook), data),
        }
        assert self._http is not None
        try:
            async with self._http.post(hook.url, data=data, headers=headers) as response:
                ok, why = 200 <= response.status < 300, f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._metrics.hook_delivery("ok" if ok else "failed")
        if ok:
            self.failing.discard(hook.hook_id)
            await self._done(hook, msg, seq, delivered=True)
            return
        self.failing.add(hook.hook_id)
        status = await self.status(hook.hook_id)
        status.failing_since = status.failing_since or time.time()
        status.failures += 1
        status.last_error = why
        await self._publish_status(hook.hook_id, status)
        delay = backoff(attempt)
        log.warning(
            "hook delivery failed, will retry",
            hook=hook.hook_id,
            url=hook.url,
            seq=seq,
            attempt=attempt,
            error=why,
            retry_in=delay,
            failing_for=round(time.time() - status.failing_since, 1),
        )
        await msg.nak(delay=delay)

    async def _done(self, hook: Hook, msg: Msg, seq: int, *, delivered: bool = False) -> None:
        """Acknowledged, and the position moved (before the ack: a crash in
        between delivers the event again, never skips it)."""
        await self._js.publish(position_subject(hook.hook_id), str(seq).encode())
        if delivered:
            await self._publish_status(
                hook.hook_id, DeliveryStatus(delivered=seq, delivered_at=time.time())
            )
        await msg.ack()

    async def _publish_status(self, hook_id: str, status: DeliveryStatus) -> None:
        await self._js.publish(status_subject(hook_id), msgspec.json.encode(status))

    async def test(self, hook: Hook) -> dict[str, Any]:
        """POST a `hook.test` message now (not from the log): the answer's status."""
        body = json.dumps(
            {"type": "hook.test", "hook_id": hook.hook_id, "time": time.time()}, sort_keys=True
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "Netmesh-Event-Type": "hook.test",
            SIGNATURE_HEADER: signature(self.secret_of(hook), body),
        }
        started = time.monotonic()
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT)) as http,
                http.post(hook.url, data=body, headers=headers) as response,
            ):
                return {
                    "ok": 200 <= response.status < 300,
                    "status": response.status,
                    "seconds": round(time.monotonic() - started, 3),
                }
        except (aiohttp.ClientError, TimeoutError) as exc:
            return {"ok": False, "status": None, "error": f"{type(exc).__name__}: {exc}"}
