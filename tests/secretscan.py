"""Where a secret must never be: every message of the streams (payloads and
headers), the read model's files, and what was logged."""

from __future__ import annotations

from pathlib import Path

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from events.subjects import DESIRED_STREAM, EVENTS_STREAM, REPORTS_STREAM


async def haystacks(nc: Client, data_dir: Path, logs: str) -> dict[str, bytes]:
    """Where to look: each stream message, each read-model file of the
    control plane whose data dir is `data_dir`, and `logs`."""
    found: dict[str, bytes] = {}
    js = nc.jetstream()
    for stream in (EVENTS_STREAM, DESIRED_STREAM, REPORTS_STREAM):
        last = (await js.stream_info(stream)).state.last_seq
        for seq in range(1, last + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:  # rolled up or replaced
                continue
            found[f"{stream} #{seq}"] = (msg.data or b"") + repr(msg.headers).encode()
    for path in data_dir.glob("readmodel.sqlite3*"):
        found[path.name] = path.read_bytes()
    found["logs"] = logs.encode()
    return found


def assert_nowhere(found: dict[str, bytes], needles: dict[str, str]) -> None:
    for where, data in found.items():
        for what, needle in needles.items():
            assert needle.encode() not in data, f"{what} found in {where}"
