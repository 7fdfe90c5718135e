"""`netmesh server`: the control plane process, with an embedded NATS unless
given one."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import nats
import nats.errors
import structlog

from controlplane.embedded import EmbeddedNats, NatsServerError
from controlplane.service import ControlPlane
from events.connect import connect_once

log = structlog.get_logger("netmesh.server")


class ControlPlaneFailed(Exception):
    """A part the control plane cannot run without has stopped."""


def split_listen(listen: str) -> tuple[str, int]:
    """ "HOST:PORT" -> (host, port). Raises ValueError with a readable message."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid --listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:4222")
    return host.strip("[]") or "0.0.0.0", int(port)


async def run_server(
    data_dir: Path,
    listen: str,
    nats_url: str | None,
    advertise: str | None,
    ready: asyncio.Event | None = None,
    *,
    snapshots_only: bool = False,
) -> None:
    """Run until SIGINT/SIGTERM (or cancellation); stop everything cleanly."""
    embedded: EmbeddedNats | None = None
    if nats_url is None:
        host, port = split_listen(listen)
        embedded = EmbeddedNats(
            data_dir / "jetstream", host=host, port=port, log_file=data_dir / "nats-server.log"
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        await embedded.start()
        nats_url = embedded.url
        log.info("embedded nats-server started", url=nats_url, pid=embedded.pid)
    else:
        # nats-py would retry a dead URL forever, deaf to signals: ask once first.
        try:
            probe = await connect_once(nats_url, timeout=5)
        except (OSError, nats.errors.Error, TimeoutError):
            raise NatsServerError(f"cannot connect to {nats_url}: nothing answers there") from None
        await probe.close()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = None
    control_plane = None
    try:
        nc = await nats.connect(nats_url, name="netmesh-controlplane", max_reconnect_attempts=-1)
        control_plane = ControlPlane(
            nc, data_dir, advertise or nats_url, snapshots_only=snapshots_only
        )
        await control_plane.start()
        if ready is not None:
            ready.set()
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(control_plane.failed.wait())
        await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        failed.cancel()
        if control_plane.failed.is_set():
            # Exit non-zero so that a supervisor (systemd) restarts us.
            raise ControlPlaneFailed(control_plane.failure or "failed")
        log.info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if control_plane is not None:
            await control_plane.stop()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.drain()
        if embedded is not None:
            await embedded.stop()
            log.info("embedded nats-server stopped")
