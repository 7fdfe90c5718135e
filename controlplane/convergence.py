"""Has a change reached the hosts? (`--wait`, `status --wait`; query
`netmesh.query.convergence`.)

A command's events are one atomic batch, seqs FIRST..LAST. A host's desired
revision is the last event that changed its desired state, so the hosts the
command changed are those whose revision is now at least FIRST; each has
applied it once its agent reports a revision at least min(its revision, LAST)
(a later change may have moved it since: an agent reports only revisions it
was sent, so reaching the later one implies the command's). Without a command,
every host in a network must have applied its current revision.

A host that has not is *offline* (no agent reads its desired state now),
in *error* (its agent's last pass failed, and says why) or *behind* (its
agent is there and has not applied it yet).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from events.store import EventStore
from projections.sqlite import ReadModel

# host_id -> its latest applied report (as JSON-able data), None if it never reported.
AppliedLookup = Callable[[str], Awaitable[dict[str, Any] | None]]

APPLIED, OFFLINE, ERROR, BEHIND = "applied", "offline", "error", "behind"


class HostProgress(msgspec.Struct, frozen=True, kw_only=True):
    host_id: str
    name: str
    nodes: list[str]  # NETWORK/NAME of each of its nodes
    target: int  # the revision it must report
    applied: int | None  # the revision it reported last (None: never)
    state: str  # applied | offline | error | behind
    why: str = ""

    def __str__(self) -> str:
        return f"{self.name} ({self.state}: {self.why})" if self.why else self.name


def progress_of(
    host_id: str,
    name: str,
    nodes: list[str],
    target: int,
    report: dict[str, Any] | None,
    connected: bool,
) -> HostProgress:
    """Where one host stands (pure)."""
    applied = report.get("revision") if report else None

    def at(state: str, why: str = "") -> HostProgress:
        return HostProgress(
            host_id=host_id,
            name=name,
            nodes=nodes,
            target=target,
            applied=applied,
            state=state,
            why=why,
        )

    if applied is not None and applied >= target:
        return at(APPLIED)
    behind = f"applied #{applied}, wants #{target}" if applied is not None else "never reported"
    if not connected:
        return at(OFFLINE, f"no agent connected; {behind}")
    if report is not None and report.get("error"):
        return at(ERROR, str(report["error"]))
    return at(BEHIND, behind)


class Convergence:
    def __init__(
        self,
        store: EventStore,
        model: Callable[[], ReadModel | None],
        caught_up: Callable[[int, float], Awaitable[Any]],
        connected: Callable[[], Awaitable[set[str]]],
        applied: AppliedLookup,
    ) -> None:
        self._store = store
        self._model = model
        self._caught_up = caught_up
        self._connected = connected
        self._applied = applied
        self._first: OrderedDict[str, int] = OrderedDict()  # command id -> its first seq

    async def answer(self, seq: int | None, command_id: str | None) -> dict[str, Any]:
        """Where each host the command that ended at `seq` changed stands
        (None: every host in a network)."""
        if seq is not None:
            await self._caught_up(seq, 10.0)  # the read model has the command
        model = self._model()
        assert model is not None
        async with model.db.execute(
            "SELECT h.host_id, h.name,"
            " MAX(h.revision, COALESCE(MAX(n.revision), 0)) AS revision,"
            " json_group_array(d.network || '/' || d.name) FILTER (WHERE d.node_id IS NOT NULL)"
            " AS nodes"
            " FROM hosts h LEFT JOIN nodes d ON d.host_id = h.host_id"
            " LEFT JOIN networks n ON n.name = d.network GROUP BY h.host_id ORDER BY h.name"
        ) as cur:
            rows = [dict(r) for r in await cur.fetchall()]
        first = None
        if seq is None:
            targets = {r["host_id"]: int(r["revision"]) for r in rows if r["nodes"] != "[]"}
        else:
            first = await self.first_seq(seq, command_id)
            targets = {
                r["host_id"]: min(int(r["revision"]), seq) for r in rows if r["revision"] >= first
            }
        connected = await self._connected() if targets else set()
        hosts = [
            progress_of(
                r["host_id"],
                r["name"],
                sorted(msgspec.json.decode(r["nodes"])),
                targets[r["host_id"]],
                await self._applied(r["host_id"]),
                r["host_id"] in connected,
            )
            for r in rows
            if r["host_id"] in targets
        ]
        return {
            "first": first,
            "seq": seq,
            "converged": all(h.state == APPLIED for h in hosts),
            "hosts": msgspec.to_builtins(hosts),
        }

    async def first_seq(self, seq: int, command_id: str | None) -> int:
        """The first event of the command whose last one is `seq` (its batch
        is consecutive); `seq` itself without a command id."""
        if not command_id:
            return seq
        known = self._first.get(command_id)
        if known is not None:
            return known
        first = seq
        while first > 1:
            before = await self._store.read(first - 1)
            if before is None or before.envelope.command_id != command_id:
                break
            first -= 1
        self._first[command_id] = first
        if len(self._first) > 1024:
            self._first.popitem(last=False)
        return first
