"""Time travel: the topology as of any point of the log, and what changed
between two points (pure; `controlplane.timetravel` reads the stream and
answers the queries).

The past is computed the one way the present is: the stream's events, from
the first, through the projection's own fold (`projections.desired.fold`,
which is `evolve` plus the desired-state revisions the read model keeps).
There is no second read model: a past topology is written into a SQLite read
model of its own by the same `ReadModel.commit`, and asked the same queries.
"""

from __future__ import annotations

from typing import Any

import msgspec

from events.envelope import RecordedEvent
from events.logfilter import Point
from projections.desired import fold
from projections.topology import Topology, Touched


class Replay:
    """Feed it the log in order until `feed` says the point is passed."""

    def __init__(self, point: Point) -> None:
        self.point = point
        self.topology = Topology()
        self.seq = 0  # the last event folded in
        self.time: float | None = None  # its time

    def feed(self, recorded: RecordedEvent) -> bool:
        """Fold the event in if it is at or before the point; False (and
        nothing folded) once past it."""
        point = self.point
        if point.seq is not None and recorded.seq > point.seq:
            return False
        if point.time is not None and recorded.envelope.time > point.time:
            return False
        fold(self.topology, recorded)
        self.seq = recorded.seq
        self.time = recorded.envelope.time
        return True

    def when(self) -> float:
        """The time the past is seen at (what `expired` means then): the
        point's time, or that of its last event."""
        if self.point.time is not None:
            return self.point.time
        return self.time if self.time is not None else 0.0


def replayed(events: list[RecordedEvent], point: Point) -> Replay:
    replay = Replay(point)
    for recorded in events:
        if not replay.feed(recorded):
            break
    return replay


def everything(topology: Topology) -> Touched:
    """Every row of the topology, as touched: what a fresh read model of it writes."""
    return Touched(
        networks=frozenset(topology.networks),
        keys=frozenset(topology.keys) | frozenset(topology.retired_keys),
        hosts=frozenset(topology.hosts),
        nodes=frozenset(topology.nodes),
    )


# -- what changed between two points ------------------------------------------


class Change(msgspec.Struct, frozen=True, kw_only=True):
    """One thing that differs between two topologies; prints itself."""

    kind: str  # network | policy | key | node | host | admin | hook
    name: str  # how the user names it: office, office/web1, a key id, a host name
    change: str  # added | removed | changed
    # added: its fields; removed: its last fields; changed: field -> [before, after].
    fields: dict[str, Any] = {}

    def __str__(self) -> str:
        mark = {"added": "+", "removed": "-", "changed": "~"}[self.change]
        if self.change == "changed":
            what = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in self.fields.items())
        else:
            what = " ".join(f"{k}={_short(v)}" for k, v in self.fields.items())
        return f"{mark} {self.kind} {self.name}" + (f": {what}" if what else "")


def _short(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "none"
    text = "none" if value is None else str(value)
    first = text.strip().splitlines()[0] if text.strip() else '""'
    return first if len(first) <= 60 and "\n" not in text.strip() else f"{first[:57]}..."


# kind -> identity -> (name shown, fields compared)
View = dict[str, dict[str, tuple[str, dict[str, Any]]]]


def view_of(topology: Topology) -> View:
    """What a diff compares: each thing's user-visible fields, as plain values."""
    hosts = topology.hosts
    return {
        "network": {
            n.name: (
                n.name,
                {
                    "cidr": n.cidr,
                    "listen_port": n.listen_port,
                    "mtu": n.mtu,
                    "keepalive": n.keepalive,
                },
            )
            for n in topology.networks.values()
        },
        "policy": {
            n.name: (n.name, {"document": n.policy_text, "revision": n.policy_seq})
            for n in topology.networks.values()
            if n.policy_text
        },
        "key": {
            k.key_id: (
                k.key_id,
                {
                    "network": k.network,
                    "uses": k.uses,
                    "used": k.used,
                    "revoked": k.revoked,
                    "expires_at": k.expires_at,
                    "tags": sorted(k.tags),
                },
            )
            for k in topology.keys.values()
        },
        "node": {
            n.node_id: (
                f"{n.network}/{n.name}",
                {"address": n.address, "tags": sorted(n.tags), "host_id": n.host_id},
            )
            for n in topology.nodes.values()
        },
        "host": {
            h.host_id: (
                h.name,
                {
                    "public_key": h.public_key,
                    "endpoints": list(h.endpoints),
                    "listen_port": h.listen_port,
                    "key_epoch": h.key_epoch,
                },
            )
            for h in hosts.values()
        },
        "admin": {
            a.name: (a.name, {"role": a.role, "networks": list(a.networks), "key": a.public_key})
            for a in topology.admins.values()
        },
        "hook": {
            h.hook_id: (h.hook_id, {"url": h.url, "events": h.events})
            for h in topology.hooks.values()
        },
    }


KINDS = ("network", "policy", "key", "host", "node", "admin", "hook")


def diff(before: View, after: View) -> list[Change]:
    """What changed from `before` to `after`: by kind, then by name; empty
    when nothing did."""
    changes: list[Change] = []
    for kind in KINDS:
        old, new = before.get(kind, {}), after.get(kind, {})
        found: list[Change] = []
        for ident in old.keys() - new.keys():
            name, fields = old[ident]
            found.append(Change(kind=kind, name=name, change="removed", fields=fields))
        for ident in new.keys() - old.keys():
            name, fields = new[ident]
            found.append(Change(kind=kind, name=name, change="added", fields=fields))
        for ident in old.keys() & new.keys():
            (_, was), (name, now) = old[ident], new[ident]
            moved = {k: [was.get(k), v] for k, v in now.items() if was.get(k) != v}
            if moved:
                found.append(Change(kind=kind, name=name, change="changed", fields=moved))
        changes.extend(sorted(found, key=lambda c: (c.name, c.change)))
    return changes
