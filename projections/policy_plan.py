"""What putting a policy in force in a network would change, host by host:
the peers each member gains and loses and the firewall entries that change
(`netmesh policy set --plan`).

Pure, from the topology alone: a view is what the peers and firewall sections
derive for a member of one network, under an `AccessIndex` (a policy), or, with
none, under today's allow-all (every other member a peer, one entry letting
the network's whole range in). The plan is the difference of two views; a
member nothing changes for is left out. Changes print themselves, so what is
shown is what was computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from events.policy import ALL_TRAFFIC
from projections.access import AccessIndex, Member, canonical_ports, host_cidr

Firewall = dict[str, tuple[str, ...]]  # source CIDR -> canonical ports


@dataclass(frozen=True)
class View:
    peers: frozenset[str]  # node ids
    firewall: Firewall


def view_of(
    node_id: str, members: Mapping[str, Member], cidr: str, access: AccessIndex | None
) -> View:
    """What member `node_id` sees and lets in; `access` None: allow-all."""
    if access is None:
        others = frozenset(n for n in members if n != node_id)
        return View(others, {cidr: canonical_ports(ALL_TRAFFIC)})
    firewall = {
        source: canonical_ports(ports)
        for source, ports in access.firewall(node_id).items()
        if ports
    }
    return View(frozenset(access.visible(node_id)), firewall)


@dataclass(frozen=True, order=True)
class FirewallChange:
    source: str  # a source CIDR
    before: tuple[str, ...]  # its ports before; () when there was no entry
    after: tuple[str, ...]  # and after; () when there is none
    member: str = ""  # the member whose address the source is, if any

    @property
    def kind(self) -> str:
        if not self.before:
            return "gained"
        return "lost" if not self.after else "changed"

    def __str__(self) -> str:
        who = f" ({self.member})" if self.member else ""
        match self.kind:
            case "gained":
                return f"+ allow from {self.source}{who}: {', '.join(self.after)}"
            case "lost":
                return f"- allow from {self.source}{who}: {', '.join(self.before)}"
        return (
            f"~ allow from {self.source}{who}: {', '.join(self.before)} -> {', '.join(self.after)}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "member": self.member or None,
            "change": self.kind,
            "before": list(self.before),
            "after": list(self.after),
        }


@dataclass(frozen=True)
class HostPlan:
    """What one member's host would see change (in this network)."""

    name: str
    gains: tuple[str, ...]  # names of the peers it gains
    loses: tuple[str, ...]
    firewall: tuple[FirewallChange, ...]

    def __str__(self) -> str:
        lines = [f"{self.name}:"]
        lines += [f"  + peer {name}" for name in self.gains]
        lines += [f"  - peer {name}" for name in self.loses]
        lines += [f"  {change}" for change in self.firewall]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.name,
            "gains_peers": list(self.gains),
            "loses_peers": list(self.loses),
            "firewall": [c.to_json() for c in self.firewall],
        }


def firewall_changes(
    before: Firewall, after: Firewall, names: Mapping[str, str]
) -> tuple[FirewallChange, ...]:
    """The entries that differ; `names`: source CIDR -> member name."""
    return tuple(
        FirewallChange(source, before.get(source, ()), after.get(source, ()), names.get(source, ""))
        for source in sorted(before.keys() | after.keys())
        if before.get(source, ()) != after.get(source, ())
    )


def plan_policy(
    members: Mapping[str, Member],
    cidr: str,
    before: AccessIndex | None,
    after: AccessIndex | None,
) -> list[HostPlan]:
    """Per member (node id -> Member) of a network with range `cidr`, what
    going from `before` to `after` changes (None: allow-all), by name; members
    with no change are left out."""
    names = {node_id: member.name for node_id, member in members.items()}
    by_source = {host_cidr(member.address): member.name for member in members.values()}
    plans = []
    for node_id in sorted(members, key=lambda n: (names[n], n)):
        old = view_of(node_id, members, cidr, before)
        new = view_of(node_id, members, cidr, after)
        plan = HostPlan(
            name=names[node_id],
            gains=tuple(sorted(names[n] for n in new.peers - old.peers)),
            loses=tuple(sorted(names[n] for n in old.peers - new.peers)),
            firewall=firewall_changes(old.firewall, new.firewall, by_source),
        )
        if plan.gains or plan.loses or plan.firewall:
            plans.append(plan)
    return plans
