"""The event store on NATS JetStream (stream NETMESH_EVENTS).

Appends use JetStream's optimistic concurrency
(`Nats-Expected-Last-Subject-Sequence`, optionally over a wildcard with
`...-Subject`) and, for several events, an atomic batch: all or nothing. nats-py
has no batch helper, so the protocol is spoken here: `Nats-Batch-Id`,
`Nats-Batch-Sequence` 1..n, `Nats-Batch-Commit: 1` on the last; the first and the
last are sent as requests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
    StreamConsumerLimits,
)
from nats.js.errors import NotFoundError

from events.envelope import NOT_AN_EVENT, RecordedEvent, decode_envelope, encode_envelope
from events.signing import EVENT_MAC_HEADER, event_mac, event_mac_ok
from events.store import (
    ConcurrencyConflict,
    DuplicateAppend,
    Expectation,
    PendingEvent,
    StoreError,
    StoreUnavailable,
    check_batch,
)
from events.subjects import EVENTS_PREFIX, EVENTS_STREAM, read_events_subject

# JetStream error codes (ADR / server source) that carry meaning here.
ERR_WRONG_LAST_SEQUENCE = 10071
# The same refusal from a clustered stream (its leader checks the expectation
# while proposing, and says it without the sequence): a conflict too.
ERR_WRONG_LAST_SEQUENCE_CLUSTERED = 10164
ERR_BATCH_DUPLICATE_MSG_ID = 10201
RETRYABLE_ERRORS = {10163, 10158}  # new leader still applying; duplicate id in process


class _PubAckError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _PubAckError | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


READER_CONSUMER_INACTIVE = 60.0


def events_stream_config(replicas: int = 1) -> StreamConfig:
    """NETMESH_EVENTS: the audit log, kept forever."""
    return StreamConfig(
        name=EVENTS_STREAM,
        subjects=[f"{EVENTS_PREFIX}.>"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        allow_atomic=True,
        # Readers (admins, auditors, integrations) make their own consumers:
        # none may outlive a minute without a listener (so none outlives a
        # removed reader), whatever it asked for.
        consumer_limits=StreamConsumerLimits(inactive_threshold=READER_CONSUMER_INACTIVE),
        description="netmesh events: the source of truth and audit log",
    )


# Events read ahead of the consumer at most (then the subscription waits).
FOLLOW_BUFFER = 20_000
# Seconds between the idle heartbeats of a follower's ordered consumer.
FOLLOW_HEARTBEAT = 1.0


class JetStreamEventStore:
    """With `mac_key`, every event appended carries an HMAC of its stored bytes
    (header `Netmesh-Mac`), and every event read says whether its MAC checks
    out (`RecordedEvent.signature`): anyone who can publish on the broker can
    put bytes in the stream, not events the control plane will believe."""

    def __init__(
        self,
        nc: Client,
        *,
        timeout: float = 5.0,
        mac_key: bytes | None = None,
        reader: str | None = None,
    ) -> None:
        self._nc = nc
        self._mac_key = mac_key
        # On a guarded broker a reader (an admin's nkey) may not make consumers:
        # it asks the control plane for one delivering into its inbox.
        self._reader = reader
        self._js: JetStreamContext = nc.jetstream(timeout=timeout)
        self._timeout = timeout
        self._followers: dict[Any, Callable[[], None]] = {}

    async def ensure_stream(self, replicas: int = 1) -> None:
        """Create NETMESH_EVENTS if missing (idempotent)."""
        try:
            await self._js.stream_info(EVENTS_STREAM)
        except NotFoundError:
            await self._js.add_stream(events_stream_config(replicas))

    async def append(
        self,
        events: Sequence[PendingEvent],
        *,
        expect: Sequence[Expectation] = (),
        msg_id: str | None = None,
    ) -> int:
        headers: list[dict[str, str]] = []
        for pending, expectation in zip(events, check_batch(events, expect), strict=True):
            h: dict[str, str] = {}
            if expectation is not None:
                h["Nats-Expected-Last-Subject-Sequence"] = str(expectation.last_seq)
                if expectation.subject_filter != pending.subject:
                    h["Nats-Expected-Last-Subject-Sequence-Subject"] = expectation.subject_filter
            headers.append(h)
        if msg_id is not None:
            for i, h in enumerate(headers):
                h["Nats-Msg-Id"] = msg_id if len(events) == 1 else f"{msg_id}.{i + 1}"
        payloads = [encode_envelope(p.envelope) for p in events]
        if self._mac_key is not None:
            for h, payload in zip(headers, payloads, strict=True):
                h[EVENT_MAC_HEADER] = event_mac(self._mac_key, payload)
        if len(events) == 1:
            ack = await self._request(events[0].subject, payloads[0], headers[0])
        else:
            ack = await self._append_batch(events, payloads, headers)
        if ack.error is not None:
            _raise_for(ack.error)
        if ack.duplicate:
            raise DuplicateAppend(msg_id or "")
        return ack.seq

    async def _append_batch(
        self, events: Sequence[PendingEvent], payloads: list[bytes], headers: list[dict[str, str]]
    ) -> _PubAck:
        batch_id = uuid.uuid4().hex
        last = len(events)
        for i, (pending, payload, h) in enumerate(zip(events, payloads, headers, strict=True), 1):
            h["Nats-Batch-Id"] = batch_id
            h["Nats-Batch-Sequence"] = str(i)
            if i == last:
                h["Nats-Batch-Commit"] = "1"
                return await self._request(pending.subject, payload, h)
            if i == 1:
                # The server answers the first message only on error; an empty
                # answer means "batch started".
                first = await self._request(pending.subject, payload, h, allow_empty=True)
                if first.error is not None:
                    return first
            else:
                await self._nc.publish(pending.subject, payload, headers=h)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _request(
        self, subject: str, payload: bytes, headers: dict[str, str], *, allow_empty: bool = False
    ) -> _PubAck:
        try:
            reply = await self._nc.request(subject, payload, headers=headers, timeout=self._timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise StoreUnavailable(f"event store did not answer: {exc!r}") from exc
        if not reply.data:
            if allow_empty:
                return _PubAck()
            raise StoreUnavailable("event store gave an empty answer")
        return _ack_decoder.decode(reply.data)

    async def read_subject(self, subject: str) -> list[RecordedEvent]:
        try:
            last = await self._js.get_last_msg(EVENTS_STREAM, subject)
        except NotFoundError:
            return []
        out: list[RecordedEvent] = []
        sub = await self._js.subscribe(
            subject,
            stream=EVENTS_STREAM,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        try:
            async for msg in sub.messages:
                seq = msg.metadata.sequence.stream
                out.append(
                    RecordedEvent(seq=seq, subject=msg.subject, envelope=decode_envelope(msg.data))
                )
                if seq >= (last.seq or 0):
                    break
        finally:
            await sub.unsubscribe()
        return out

    async def last_sequence(self) -> int:
        """Raises StoreUnavailable (e.g. while a cluster elects the stream's leader)."""
        try:
            info = await self._js.stream_info(EVENTS_STREAM)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise StoreUnavailable(f"event store did not answer: {exc!r}") from exc
        return int(info.state.last_seq)

    async def read(self, seq: int) -> RecordedEvent | None:
        # One message by sequence (a retried command's answer): not the hot
        # path, so it checks the MAC on its own rather than through _recorded.
        try:
            raw = await self._js.get_msg(EVENTS_STREAM, seq)
        except NotFoundError:
            return None
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise StoreUnavailable(f"event store did not answer: {exc!r}") from exc
        data = raw.data or b""
        signature = "unchecked"
        if self._mac_key is not None:
            mac = (raw.headers or {}).get(EVENT_MAC_HEADER)
            ok = bool(mac) and event_mac_ok(self._mac_key, data, mac)
            signature = "valid" if ok else "unsigned" if not mac else "invalid"
        try:
            envelope = decode_envelope(data)
        except Exception:
            if signature in ("valid", "unchecked"):
                raise
            envelope, signature = NOT_AN_EVENT, "invalid"
        return RecordedEvent(
            seq=seq, subject=raw.subject or "", envelope=envelope, signature=signature
        )

    def as_followed(self, seq: int, pending: PendingEvent) -> RecordedEvent:
        # What `_recorded` makes of it: appended with our MAC when we have a key.
        return RecordedEvent(
            seq=seq,
            subject=pending.subject,
            envelope=decode_envelope(encode_envelope(pending.envelope)),
            signature="unchecked" if self._mac_key is None else "valid",
        )

    async def follow(self, from_seq: int = 1) -> AsyncIterator[RecordedEvent]:
        async for batch in self.follow_batches(from_seq):
            for recorded in batch:
                yield recorded

    async def follow_batches(
        self, from_seq: int = 1, max_batch: int = 1000
    ) -> AsyncIterator[list[RecordedEvent]]:
        # A callback subscription filling a buffer, not nats-py's message
        # iterator: the iterator costs an asyncio.wait per message, which was
        # a fifth of a replay's time. What has arrived is handed over at once.
        buffer: collections.deque[RecordedEvent | BaseException] = collections.deque()
        arrived = asyncio.Event()
        drained = asyncio.Event()
        ended = False

        async def on_message(msg: Msg) -> None:
            # Backpressure: a consumer slower than the stream (a long replay)
            # holds the callback here, and with it the consumer's flow control,
            # instead of buffering the whole stream in memory.
            while len(buffer) >= FOLLOW_BUFFER and not ended:
                drained.clear()
                await drained.wait()
            try:
                buffer.append(self._recorded(msg))
            except Exception as exc:  # an undecodable event of ours stops the follower, loudly
                buffer.append(exc)
            arrived.set()

        if self._reader is None:
            sub = await self._js.subscribe(
                f"{EVENTS_PREFIX}.>",
                stream=EVENTS_STREAM,
                ordered_consumer=True,
                cb=on_message,
                # A consumer lost with its broker (a cluster member killed) is
                # noticed after two missed heartbeats and made again from the
                # next sequence: 2 s, not nats-py's default 10 s of a frozen view.
                idle_heartbeat=FOLLOW_HEARTBEAT,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(from_seq, 1)
                ),
            )
        else:
            sub = await self._reader_subscription(max(from_seq, 1), on_message, buffer, arrived)

        def end() -> None:
            nonlocal ended
            ended = True
            arrived.set()
            drained.set()

        self._followers[sub] = end
        try:
            while not ended:  # close(): stop now, even with events buffered
                batch: list[RecordedEvent] = []
                while buffer and len(batch) < max_batch:
                    item = buffer.popleft()
                    if isinstance(item, BaseException):
                        raise item
                    batch.append(item)
                if batch:
                    drained.set()
                    yield batch
                    continue
                arrived.clear()
                await arrived.wait()
        finally:
            if self._followers.pop(sub, None) is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    async def _reader_subscription(
        self,
        from_seq: int,
        on_message: Callable[[Msg], Awaitable[None]],
        buffer: collections.deque[RecordedEvent | BaseException],
        arrived: asyncio.Event,
    ) -> Any:
        """Listen on a fresh inbox subject, then have the control plane make a
        consumer delivering there from `from_seq`. Without the ordered
        consumer's repair, a message dropped on the way (a reader too slow for
        its buffers) ends the reading with an error rather than a silent gap."""
        assert self._reader is not None
        expected = 1

        async def in_order(msg: Msg) -> None:
            nonlocal expected
            if expected == 0:
                return  # already broken: the reader is stopping
            if msg.metadata.sequence.consumer != expected:
                expected = 0
                buffer.append(StoreError("events were dropped on the way (reader too slow)"))
                arrived.set()
                return
            expected += 1
            await on_message(msg)

        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox, cb=in_order)
        answer = await self._nc.request(
            read_events_subject(self._reader),
            msgspec.json.encode({"deliver_subject": inbox, "start_seq": from_seq}),
            timeout=self._timeout,
        )
        reply = msgspec.json.decode(answer.data)
        if not isinstance(reply, dict) or not reply.get("ok"):
            await sub.unsubscribe()
            why = reply.get("error") if isinstance(reply, dict) else "unreadable answer"
            raise StoreError(f"the control plane made no consumer of the event stream: {why}")
        return sub

    def _recorded(self, msg: Msg) -> RecordedEvent:
        seq = stream_sequence(msg)
        signature = self._checked(msg)
        try:
            envelope = decode_envelope(msg.data)
        except Exception:
            if signature in ("valid", "unchecked"):
                raise
            # Not an event, and not ours: seen, never believed.
            envelope, signature = NOT_AN_EVENT, "invalid"
        return RecordedEvent(seq=seq, subject=msg.subject, envelope=envelope, signature=signature)

    def _checked(self, msg: Msg) -> str:
        if self._mac_key is None:
            return "unchecked"
        mac = (msg.headers or {}).get(EVENT_MAC_HEADER)
        if not mac:
            return "unsigned"
        return "valid" if event_mac_ok(self._mac_key, msg.data, mac) else "invalid"

    async def close(self) -> None:
        """End every `follow()` iteration (they stop cleanly, no cancellation needed)."""
        followers, self._followers = self._followers, {}
        for sub, end in followers.items():
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            end()


# A JetStream delivery's reply subject (ADR-15, v1 form):
# $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
_V1_ACK_TOKENS = 9


def stream_sequence(msg: Msg) -> int:
    """The stream sequence of a message a consumer delivered. The same as
    `msg.metadata.sequence.stream`, which also builds the message's whole
    metadata (a datetime included): a tenth of a replay's time."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == _V1_ACK_TOKENS and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5])
    return int(msg.metadata.sequence.stream)  # the v2 form (domains), or not JetStream's


def _raise_for(error: _PubAckError) -> Any:
    if error.err_code in (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_SEQUENCE_CLUSTERED):
        raise ConcurrencyConflict(error.description)
    if error.err_code == ERR_BATCH_DUPLICATE_MSG_ID:
        raise DuplicateAppend(error.description)
    exc = StoreError(f"{error.description} (err_code {error.err_code})")
    exc.retryable = error.err_code in RETRYABLE_ERRORS
    raise exc
