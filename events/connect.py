"""NATS connections for callers that want one answer, not a retry loop.

nats-py retries a failed first connect forever when `max_reconnect_attempts`
is 0 (only values > 0 bound it) and logs a traceback per attempt; the CLI,
enrollment and readiness checks want "connected" or a one-line reason, quickly.
"""

from __future__ import annotations

import contextlib
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client


async def _silent(exc: Exception) -> None:
    """The caller reports the failure itself, once."""


def refused_by_broker(exc: BaseException) -> bool:
    """The broker turned our credentials away (nats-py raises a plain Error with
    the server's text on first connect, AuthorizationError later)."""
    return isinstance(exc, nats.errors.AuthorizationError) or (
        "authorization violation" in str(exc).lower()
    )


async def connect_once(url: str, *, timeout: float = 3.0, **options: Any) -> Client:
    """Connect or raise (OSError, nats.errors.Error, TimeoutError), without retrying."""
    options.setdefault("error_cb", _silent)
    nc = Client()
    try:
        # nats-py's annotations say int; its timeouts take seconds as floats.
        await nc.connect(
            url,
            **{
                "connect_timeout": timeout,
                "allow_reconnect": False,
                "max_reconnect_attempts": 1,
                "reconnect_time_wait": 0.05,
                **options,
            },
        )
    except BaseException:
        # nats-py leaves the socket of a refused connection open (an
        # "Authorization Violation" on first connect): close it here.
        transport = getattr(nc, "_transport", None)
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()
                await transport.wait_closed()
        raise
    return nc


async def server_has_seen_everything(nc: Client, timeout: float = 5.0) -> None:
    """Return once the server has processed everything sent on `nc` so far
    (subscriptions included).

    `Client.flush()` is not enough in nats-py 2.16: it writes its PING straight
    to the socket, ahead of protocol still queued for the flusher, so the PONG
    can come back before our SUBs reach the server (seen here: a request sent
    right after "ready" met "no responders"). A message sent to ourselves goes
    through the same queue, after the SUBs, so its arrival proves they landed.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(inbox, b"")
        await sub.next_msg(timeout=timeout)
    finally:
        # With the message in, max_msgs has already removed the subscription.
        with contextlib.suppress(nats.errors.BadSubscriptionError):
            await sub.unsubscribe()
