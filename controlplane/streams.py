"""The JetStream streams netmesh uses, created idempotently at server start."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from events.jetstream import events_stream_config
from events.subjects import DESIRED_PREFIX, DESIRED_STREAM, REPORTS_PREFIX, REPORTS_STREAM


def desired_stream_config(replicas: int = 1) -> StreamConfig:
    # One subject per host; each snapshot rolls up the ones before it.
    return StreamConfig(
        name=DESIRED_STREAM,
        subjects=[f"{DESIRED_PREFIX}.>"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        allow_rollup_hdrs=True,
        allow_direct=True,
        description="netmesh desired WireGuard state, one subject per host",
    )


def reports_stream_config(replicas: int = 1) -> StreamConfig:
    # Only the latest report of each kind per host matters.
    return StreamConfig(
        name=REPORTS_STREAM,
        subjects=[f"{REPORTS_PREFIX}.>"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        allow_direct=True,
        description="netmesh agent reports: applied revision, endpoints, handshakes",
    )


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    for config in (
        events_stream_config(replicas),
        desired_stream_config(replicas),
        reports_stream_config(replicas),
    ):
        assert config.name is not None
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
