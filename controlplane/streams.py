"""The JetStream streams netmesh uses, created idempotently at server start."""

from __future__ import annotations

from dataclasses import replace

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


# A report lists every peer (~200 B each): 1 MB is some 5,000 peers. With one
# subject per host (all a host may write), the stream holds at most hosts x 1 MB.
# (No max_bytes: JetStream reserves it up front, and a small disk then refuses
# to create the stream at all.)
REPORT_MAX_BYTES = 1024 * 1024


def reports_stream_config(replicas: int = 1) -> StreamConfig:
    # Only the latest report of each kind per host matters.
    return StreamConfig(
        name=REPORTS_STREAM,
        subjects=[f"{REPORTS_PREFIX}.>"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        # Bounds against a host that reports too much.
        max_msg_size=REPORT_MAX_BYTES,
        allow_direct=True,
        description="netmesh agent reports: applied revision, endpoints, handshakes",
    )


HOOKS_STREAM = "NETMESH_HOOKS"
HOOKS_PREFIX = "netmesh.hook"


def hooks_stream_config(replicas: int = 1) -> StreamConfig:
    # Each webhook's position and delivery status (controlplane/hooks.py).
    return StreamConfig(
        name=HOOKS_STREAM,
        subjects=[f"{HOOKS_PREFIX}.>"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        allow_direct=True,
        description="netmesh webhooks: each hook's position and delivery status",
    )


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """Create the streams with `replicas` copies each (on a JetStream cluster:
    one per broker, up to its size), or raise an existing stream to that many
    (never lowered: a control plane started without --replicas leaves what
    another asked for). Raises what JetStream raises (a cluster smaller than
    `replicas`: `insufficient resources`)."""
    for config in (
        events_stream_config(replicas),
        desired_stream_config(replicas),
        reports_stream_config(replicas),
        hooks_stream_config(replicas),
    ):
        assert config.name is not None
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
            continue
        have = info.config.num_replicas or 1
        if config.name != DESIRED_STREAM:
            # Limits added since the stream was made (changing them is allowed).
            config.num_replicas = max(have, replicas)
            await js.update_stream(config)
        elif have < replicas:
            await js.update_stream(replace(info.config, num_replicas=replicas))
