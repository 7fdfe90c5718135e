"""Read-your-writes across control-plane replicas.

Each replica answers queries from its own read model, which follows the stream
a little behind the replica that made a change. So the CLI remembers the stream
sequence of the last change it saw applied (per server, in a small file), and
its queries ask the replica that answers to have applied that event first
(`min_seq`): `netmesh network create x && netmesh network list` shows x,
whichever replica answers each. A replica whose stream is shorter than the
remembered sequence (another stream behind the same URL) just answers.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

# Servers remembered at most (the most recent are kept).
KEEP = 32


def default_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "netmesh" / "last-write.json"


def _key(server: str) -> str:
    return ",".join(sorted(u.strip() for u in server.split(",") if u.strip()))


class LastWrite:
    """The file, or nothing (`path` None: in-process callers, tests)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path

    def _read(self) -> dict[str, int]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}

    def seq(self, server: str) -> int | None:
        return self._read().get(_key(server))

    def saw(self, server: str, seq: int) -> None:
        """Remember `seq` (if later than what is remembered). Best effort: a
        CLI that cannot write its state still works, without the guarantee."""
        if self.path is None:
            return
        known = self._read()
        key = _key(server)
        if known.get(key, 0) >= seq:
            return
        known.pop(key, None)
        known[key] = seq
        kept = dict(list(known.items())[-KEEP:])
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(kept))
            tmp.replace(self.path)


# What `netmesh` (cli.main) uses; off for other callers of cli.client.
remembered = LastWrite()
