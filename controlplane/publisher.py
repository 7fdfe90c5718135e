"""Publishes desired states on `netmesh.desired.<host>` (stream NETMESH_DESIRED)."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from events.desired import DesiredState, desired_decoder, desired_encoder
from events.subjects import DESIRED_STREAM, desired_subject


class JetStreamDesiredPublisher:
    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def publish(self, state: DesiredState) -> None:
        # The message id is a function of (host, revision): replicas publishing
        # the same state are deduplicated by JetStream. The rollup keeps one
        # snapshot per host.
        await self._js.publish(
            desired_subject(state.host_id),
            desired_encoder.encode(state),
            stream=DESIRED_STREAM,
            headers={
                "Nats-Rollup": "sub",
                "Nats-Msg-Id": f"desired.{state.host_id}.{state.revision}",
            },
        )

    async def last_revision(self, host_id: str) -> int | None:
        try:
            msg = await self._js.get_last_msg(DESIRED_STREAM, desired_subject(host_id))
        except NotFoundError:
            return None
        if msg.data is None:
            return None
        return desired_decoder.decode(msg.data).revision
