"""NATS connections for callers that want one answer, not a retry loop.

nats-py retries a failed first connect forever when `max_reconnect_attempts`
is 0 (only values > 0 bound it) and logs a traceback per attempt; the CLI,
enrollment and readiness checks want "connected" or a one-line reason, quickly.
"""

from __future__ import annotations

from typing import Any

import nats
from nats.aio.client import Client


async def _silent(exc: Exception) -> None:
    """The caller reports the failure itself, once."""


async def connect_once(url: str, *, timeout: float = 3.0, **options: Any) -> Client:
    """Connect or raise (OSError, nats.errors.Error, TimeoutError), without retrying."""
    return await nats.connect(
        url,
        connect_timeout=timeout,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.05,
        error_cb=_silent,
        **options,
    )
