"""Who may reach whom under a network's policy: the pure evaluation that the
peers and firewall sections, `policy explain` and a policy's `tests` share.

A member is a node as the policy sees it: its name, its overlay address and
its tags. Rules are directional: `allowed(policy, a, b)` is what `a` may open
towards `b` (replies to an allowed connection pass; the firewall is stateful).
Two members see each other as peers when either may reach the other.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from events.policy import (
    Everyone,
    InRange,
    Named,
    Policy,
    Ports,
    Rule,
    Selector,
    Tagged,
    covered,
    parse_ports,
)


@dataclass(frozen=True)
class Member:
    name: str
    address: str  # overlay address, no prefix
    tags: frozenset[str] = frozenset()


def matches(selector: Selector, member: Member) -> bool:
    match selector:
        case Everyone():
            return True
        case Tagged(tag=tag):
            return tag in member.tags
        case Named(name=name):
            return name == member.name
        case InRange(cidr=cidr):
            return ipaddress.ip_address(member.address) in cidr
    return False  # pragma: no cover - every selector kind is matched above


def rules_between(policy: Policy, source: Member, destination: Member) -> list[Rule]:
    """The rules that let `source` open connections to `destination`."""
    return [
        rule
        for rule in policy.rules
        if any(matches(s, source) for s in rule.sources)
        and any(matches(d, destination) for d in rule.destinations)
    ]


def allowed(policy: Policy, source: Member, destination: Member) -> tuple[Ports, ...]:
    """What `source` may open towards `destination` (empty: nothing)."""
    return tuple(
        sorted({p for rule in rules_between(policy, source, destination) for p in rule.ports})
    )


def may_see(policy: Policy, a: Member, b: Member) -> bool:
    """Whether `a` and `b` are each other's peers: either may reach the other."""
    return bool(rules_between(policy, a, b) or rules_between(policy, b, a))


@dataclass(frozen=True)
class Verdict:
    """What a policy says of one kind of traffic from one member to another:
    `allowed` when the rules' ports hold all of it, `partly` when they hold
    some of it (a range of which some ports are allowed); `rules` the rules
    whose ports overlap it, in document order."""

    allowed: bool
    partly: bool
    rules: tuple[Rule, ...]

    @property
    def denied(self) -> bool:
        """Nothing of it is allowed."""
        return not self.allowed and not self.partly


def verdict(policy: Policy, source: Member, destination: Member, port: Ports) -> Verdict:
    between = rules_between(policy, source, destination)
    overlapping = tuple(r for r in between if any(p.overlaps(port) for p in r.ports))
    whole = covered(port, [p for r in overlapping for p in r.ports])
    return Verdict(whole, bool(overlapping) and not whole, overlapping)


def explain(
    policy: Policy, source: Member, destination: Member, port: Ports
) -> tuple[bool, Rule | None]:
    """Whether `source` may open all of `port` towards `destination`, and the
    first rule that allows some of it (None when it is denied)."""
    found = verdict(policy, source, destination, port)
    return found.allowed, found.rules[0] if found.allowed else None


def failing_tests(policy: Policy, members: Mapping[str, Member]) -> list[str]:
    """One line per `tests` entry the policy does not pass (by node name)."""
    failures = []
    for index, test in enumerate(policy.document.tests, 1):
        source, destination = members.get(test.from_), members.get(test.to)
        missing = [n for n, m in ((test.from_, source), (test.to, destination)) if m is None]
        if missing:
            failures.append(f"test {index}: no node named {', '.join(map(repr, missing))}")
            continue
        assert source is not None and destination is not None
        for text in test.accept:
            found = verdict(policy, source, destination, parse_ports(text))
            if not found.allowed:
                what = "only partly allowed" if found.partly else "denied"
                failures.append(f"test {index}: {test.from_} -> {test.to} {text} is {what}")
        for text in test.deny:
            found = verdict(policy, source, destination, parse_ports(text))
            if not found.denied:
                what = "allowed" if found.allowed else "partly allowed"
                failures.append(
                    f"test {index}: {test.from_} -> {test.to} {text} is {what} by {found.rules[0]}"
                )
    return failures


def unknown_references(policy: Policy, members: Iterable[Member]) -> list[str]:
    """Warnings: tags no member carries and node names no member has (the
    policy may be set before they join, so these do not refuse it)."""
    members = list(members)
    tags = {t for m in members for t in m.tags}
    names = {m.name for m in members}
    seen: set[str] = set()
    warnings = []
    for rule in policy.rules:
        for selector in (*rule.sources, *rule.destinations):
            text = str(selector)
            if text in seen:
                continue
            seen.add(text)
            if isinstance(selector, Tagged) and selector.tag not in tags:
                warnings.append(f"rule {rule.index}: no node has tag {selector.tag!r} yet")
            elif isinstance(selector, Named) and selector.name not in names:
                warnings.append(f"rule {rule.index}: no node named {selector.name!r} yet")
    return warnings


# -- the index a network keeps while it has a policy ------------------------------


def host_cidr(address: str) -> str:
    """A member's overlay address as a firewall key: "10.10.0.5/32", "fd00::5/128"."""
    return f"{address}/128" if ":" in address else f"{address}/32"


class AccessIndex:
    """Which members each rule of one network's policy matches, kept up to date
    as members join, leave and change tags.

    With it, what a change does is found in time proportional to the members
    it concerns: a join is matched against the rules that name its tags, its
    name, `*` or a range holding its address (not against every rule), and who
    sees a member is the union of the members of its rules (not a scan of the
    network). Members are node ids; `evolve` keeps the index, the sections and
    their rereads read it.
    """

    def __init__(self, policy: Policy, members: Iterable[tuple[str, Member]] = ()) -> None:
        self.policy = policy
        self.members: dict[str, Member] = {}
        self.by_tag: dict[str, set[str]] = {}
        self.by_name: dict[str, set[str]] = {}
        self.by_address: dict[str, str] = {}  # firewall key (address/32) -> member
        # The member the last `remove` took out, with the rules it was in
        # (what its departure changed, read once by the sections' rules).
        self.last_removed: tuple[str, Member, frozenset[int], frozenset[int]] | None = None
        count = len(policy.rules)
        self.sources: list[set[str]] = [set() for _ in range(count)]
        self.destinations: list[set[str]] = [set() for _ in range(count)]
        self.as_source: dict[str, set[int]] = {}
        self.as_destination: dict[str, set[int]] = {}
        # Selector -> (rules naming it as a source, as a destination).
        self._rules_of: dict[Selector, tuple[set[int], set[int]]] = {}
        for position, rule in enumerate(policy.rules):
            for selector in rule.sources:
                self._rules_of.setdefault(selector, (set(), set()))[0].add(position)
            for selector in rule.destinations:
                self._rules_of.setdefault(selector, (set(), set()))[1].add(position)
        self._ranges = [s for s in self._rules_of if isinstance(s, InRange)]
        # Rule position -> the ranges among its sources (firewall keys of their own).
        self.source_ranges: list[tuple[str, ...]] = [
            tuple(str(s) for s in rule.sources if isinstance(s, InRange)) for rule in policy.rules
        ]
        for node_id, member in members:
            self.add(node_id, member)

    # -- keeping it up to date

    def add(self, node_id: str, member: Member) -> None:
        self.members[node_id] = member
        for tag in member.tags:
            self.by_tag.setdefault(tag, set()).add(node_id)
        self.by_name.setdefault(member.name, set()).add(node_id)
        self.by_address[host_cidr(member.address)] = node_id
        as_source, as_destination = self._rules_matching(member)
        self.as_source[node_id] = as_source
        self.as_destination[node_id] = as_destination
        for position in as_source:
            self.sources[position].add(node_id)
        for position in as_destination:
            self.destinations[position].add(node_id)

    def remove(self, node_id: str) -> Member | None:
        member = self.members.pop(node_id, None)
        if member is None:
            return None
        for tag in member.tags:
            self.by_tag.get(tag, set()).discard(node_id)
        self.by_name.get(member.name, set()).discard(node_id)
        self.by_address.pop(host_cidr(member.address), None)
        as_source = self.as_source.pop(node_id, set())
        as_destination = self.as_destination.pop(node_id, set())
        for position in as_source:
            self.sources[position].discard(node_id)
        for position in as_destination:
            self.destinations[position].discard(node_id)
        self.last_removed = (node_id, member, frozenset(as_source), frozenset(as_destination))
        return member

    def retag(self, node_id: str, tags: frozenset[str]) -> None:
        member = self.members.get(node_id)
        if member is not None:
            self.remove(node_id)
            self.last_removed = None
            self.add(node_id, Member(member.name, member.address, tags))

    def rules_naming(self, tags: Iterable[str]) -> tuple[set[int], set[int]]:
        """(rules naming any of `tags` among their sources, among their destinations)."""
        sources: set[int] = set()
        destinations: set[int] = set()
        for tag in tags:
            found = self._rules_of.get(Tagged(tag))
            if found is not None:
                sources |= found[0]
                destinations |= found[1]
        return sources, destinations

    def _rules_matching(self, member: Member) -> tuple[set[int], set[int]]:
        selectors: list[Selector] = [Everyone(), Named(member.name)]
        selectors.extend(Tagged(tag) for tag in member.tags)
        if self._ranges:
            address = ipaddress.ip_address(member.address)
            selectors.extend(s for s in self._ranges if address in s.cidr)
        as_source: set[int] = set()
        as_destination: set[int] = set()
        for selector in selectors:
            found = self._rules_of.get(selector)
            if found is not None:
                as_source |= found[0]
                as_destination |= found[1]
        return as_source, as_destination

    # -- reading it

    def matching(self, selector: Selector) -> set[str]:
        """The members a selector matches now."""
        match selector:
            case Everyone():
                return set(self.members)
            case Tagged(tag=tag):
                return set(self.by_tag.get(tag, ()))
            case Named(name=name):
                return set(self.by_name.get(name, ()))
            case InRange():
                return {n for n, m in self.members.items() if matches(selector, m)}
        return set()  # pragma: no cover

    def rule_members(self, rule: Rule) -> tuple[set[str], set[str]]:
        """(sources, destinations) a rule matches among today's members (for a
        rule of this policy or of another one: what a policy change moved)."""
        sources: set[str] = set()
        destinations: set[str] = set()
        for selector in rule.sources:
            sources |= self.matching(selector)
        for selector in rule.destinations:
            destinations |= self.matching(selector)
        return sources, destinations

    def sees(self, a: str, b: str) -> bool:
        """Whether members `a` and `b` are each other's peers."""
        a_source, a_destination = self.as_source.get(a), self.as_destination.get(a)
        b_source, b_destination = self.as_source.get(b), self.as_destination.get(b)
        return bool(
            (a_source and b_destination and not a_source.isdisjoint(b_destination))
            or (a_destination and b_source and not a_destination.isdisjoint(b_source))
        )

    def visible(self, node_id: str) -> set[str]:
        """The members `node_id` sees (not itself)."""
        seen: set[str] = set()
        for position in self.as_source.get(node_id, ()):
            seen |= self.destinations[position]
        for position in self.as_destination.get(node_id, ()):
            seen |= self.sources[position]
        seen.discard(node_id)
        return seen

    def firewall(self, node_id: str) -> dict[str, set[Ports]]:
        """What may arrive at member `node_id`: source CIDR -> ports."""
        found: dict[str, set[Ports]] = {}
        for position in self.as_destination.get(node_id, ()):
            ports = self.policy.rules[position].ports
            for source in self.sources[position]:
                if source != node_id:
                    found.setdefault(host_cidr(self.members[source].address), set()).update(ports)
            for cidr in self.source_ranges[position]:
                found.setdefault(cidr, set()).update(ports)
        return found

    def firewall_entry(self, node_id: str, key: str) -> set[Ports]:
        """What may arrive at member `node_id` from source CIDR `key`."""
        source = self.by_address.get(key)
        found: set[Ports] = set()
        for position in self.as_destination.get(node_id, ()):
            if (source is not None and source != node_id and source in self.sources[position]) or (
                key in self.source_ranges[position]
            ):
                found.update(self.policy.rules[position].ports)
        return found


def canonical_ports(ports: Iterable[Ports]) -> tuple[str, ...]:
    """A firewall entry's allow list: sorted, and just "any" when it allows all."""
    unique = set(ports)
    if any(p.protocol == "any" for p in unique):
        return ("any",)
    return tuple(str(p) for p in sorted(unique))


def rule_shape(rule: Rule) -> tuple[object, ...]:
    """A rule without its place in the document (what two policies share)."""
    return (rule.sources, rule.destinations, rule.ports)
