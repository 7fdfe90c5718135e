"""A network's access policy: the document admins write, and its parsed form.

The document is JSON5 (comments and trailing commas allowed), closed-world (a
misspelt key is an error, never a rule silently dropped):

    {"rules": [{"from": ["tag:web"], "to": ["tag:db"], "ports": ["5432/tcp"]}],
     "tests": [{"from": "web1", "to": "db1", "accept": ["5432/tcp"], "deny": ["22/tcp"]}]}

Selectors: `*`, `tag:NAME`, a node name, a CIDR. Ports: `N/tcp`, `N/udp`,
`N-M/tcp`, `icmp`, `any`; a rule without `ports` allows all traffic. Rules are
directional; what no rule allows is denied (a network without a policy allows
everything). Pure: parsing raises PolicyError with a one-line message.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

import json5
import msgspec

TAG_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")
_PORT = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?/(tcp|udp)$")
MAX_RULES = 1000


class PolicyError(ValueError):
    """A policy that cannot be taken as it is; the message is one line."""


class RuleDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    from_: tuple[str, ...] = msgspec.field(name="from")
    to: tuple[str, ...]
    ports: tuple[str, ...] | None = None  # None: all traffic


class TestDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    from_: str = msgspec.field(name="from")
    to: str
    accept: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


class PolicyDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the admin wrote (kept in the event as written, for `policy show`)."""

    rules: tuple[RuleDocument, ...] = ()
    tests: tuple[TestDocument, ...] = ()


# -- the parsed form ------------------------------------------------------------


@dataclass(frozen=True)
class Everyone:
    def __str__(self) -> str:
        return "*"


@dataclass(frozen=True)
class Tagged:
    tag: str

    def __str__(self) -> str:
        return f"tag:{self.tag}"


@dataclass(frozen=True)
class Named:
    name: str  # a node's name in the network

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class InRange:
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network

    def __str__(self) -> str:
        return str(self.cidr)


Selector = Everyone | Tagged | Named | InRange
Protocol = Literal["tcp", "udp", "icmp", "any"]


@dataclass(frozen=True, order=True)
class Ports:
    """A protocol and, for tcp/udp, a port range (`any` is every protocol)."""

    protocol: Protocol
    low: int = 0
    high: int = 0

    def covers(self, other: Ports) -> bool:
        if self.protocol == "any":
            return True
        if self.protocol != other.protocol:
            return False
        return self.protocol == "icmp" or (self.low <= other.low and other.high <= self.high)

    def overlaps(self, other: Ports) -> bool:
        """Whether some traffic is in both (`any` overlaps everything)."""
        if "any" in (self.protocol, other.protocol):
            return True
        if self.protocol != other.protocol:
            return False
        return self.protocol == "icmp" or (self.low <= other.high and other.low <= self.high)

    def __str__(self) -> str:
        if self.protocol in ("icmp", "any"):
            return self.protocol
        span = str(self.low) if self.low == self.high else f"{self.low}-{self.high}"
        return f"{span}/{self.protocol}"


ALL_TRAFFIC = (Ports("any"),)


def covered(wanted: Ports, allowed: tuple[Ports, ...] | list[Ports]) -> bool:
    """Whether the union of `allowed` holds all of `wanted` (a range may be
    allowed in pieces by several rules)."""
    if any(p.protocol == "any" for p in allowed):
        return True
    if wanted.protocol in ("any", "icmp"):
        return any(p.covers(wanted) for p in allowed)
    reached = wanted.low - 1  # every port up to here is allowed
    for p in sorted(p for p in allowed if p.protocol == wanted.protocol):
        if p.low > reached + 1:
            break
        reached = max(reached, p.high)
        if reached >= wanted.high:
            return True
    return reached >= wanted.high


@dataclass(frozen=True)
class Rule:
    index: int  # its place in the document, from 1 (what `explain` names)
    sources: tuple[Selector, ...]
    destinations: tuple[Selector, ...]
    ports: tuple[Ports, ...]  # ALL_TRAFFIC when the rule names none

    def __str__(self) -> str:
        ports = "" if self.ports == ALL_TRAFFIC else f" ports {','.join(map(str, self.ports))}"
        return (
            f"rule {self.index}: from {','.join(map(str, self.sources))} "
            f"to {','.join(map(str, self.destinations))}{ports}"
        )


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    document: PolicyDocument


def parse_ports(text: str) -> Ports:
    """Raises PolicyError."""
    if text in ("icmp", "any"):
        return Ports(text)  # type: ignore[arg-type]
    match = _PORT.match(text)
    if match is None:
        raise PolicyError(f"bad port {text!r}: use N/tcp, N/udp, N-M/tcp, icmp or any")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if not 1 <= low <= high <= 65535:
        raise PolicyError(f"bad port {text!r}: ports are 1-65535, low to high")
    return Ports(match.group(3), low, high)  # type: ignore[arg-type]


def parse_selector(text: str) -> Selector:
    """Raises PolicyError."""
    if text == "*":
        return Everyone()
    kind, colon, rest = text.partition(":")
    if colon and kind == "tag":
        if not TAG_NAME.match(rest):
            raise PolicyError(f"bad tag {rest!r} in {text!r}: tags are 1-32 of a-z, 0-9 and '-'")
        return Tagged(rest)
    if "/" in text:
        try:
            return InRange(ipaddress.ip_network(text))
        except ValueError:
            raise PolicyError(f"bad CIDR selector {text!r}: e.g. 10.10.0.0/24") from None
    if colon:
        raise PolicyError(f"unknown selector {text!r}: use *, tag:NAME, a node name or a CIDR")
    if not text or len(text) > 63 or not text.isprintable():
        raise PolicyError(f"bad node name {text!r} in a selector")
    return Named(text)


@functools.lru_cache(maxsize=16)
def parse_policy(text: str) -> Policy:
    """A policy from its JSON5 text. Raises PolicyError (one line).

    Cached by text: deciding a policy, folding it into the write model and
    into the projection parse the same text (json5 is pure Python: some 5 ms
    per rule). A document in plain JSON skips it."""
    try:
        raw = msgspec.json.decode(text)
    except msgspec.DecodeError:
        try:
            raw = json5.loads(text)
        except ValueError as exc:
            raise PolicyError(f"not JSON5: {one_line(str(exc))}") from None
    try:
        document = msgspec.convert(raw, PolicyDocument)
    except msgspec.ValidationError as exc:
        raise PolicyError(f"not a policy: {one_line(str(exc))}") from None
    return compile_policy(document)


def compile_policy(document: PolicyDocument) -> Policy:
    """The parsed form of a document. Raises PolicyError."""
    if len(document.rules) > MAX_RULES:
        raise PolicyError(f"{len(document.rules)} rules: at most {MAX_RULES}")
    rules = []
    for index, rule in enumerate(document.rules, 1):
        where = f"rule {index}"
        if not rule.from_ or not rule.to:
            raise PolicyError(f"{where}: 'from' and 'to' each need at least one selector")
        try:
            sources = tuple(parse_selector(s) for s in rule.from_)
            destinations = tuple(parse_selector(s) for s in rule.to)
            if rule.ports is not None and not rule.ports:
                raise PolicyError("'ports' is empty: leave it out to allow all traffic")
            ports = ALL_TRAFFIC if rule.ports is None else tuple(parse_ports(p) for p in rule.ports)
        except PolicyError as exc:
            raise PolicyError(f"{where}: {exc}") from None
        rules.append(Rule(index, sources, destinations, ports))
    for index, test in enumerate(document.tests, 1):
        try:
            for port in (*test.accept, *test.deny):
                parse_ports(port)
        except PolicyError as exc:
            raise PolicyError(f"test {index}: {exc}") from None
        if not test.accept and not test.deny:
            raise PolicyError(f"test {index}: give 'accept' or 'deny' ports")
    return Policy(tuple(rules), document)


def one_line(text: str) -> str:
    return " ".join(text.split())


policy_encoder = msgspec.json.Encoder()
