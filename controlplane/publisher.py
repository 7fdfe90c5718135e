"""Publishes desired-state messages on `netmesh.desired.<host>` (stream NETMESH_DESIRED)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from nacl.signing import SigningKey
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

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


def message_id(message: DesiredMessage) -> str:
    """A function of the message's identity, so that JetStream drops the same
    message published twice (a retry, or another replica)."""
    if isinstance(message, DesiredDelta):
        return f"desired.{message.host_id}.{message.base}.{message.revision}"
    return f"desired.{message.host_id}.{message.revision}"


class JetStreamDesiredPublisher:
    def __init__(self, js: JetStreamContext, signing_key: SigningKey) -> None:
        self._js = js
        self._key = signing_key

    async def publish(self, batch: Sequence[tuple[DesiredMessage, bytes]]) -> None:
        # Pipelined: every message is sent before any ack is awaited (one round
        # trip per batch, not per message). One connection keeps them in order.
        acks = []
        try:
            for message, data in batch:
                headers = {
                    "Nats-Msg-Id": message_id(message),
                    REVISION_HEADER: str(message.revision),
                    SIGNATURE_HEADER: sign(self._key, data),
                }
                if not isinstance(message, DesiredDelta):
                    headers["Nats-Rollup"] = "sub"  # a snapshot replaces what came before
                acks.append(
                    await self._js.publish_async(
                        desired_subject(message.host_id),
                        data,
                        stream=DESIRED_STREAM,
                        headers=headers,
                        # No stall timeout: nats-py would start a timer task per
                        # message for it (a tenth of a join's cost at 2,000 hosts).
                        # The ack wait below bounds the whole batch instead.
                    )
                )
            async with asyncio.timeout(ACK_TIMEOUT):
                for ack in acks:
                    await ack
        finally:
            for ack in acks:
                ack.cancel()  # no-op when done; frees the pending slot otherwise

    async def published_revisions(self) -> dict[str, int]:
        """The revision header of the last message of every host's subject,
        read with a headers-only consumer (no payloads cross the wire)."""
        prefix = f"{DESIRED_PREFIX}."
        sub = await self._js.pull_subscribe(
            f"{DESIRED_PREFIX}.>",
            stream=DESIRED_STREAM,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                headers_only=True,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=60.0,
            ),
        )
        revisions: dict[str, int] = {}
        try:
            info = await sub.consumer_info()
            remaining = info.num_pending or 0
            while remaining > 0:
                for msg in await sub.fetch(min(remaining, 1000), timeout=ACK_TIMEOUT):
                    remaining -= 1
                    host_id = msg.subject.removeprefix(prefix)
                    value = (msg.headers or {}).get(REVISION_HEADER)
                    if value is not None and value.isdigit():
                        revisions[host_id] = int(value)
        finally:
            await sub.unsubscribe()
        return revisions


async def read_desired(js: JetStreamContext, host_id: str) -> DesiredState | None:
    """A host's desired state as an agent starting from nothing would read it:
    its subject's snapshot and the deltas since, in order. None if there is none."""
    sub = await js.pull_subscribe(
        desired_subject(host_id),
        stream=DESIRED_STREAM,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0
        ),
    )
    feed = DesiredFeed(host_id)
    try:
        remaining = (await sub.consumer_info()).num_pending or 0
        while remaining > 0:
            for msg in await sub.fetch(min(remaining, 1000), timeout=ACK_TIMEOUT):
                remaining -= 1
                feed.take(decode_message(msg.data))
    finally:
        await sub.unsubscribe()
    if feed.behind:
        raise ValueError(f"the desired states of {host_id} do not chain (a gap)")
    return feed.state
