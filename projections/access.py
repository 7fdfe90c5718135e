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


def explain(
    policy: Policy, source: Member, destination: Member, port: Ports
) -> tuple[bool, Rule | None]:
    """Whether `source` may open `port` towards `destination`, and the first
    rule that allows it (None when denied: no rule does)."""
    for rule in rules_between(policy, source, destination):
        if any(p.covers(port) for p in rule.ports):
            return True, rule
    return False, None


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
            ok, _ = explain(policy, source, destination, parse_ports(text))
            if not ok:
                failures.append(f"test {index}: {test.from_} -> {test.to} {text} is denied")
        for text in test.deny:
            ok, rule = explain(policy, source, destination, parse_ports(text))
            if ok:
                failures.append(
                    f"test {index}: {test.from_} -> {test.to} {text} is allowed by {rule}"
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
