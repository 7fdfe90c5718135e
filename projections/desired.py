"""Where a host's desired state comes from, and what to send when it moves.

A host is in one or more networks (one node each) and has one WireGuard
interface. Its desired state is a set of sections (`projections.sections`),
each built by its own pure builder from the topology.

`fold` applies an event and asks each section's rule whose entries it changed;
`desired_for` derives a whole state (a snapshot); `DesiredChanges` collects
what a batch of events touched and `messages` turns it into one snapshot or
delta per host whose revision moved. A change costs work and bytes in
proportion to the entries it changes: a host joining a network of N gives N-1
one-peer deltas and one snapshot. Pure: the same topology gives the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from events.desired import DesiredDelta, DesiredMessage, DesiredState, sections_of
from events.envelope import RecordedEvent
from projections.sections import SECTIONS, Reread, SectionRule, peer_endpoint
from projections.topology import Topology, Touched, evolve

__all__ = ["Builders", "DesiredChanges", "desired_for", "fold", "messages", "peer_endpoint"]


def fold(topology: Topology, recorded: RecordedEvent) -> Touched:
    """`evolve`, plus the sections' rereads, with the revisions of every host
    whose desired state the event changed moved to it."""
    touched = evolve(topology, recorded)
    if not touched.believed:
        return touched
    event = recorded.event
    rules = _RULES_BY_EVENT.get(type(event))
    if rules is None:
        rules = _RULES_BY_EVENT[type(event)] = tuple(
            rule for rule in SECTIONS if isinstance(event, rule.reacts_to)
        )
    if not rules and not touched.reconfigured:
        return touched
    if len(rules) == 1:
        rereads = tuple(rules[0].rereads(topology, event))
    else:
        found: list[Reread] = []
        for rule in rules:
            found.extend(rule.rereads(topology, event))
        rereads = tuple(found)
    # Unions only where both sides have members: a replay runs this per event.
    hosts = touched.reconfigured
    networks: frozenset[str] = _NONE
    for reread in rereads:
        if reread.hosts:
            hosts = hosts | reread.hosts if hosts else reread.hosts
        if reread.networks:
            networks = networks | reread.networks if networks else reread.networks
    topology.mark_changed(hosts, networks, recorded.seq)
    return Touched(
        networks=touched.networks | networks if touched.networks else networks,
        keys=touched.keys,
        hosts=touched.hosts | hosts if touched.hosts else hosts,
        nodes=touched.nodes,
        reconfigured=touched.reconfigured,
        rereads=rereads,
    )


_NONE: frozenset[str] = frozenset()


# Event type -> the section rules that react to it (most events concern few).
_RULES_BY_EVENT: dict[type, tuple[type[SectionRule], ...]] = {}


class Builders:
    """One builder per section for one batch of events (they cache within it)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.by_name: dict[str, SectionRule] = {rule.name: rule(topology) for rule in SECTIONS}

    def state(self, host_id: str, revision: int | None = None) -> DesiredState | None:
        """The whole state of `host_id`; None for an unknown host."""
        if host_id not in self.topology.hosts:
            return None
        return DesiredState(
            host_id=host_id,
            revision=self.topology.revision_of(host_id) if revision is None else revision,
            sections=sections_of(
                {name: builder.entries(host_id) for name, builder in self.by_name.items()}
            ),
        )


def desired_for(
    topology: Topology, host_id: str, revision: int | None = None, builders: Builders | None = None
) -> DesiredState | None:
    """The whole state host `host_id` should have; None for an unknown host.

    A host in no network (its last node removed) gets an empty state: no
    addresses, no peers. That is how its agent learns to let go. `revision`
    defaults to the host's revision in the topology.
    """
    return (builders or Builders(topology)).state(host_id, revision)


@dataclass
class _NetworkRereads:
    """Keys of one section every member of one network must re-read, and who
    owns each: a member skips a key only when every reread naming it was
    that member's own (within a batch a key can move from one host to another)."""

    owners: dict[str, set[str]] = field(default_factory=dict)  # key -> owners ("" = none)

    def add(self, keys: frozenset[str], owner: str) -> None:
        for key in keys:
            self.owners.setdefault(key, set()).add(owner)

    def resolve(self) -> tuple[set[str], dict[str, set[str]]]:
        """(every key, host -> the keys only it owns)."""
        exclusive: dict[str, set[str]] = {}
        for key, owners in self.owners.items():
            if len(owners) == 1:
                (owner,) = owners
                if owner:
                    exclusive.setdefault(owner, set()).add(key)
        return set(self.owners), exclusive


@dataclass
class DesiredChanges:
    """What a batch of events did to desired states, accumulated event by event."""

    reconfigured: set[str] = field(default_factory=set)
    # host -> section -> keys it must re-read
    by_host: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    # network -> section -> keys every member must re-read
    by_network: dict[str, dict[str, _NetworkRereads]] = field(default_factory=dict)

    def add(self, touched: Touched) -> None:
        self.reconfigured |= touched.reconfigured
        for reread in touched.rereads:
            self._add(reread)

    def _add(self, reread: Reread) -> None:
        for host_id in reread.hosts:
            by_section = self.by_host.setdefault(host_id, {})
            by_section.setdefault(reread.section, set()).update(reread.keys)
        for network in reread.networks:
            found = self.by_network.setdefault(network, {}).setdefault(
                reread.section, _NetworkRereads()
            )
            found.add(reread.keys, reread.owner)

    def __bool__(self) -> bool:
        return bool(self.reconfigured or self.by_host or self.by_network)

    def candidates(self, topology: Topology) -> dict[str, dict[str, set[str]]]:
        """Hosts that may need a message -> section -> the keys they must re-read."""
        out: dict[str, dict[str, set[str]]] = {h: {} for h in self.reconfigured}
        for host_id, by_section in self.by_host.items():
            mine = out.setdefault(host_id, {})
            for name, keys in by_section.items():
                mine.setdefault(name, set()).update(keys)
        for network, rereads in self.by_network.items():
            resolved = {name: found.resolve() for name, found in rereads.items()}
            for node_id in topology.nodes_by_network.get(network, ()):
                member = topology.nodes[node_id].host_id
                mine = out.setdefault(member, {})
                for name, (keys, exclusive) in resolved.items():
                    own = exclusive.get(member)
                    mine.setdefault(name, set()).update(keys - own if own else keys)
        return out


def messages(
    topology: Topology,
    changes: DesiredChanges,
    published: dict[str, int],
    *,
    snapshots_only: bool = False,
    builders: Builders | None = None,
) -> list[DesiredMessage]:
    """One message per host whose revision moved past `published` (host ->
    revision its subject is at): a snapshot for a new or reconfigured host
    (or for every host with `snapshots_only`, the full-state baseline), a delta
    for the others. Sorted by host."""
    builders = builders or Builders(topology)
    out: list[DesiredMessage] = []
    for host_id, rereads in sorted(changes.candidates(topology).items()):
        if host_id not in topology.hosts:
            continue
        revision = topology.revision_of(host_id)
        base = published.get(host_id)
        if base is not None and base >= revision:
            continue
        if base is None or snapshots_only or host_id in changes.reconfigured:
            state = builders.state(host_id, revision)
            assert state is not None
            out.append(state)
            continue
        upsert: dict[str, dict[str, Any]] = {}
        remove: dict[str, tuple[str, ...]] = {}
        for name, keys in sorted(rereads.items()):
            builder = builders.by_name[name]
            upserted: dict[str, Any] = {}
            removed: list[str] = []
            for key in sorted(keys):
                entry = builder.entry(host_id, key)
                if entry is None:
                    removed.append(key)
                else:
                    upserted[key] = entry
            if upserted:
                upsert[name] = upserted
            if removed:
                remove[name] = tuple(removed)
        out.append(
            DesiredDelta(
                host_id=host_id,
                revision=revision,
                base=base,
                upsert=sections_of(upsert),
                remove=remove,
            )
        )
    return out
