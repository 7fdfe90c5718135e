"""Publishes desired-state messages on `netmesh.desired.<host>` (stream NETMESH_DESIRED).

Each message is appended only if the host's subject is still where this
publisher last saw it (`Nats-Expected-Last-Subject-Sequence`): with several
control-plane replicas, a subject then holds one chain, each delta following
the message before it, and a lagging replica cannot roll up a subject with an
older snapshot. A refused append is reported back (None) for the runner to
resolve.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import msgspec
from nacl.signing import SigningKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from events.desired import (
    REVISION_HEADER,
    DesiredDelta,
    DesiredMessage,
    DesiredState,
    decode_message,
)
from events.feed import DesiredFeed
from events.signing import SIGNATURE_HEADER, sign
from events.subjects import DESIRED_PREFIX, DESIRED_STREAM, desired_subject

ACK_TIMEOUT = 30.0
# Acks awaited every this many messages: bounds what is in flight (a join into
# a network of 5,000 hosts is one batch of 5,000 messages).
WINDOW = 1000
ERR_WRONG_LAST_SEQUENCE = 10071


class PublishError(Exception):
    """JetStream did not store a message (other than for a moved subject)."""


def _stored_at(answer: bytes) -> int | None:
    """The stream sequence in a JetStream publish ack; None for "wrong last
    sequence" (the subject moved on). Raises PublishError otherwise."""
    if not answer:
        raise PublishError("no answer from JetStream (no stream for the subject?)")
    try:
        ack = msgspec.json.decode(answer, type=dict[str, Any])
    except msgspec.DecodeError:
        raise PublishError(f"unreadable JetStream answer {answer[:80]!r}") from None
    error = ack.get("error")
    if isinstance(error, dict):
        if error.get("err_code") == ERR_WRONG_LAST_SEQUENCE:
            return None
        raise PublishError(f"{error.get('description')} (err_code {error.get('err_code')})")
    seq = ack.get("seq")
    if not isinstance(seq, int):
        raise PublishError(f"JetStream answer without a sequence: {answer[:80]!r}")
    return seq


def message_id(message: DesiredMessage) -> str:
    """A function of the message's identity, so that JetStream drops the same
    message published twice (a retry, or another replica)."""
    if isinstance(message, DesiredDelta):
        return f"desired.{message.host_id}.{message.base}.{message.revision}"
    return f"desired.{message.host_id}.{message.revision}"


class JetStreamDesiredPublisher:
    def __init__(self, nc: Client, signing_key: SigningKey) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._key = signing_key
        # Acks come to one wildcard inbox and resolve our own futures. Not
        # nats-py's publish_async: its ack handler raises (instead of
        # reporting) a "wrong last sequence" answer, leaving the future hanging.
        self._inbox = nc.new_inbox()
        self._acks: dict[str, asyncio.Future[bytes]] = {}
        self._ack_sub: Subscription | None = None
        self._tokens = itertools.count()

    async def _on_ack(self, msg: Msg) -> None:
        future = self._acks.pop(msg.subject.rpartition(".")[2], None)
        if future is not None and not future.done():
            future.set_result(msg.data)

    async def _send(
        self, subject: str, data: bytes, headers: dict[str, str]
    ) -> asyncio.Future[bytes]:
        if self._ack_sub is None:
            # Sent before the first publish on the same connection: the server
            # has the subscription when the first ack comes back.
            self._ack_sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        token = str(next(self._tokens))
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._acks[token] = future
        await self._nc.publish(subject, data, reply=f"{self._inbox}.{token}", headers=headers)
        return future

    async def publish(self, batch: Sequence[tuple[DesiredMessage, bytes, int]]) -> list[int | None]:
        """Append each (message, encoded, expected last sequence of its subject);
        for each, the stream sequence it got, or None when the subject had moved
        on (another writer). Raises on anything else; a retry is safe."""
        out: list[int | None] = []
        for start in range(0, len(batch), WINDOW):
            out.extend(await self._publish_window(batch[start : start + WINDOW]))
        return out

    async def _publish_window(
        self, window: Sequence[tuple[DesiredMessage, bytes, int]]
    ) -> list[int | None]:
        # Pipelined: the window is sent before any ack is awaited (one round
        # trip per window, not per message). One connection keeps them in order.
        acks: list[asyncio.Future[bytes]] = []
        try:
            for message, data, expected in window:
                headers = {
                    "Nats-Expected-Stream": DESIRED_STREAM,
                    "Nats-Msg-Id": message_id(message),
                    "Nats-Expected-Last-Subject-Sequence": str(expected),
                    REVISION_HEADER: str(message.revision),
                    SIGNATURE_HEADER: sign(self._key, data),
                }
                if not isinstance(message, DesiredDelta):
                    headers["Nats-Rollup"] = "sub"  # a snapshot replaces what came before
                acks.append(await self._send(desired_subject(message.host_id), data, headers))
            out: list[int | None] = []
            async with asyncio.timeout(ACK_TIMEOUT):
                for ack in acks:
                    out.append(_stored_at(await ack))
            return out
        finally:
            for ack in acks:
                ack.cancel()  # no-op when done

    async def published(self) -> dict[str, tuple[int, int]]:
        """host -> (revision, stream sequence) of the last message on its subject,
        read with a headers-only consumer (no payloads cross the wire)."""
        prefix = f"{DESIRED_PREFIX}."
        return {
            msg.subject.removeprefix(prefix): (_revision(msg.headers), msg.metadata.sequence.stream)
            for msg in await _pending(
                self._js,
                f"{DESIRED_PREFIX}.>",
                DeliverPolicy.LAST_PER_SUBJECT,
                headers_only=True,
            )
        }

    async def last(self, host_id: str) -> tuple[int, int] | None:
        """(revision, stream sequence) of the last message on one host's subject."""
        try:
            msg = await self._js.get_last_msg(DESIRED_STREAM, desired_subject(host_id))
        except NotFoundError:
            return None
        return _revision(msg.headers), int(msg.seq or 0)


def _revision(headers: dict[str, str] | None) -> int:
    """The `Netmesh-Revision` header; 0 when absent (a version-1 message: republish)."""
    value = (headers or {}).get(REVISION_HEADER, "")
    return int(value) if value.isdigit() else 0


async def _pending(
    js: JetStreamContext, subject: str, policy: DeliverPolicy, *, headers_only: bool = False
) -> list[Msg]:
    """Every message an ephemeral consumer on `subject` has pending now, in order."""
    sub = await js.pull_subscribe(
        subject,
        stream=DESIRED_STREAM,
        config=ConsumerConfig(
            deliver_policy=policy,
            headers_only=headers_only,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
        ),
    )
    out: list[Msg] = []
    try:
        remaining = (await sub.consumer_info()).num_pending or 0
        while remaining > 0:
            batch = await sub.fetch(min(remaining, 1000), timeout=ACK_TIMEOUT)
            remaining -= len(batch)
            out.extend(batch)
    finally:
        await sub.unsubscribe()
    return out


async def read_desired(js: JetStreamContext, host_id: str) -> DesiredState | None:
    """A host's desired state as an agent starting from nothing would read it:
    its subject's snapshot and the deltas since, in order. None if there is none."""
    feed = DesiredFeed(host_id)
    for msg in await _pending(js, desired_subject(host_id), DeliverPolicy.ALL):
        feed.take(decode_message(msg.data))
    if feed.behind:
        raise ValueError(f"the desired states of {host_id} do not chain (a gap)")
    return feed.state


class MemoryDesiredPublisher:
    """The same contract in memory (tests, benchmarks): one stream of messages,
    per-subject expectations, snapshots rolling up their subject."""

    def __init__(self) -> None:
        self.subjects: dict[str, list[tuple[int, DesiredMessage, bytes]]] = {}
        self.seq = 0

    async def publish(self, batch: Sequence[tuple[DesiredMessage, bytes, int]]) -> list[int | None]:
        out: list[int | None] = []
        for message, data, expected in batch:
            held = self.subjects.setdefault(message.host_id, [])
            if (held[-1][0] if held else 0) != expected:
                out.append(None)
                continue
            self.seq += 1
            if not isinstance(message, DesiredDelta):
                held.clear()
            held.append((self.seq, message, data))
            out.append(self.seq)
        return out

    async def published(self) -> dict[str, tuple[int, int]]:
        return {h: (m[-1][1].revision, m[-1][0]) for h, m in self.subjects.items() if m}

    async def last(self, host_id: str) -> tuple[int, int] | None:
        held = self.subjects.get(host_id)
        return (held[-1][1].revision, held[-1][0]) if held else None

    def messages(self, host_id: str) -> list[DesiredMessage]:
        return [m for _, m, _ in self.subjects.get(host_id, [])]
