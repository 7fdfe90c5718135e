"""What a decided command would change, host by host, without applying it
(`netmesh <command> --plan`).

Pure: the decision's events are folded into a copy of the topology, exactly
as the projection would fold them (`projections.desired.fold`), and every host
the folds say may have moved is derived before and after (`desired_for`); the
plan is the difference, section by section. Hosts nothing changes for are left
out. The topology given is not touched. Changes print themselves, so what is
shown is what was computed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import msgspec

from events.desired import DesiredState, Sections, section
from events.envelope import RecordedEvent, make_envelope
from events.model import AnyEvent
from projections.desired import Builders, DesiredChanges, fold
from projections.topology import Topology

SECTION_NAMES: tuple[str, ...] = Sections.__struct_fields__


class SectionChange(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One section's entries that would change, by key (entries as JSON)."""

    added: dict[str, Any] = {}
    removed: list[str] = []
    changed: dict[str, tuple[Any, Any]] = {}  # key -> (before, after)

    def lines(self, name: str) -> list[str]:
        out = [f"+ {name} {key}{_brief(entry)}" for key, entry in self.added.items()]
        out += [f"- {name} {key}" for key in self.removed]
        for key, (before, after) in self.changed.items():
            out.append(f"~ {name} {key}: {_difference(before, after)}")
        return out


class HostChange(msgspec.Struct, frozen=True, kw_only=True):
    """What one host's desired state would see change."""

    host_id: str
    name: str
    sections: dict[str, SectionChange]

    def __str__(self) -> str:
        lines = [f"{self.name} ({self.host_id}):"]
        for name, change in self.sections.items():
            lines += [f"  {line}" for line in change.lines(name)]
        return "\n".join(lines)


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return "-" if value is None else str(value)


def _brief(entry: Any) -> str:
    if isinstance(entry, dict) and entry:
        return ": " + ", ".join(f"{k} {_value(v)}" for k, v in entry.items())
    return ""


def _difference(before: Any, after: Any) -> str:
    if isinstance(before, dict) and isinstance(after, dict):
        return "; ".join(
            f"{k} {_value(before.get(k))} -> {_value(after.get(k))}"
            for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k)
        )
    return f"{_value(before)} -> {_value(after)}"


def section_change(before: dict[str, Any], after: dict[str, Any]) -> SectionChange | None:
    """The difference of two sections' entries (key -> struct); None when equal."""
    if before == after:
        return None
    added = {k: msgspec.to_builtins(after[k]) for k in sorted(after.keys() - before.keys())}
    removed = sorted(before.keys() - after.keys())
    changed = {
        k: (msgspec.to_builtins(before[k]), msgspec.to_builtins(after[k]))
        for k in sorted(before.keys() & after.keys())
        if before[k] != after[k]
    }
    if not (added or removed or changed):
        return None
    return SectionChange(added=added, removed=removed, changed=changed)


def state_change(
    host_id: str, name: str, before: DesiredState | None, after: DesiredState | None
) -> HostChange | None:
    """Two desired states of one host compared section by section (a host
    unknown on one side counts as having no entries); None when nothing differs.
    Revisions are not compared: every change moves them."""
    empty = Sections()
    old = before.sections if before is not None else empty
    new = after.sections if after is not None else empty
    sections = {}
    for name_ in SECTION_NAMES:
        change = section_change(section(old, name_), section(new, name_))
        if change is not None:
            sections[name_] = change
    return HostChange(host_id=host_id, name=name, sections=sections) if sections else None


def host_changes(
    before: Topology, after: Topology, candidates: dict[str, dict[str, set[str]]], whole: set[str]
) -> list[HostChange]:
    """Of the `candidates` (host -> section -> keys it must re-read, as
    `DesiredChanges.candidates` names them), those whose desired state differs
    between the two topologies, and how; sorted by name, then id. A host in
    `whole` (its memberships changed), or known on one side only, is compared
    whole; another only on the keys it must re-read, as its delta would be."""
    old, new = Builders(before), Builders(after)
    out = []
    for host_id, rereads in candidates.items():
        host = after.hosts.get(host_id) or before.hosts.get(host_id)
        name = host.name if host is not None else host_id
        if host_id in whole or host_id not in before.hosts or host_id not in after.hosts:
            change = state_change(host_id, name, old.state(host_id), new.state(host_id))
        else:
            change = _keyed_change(host_id, name, old, new, rereads)
        if change is not None:
            out.append(change)
    return sorted(out, key=lambda c: (c.name, c.host_id))


def _keyed_change(
    host_id: str, name: str, old: Builders, new: Builders, rereads: dict[str, set[str]]
) -> HostChange | None:
    sections = {}
    for section_name in SECTION_NAMES:
        keys = rereads.get(section_name)
        if not keys:
            continue
        before, after = old.by_name[section_name], new.by_name[section_name]
        was = {k: e for k in keys if (e := before.entry(host_id, k)) is not None}
        now = {k: e for k in keys if (e := after.entry(host_id, k)) is not None}
        change = section_change(was, now)
        if change is not None:
            sections[section_name] = change
    return HostChange(host_id=host_id, name=name, sections=sections) if sections else None


def plan_events(
    topology: Topology,
    events: Sequence[tuple[str, AnyEvent]],
    *,
    now: float,
    actor: str = "plan",
) -> list[HostChange]:
    """What appending `events` (subject, event), as one command's, would
    change per host. `topology` is left as it was."""
    if not events:
        return []
    after = copy.deepcopy(topology)
    changes = DesiredChanges()
    for offset, (subject, event) in enumerate(events, start=1):
        envelope = make_envelope(
            event, event_id=f"plan-{offset}", time=now, actor=actor, command_id=""
        )
        # "valid": the events are the control plane's own, as it would sign them.
        recorded = RecordedEvent(
            seq=topology.last_seq + offset, subject=subject, envelope=envelope, signature="valid"
        )
        changes.add(fold(after, recorded))
    candidates = changes.candidates(after)
    # A member before only (its network deleted) is reconfigured, whole.
    for host_id in changes.candidates(topology).keys() - candidates.keys():
        candidates[host_id] = {}
        changes.reconfigured.add(host_id)
    return host_changes(topology, after, candidates, changes.reconfigured)
