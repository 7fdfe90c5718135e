"""The host's firewall on the overlay interface: the agent's own nftables table.

The `firewall` section of the desired state says, per source CIDR, what may
arrive on the overlay interface. `ruleset_for` (pure) turns it into the whole
table `inet netmesh`; `NftFirewall` installs it in ONE nft transaction through
the JSON interface (`nft -j -f -`, the JSON on stdin: no shell lines), reads it
back and removes it. Nothing else is ever touched: no flush of the ruleset, no
other table.

The table, for interface nm0:

    table inet netmesh {
        set g0_v4 { type ipv4_addr; flags interval; elements = { 10.10.0.5, 10.20.0.0/16 } }
        chain input {
            type filter hook input priority filter; policy accept;
            iifname "nm0" jump overlay comment "netmesh <digest>"
        }
        chain overlay {
            ct state established,related accept
            ip saddr @g0_v4 tcp dport { 22, 8000-8080 } accept
            ...
            drop
        }
    }

Sources that share an allow list share one set (per address family), so the
rule count grows with the number of distinct allow lists, not with the number
of sources: thousands of peers are thousands of set elements in a few rules.
Traffic on other interfaces never enters `overlay`.

Comparing actual with desired: the kernel gives back a normalized form of what
was sent (handles, merged port sets, elements re-rendered, `ct state` as a
list...), so comparing JSON would either diff falsely or need a normalizer
that tracks nft's printer. Instead the digest of the batch we sent rides in
the comment of the jump rule, and the read-back also counts the rules in each
chain and the elements in each set (`FirewallShape`): the same digest and
shape means the same table as installed, cheaply, without false diffs; a
table edited by hand (a rule or element deleted or added, a chain flushed, the
table deleted) has another shape or no digest and is replaced. An element
changed in place (same count) goes unseen until the next desired change; the
planner's collapsing of networks makes the element counts what the kernel
stores (no overlaps, no merges).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import shutil
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

import msgspec

from agent.backend import BackendError
from events.desired import FirewallEntry, ForwardEntry
from events.policy import PolicyError, Ports, parse_ports

FAMILY = "inet"
TABLE = "netmesh"
BASE_CHAIN = "input"
OVERLAY_CHAIN = "overlay"
FORWARD_CHAIN = "forward"
EGRESS_CHAIN = "egress"
NAT_CHAIN = "masquerade"
_DIGEST_PREFIX = "netmesh "
_NFT_TIMEOUT = 30.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRange = tuple[int, int]


class FirewallError(BackendError):
    """nft is missing, refused a batch, or answered something unreadable."""


class FirewallShape(msgspec.Struct, frozen=True, kw_only=True):
    """How many rules each chain and how many elements each set of the table
    holds (sorted by name): what the read-back is compared on, with the digest."""

    rules: tuple[tuple[str, int], ...] = ()
    elements: tuple[tuple[str, int], ...] = ()


class FirewallState(msgspec.Struct, frozen=True, kw_only=True):
    """The table `inet netmesh` as read back. `digest` is None when no rule
    carries one (not a table this agent installed, or one edited by hand)."""

    digest: str | None
    shape: FirewallShape


class Allow(msgspec.Struct, frozen=True, order=True):
    """An allow list, normalized: "any" swallows the rest; port ranges sorted
    and merged (adjacent or overlapping), so equal lists compare equal."""

    any: bool = False
    icmp: bool = False
    tcp: tuple[PortRange, ...] = ()
    udp: tuple[PortRange, ...] = ()

    def __str__(self) -> str:
        if self.any:
            return "any"
        parts = ["icmp"] if self.icmp else []
        for protocol, ranges in (("tcp", self.tcp), ("udp", self.udp)):
            parts.extend(
                f"{low if low == high else f'{low}-{high}'}/{protocol}" for low, high in ranges
            )
        return ",".join(parts)

    @property
    def empty(self) -> bool:
        return not (self.any or self.icmp or self.tcp or self.udp)


class Ruleset(msgspec.Struct, frozen=True, kw_only=True):
    """The whole table for one interface, as one nft JSON batch.

    `commands` replaces the table in one transaction (add table, delete table,
    then everything); `digest` identifies it and `shape` is what a read-back
    of it shows. `skipped` names the entries that were left out and why (a
    malformed key or port from the control plane: left out means not allowed).
    """

    interface: str
    digest: str
    shape: FirewallShape
    commands: tuple[dict[str, Any], ...]
    sources: int  # entries turned into set elements
    groups: int  # distinct allow lists
    skipped: tuple[str, ...] = ()

    def batch(self) -> bytes:
        return msgspec.json.encode({"nftables": self.commands})

    def __str__(self) -> str:
        rules = sum(n for _, n in self.shape.rules)
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return (
            f"{self.sources} sources in {self.groups} allow lists, {rules} rules{skipped} "
            f"(digest {self.digest[:12]})"
        )


# -- the pure planner ------------------------------------------------------------


def normalize_allow(specs: Iterable[str]) -> Allow:
    """Raises PolicyError for a malformed spec."""
    ports = [parse_ports(spec) for spec in specs]
    if any(p.protocol == "any" for p in ports):
        return Allow(any=True)
    return Allow(
        icmp=any(p.protocol == "icmp" for p in ports),
        tcp=_merge(p for p in ports if p.protocol == "tcp"),
        udp=_merge(p for p in ports if p.protocol == "udp"),
    )


def ruleset_for(
    entries: Mapping[str, FirewallEntry],
    interface: str,
    forward: Mapping[str, ForwardEntry] | None = None,
    overlay: Sequence[str] = (),
    guarded: Sequence[str] = (),
) -> Ruleset:
    """The table enforcing `entries` (the firewall section) on `interface`,
    and, on an egress gateway, `forward` (the forward section): what members
    (sources in `overlay`, the host's networks) may send to the ranges, which
    of them are masqueraded, and the `guarded` interfaces, switched on to
    forward for the gateway only (see agent/forwarding.py).

    Pure and deterministic: the same section gives the same batch, byte for
    byte (groups ordered by allow list, networks sorted and collapsed). An
    empty section still gives a table: replies pass, nothing new gets in.
    """
    groups: dict[Allow, list[Network]] = {}
    skipped: list[str] = []
    for key in sorted(entries):
        try:
            network = ipaddress.ip_network(key, strict=False)
            allow = normalize_allow(entries[key].allow)
        except (ValueError, PolicyError) as exc:
            skipped.append(f"{key}: {exc}")
            continue
        if not allow.empty:
            groups.setdefault(allow, []).append(network)

    table = {"family": FAMILY, "name": TABLE}
    sets: list[dict[str, Any]] = []
    rules: list[list[dict[str, Any]]] = [_ESTABLISHED]
    elements: list[tuple[str, int]] = []
    for index, allow in enumerate(sorted(groups)):
        for version, kind, protocol in ((4, "ipv4_addr", "ip"), (6, "ipv6_addr", "ip6")):
            networks = [n for n in groups[allow] if n.version == version]
            if not networks:
                continue
            collapsed = sorted(ipaddress.collapse_addresses(networks))  # type: ignore[type-var]
            name = f"g{index}_v{version}"
            sets.append(
                {
                    "family": FAMILY,
                    "table": TABLE,
                    "name": name,
                    "type": kind,
                    "flags": ["interval"],
                    "comment": str(allow),
                    "elem": [_element(n) for n in collapsed],
                }
            )
            elements.append((name, len(collapsed)))
            source = _match({"payload": {"protocol": protocol, "field": "saddr"}}, f"@{name}")
            rules.extend(_allow_rules([source], allow, version))
    rules.append([{"drop": None}])

    body: list[dict[str, Any]] = [{"add": {"set": s}} for s in sets]
    body.append(
        {
            "add": {
                "chain": {
                    **_in_table(),
                    "name": BASE_CHAIN,
                    "type": "filter",
                    "hook": "input",
                    "prio": 0,
                    "policy": "accept",
                }
            }
        }
    )
    body.append({"add": {"chain": {**_in_table(), "name": OVERLAY_CHAIN}}})
    jump = [_match({"meta": {"key": "iifname"}}, interface), {"jump": {"target": OVERLAY_CHAIN}}]
    body.extend(_rule(OVERLAY_CHAIN, expr) for expr in rules)
    chains = [(BASE_CHAIN, 1), (OVERLAY_CHAIN, len(rules))]
    if forward:
        gateway_body, gateway_chains, gateway_skipped = _gateway(
            forward, interface, overlay, guarded
        )
        body.extend(gateway_body)
        chains.extend(gateway_chains)
        skipped.extend(gateway_skipped)
    digest = hashlib.sha256(
        msgspec.json.encode({"interface": interface, "body": body, "jump": jump})
    ).hexdigest()[:32]
    jump_rule = _rule(BASE_CHAIN, jump)
    jump_rule["add"]["rule"]["comment"] = _DIGEST_PREFIX + digest
    commands = (
        # The replace idiom: `add` makes deleting an absent table harmless;
        # all of it is one transaction, so there is never a moment without it.
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        *body,
        jump_rule,
    )
    shape = FirewallShape(rules=tuple(sorted(chains)), elements=tuple(sorted(elements)))
    return Ruleset(
        interface=interface,
        digest=digest,
        shape=shape,
        commands=commands,
        sources=sum(len(v) for v in groups.values()),
        groups=len(groups),
        skipped=tuple(skipped),
    )


def _gateway(
    forward: Mapping[str, ForwardEntry],
    interface: str,
    overlay: Sequence[str],
    guarded: Sequence[str],
) -> tuple[list[dict[str, Any]], list[tuple[str, int]], list[str]]:
    """The chains of an egress gateway: commands, (chain, rule count), skipped.

        chain forward {
            type filter hook forward priority filter; policy accept;
            iifname "nm0" jump egress
            oifname "nm0" ct state established,related accept
            oifname "nm0" drop                  # nothing new into the overlay
            iifname { "eth1" } drop             # guarded: forwarding only for us
        }
        chain egress {
            ct state established,related accept
            ip saddr 10.10.0.5/32 ip daddr 10.10.0.9/32 accept   # exclusive entries first:
            ip daddr 10.10.0.9/32 drop                          # an ingress client
            ip saddr { 10.10.0.0/24 } ip daddr 192.168.1.0/24 accept
            drop                                # nowhere but the ranges
        }
        chain masquerade {
            type nat hook postrouting priority srcnat; policy accept;
            ip saddr { 10.10.0.0/24 } ip daddr { 192.168.1.0/24 } masquerade
        }

    Traffic between other interfaces than these never meets a rule of ours.
    """
    iifname, oifname = {"meta": {"key": "iifname"}}, {"meta": {"key": "oifname"}}
    forward_rules: list[list[dict[str, Any]]] = [
        [_match(iifname, interface), {"jump": {"target": EGRESS_CHAIN}}],
        [_match(oifname, interface), *_ESTABLISHED],
        [_match(oifname, interface), {"drop": None}],
    ]
    if guarded:
        forward_rules.append([_match(iifname, _anonymous(sorted(guarded))), {"drop": None}])
    egress_rules: list[list[dict[str, Any]]] = [_ESTABLISHED]
    skipped: list[str] = []
    masqueraded: list[Network] = []
    # Exclusive entries first: what they do not allow towards their CIDR is
    # dropped before a broader entry's rule could accept it.
    for key in sorted(forward, key=lambda k: (not forward[k].exclusive, k)):
        entry = forward[key]
        try:
            target = ipaddress.ip_network(key)
        except ValueError as exc:
            skipped.append(f"forward {key}: {exc}")
            continue
        protocol = "ip" if target.version == 4 else "ip6"
        if entry.nat:
            masqueraded.append(target)
        for rule in entry.rules:
            try:
                sources = [ipaddress.ip_network(s) for s in rule.sources]
                destination = ipaddress.ip_network(rule.destination)
                allow = normalize_allow(rule.allow)
            except (ValueError, PolicyError) as exc:
                skipped.append(f"forward {key} {rule.destination}: {exc}")
                continue
            sources = [n for n in sources if n.version == target.version]
            if not sources or allow.empty or destination.version != target.version:
                continue
            matches = [
                _match({"payload": {"protocol": protocol, "field": "saddr"}}, _networks(sources)),
                _match(
                    {"payload": {"protocol": protocol, "field": "daddr"}}, _element(destination)
                ),
            ]
            egress_rules.extend(_allow_rules(matches, allow, target.version))
        if entry.exclusive:
            daddr = {"payload": {"protocol": protocol, "field": "daddr"}}
            egress_rules.append([_match(daddr, _element(target)), {"drop": None}])
    egress_rules.append([{"drop": None}])
    body: list[dict[str, Any]] = [
        {
            "add": {
                "chain": {
                    **_in_table(),
                    "name": FORWARD_CHAIN,
                    "type": "filter",
                    "hook": "forward",
                    "prio": 0,
                    "policy": "accept",
                }
            }
        },
        {"add": {"chain": {**_in_table(), "name": EGRESS_CHAIN}}},
    ]
    body.extend(_rule(FORWARD_CHAIN, expr) for expr in forward_rules)
    body.extend(_rule(EGRESS_CHAIN, expr) for expr in egress_rules)
    chains = [(FORWARD_CHAIN, len(forward_rules)), (EGRESS_CHAIN, len(egress_rules))]
    nat_rules = []
    own = [ipaddress.ip_network(cidr, strict=False) for cidr in overlay]
    for version, protocol in ((4, "ip"), (6, "ip6")):
        targets = [n for n in masqueraded if n.version == version]
        sources = [n for n in own if n.version == version]
        if targets and sources:
            nat_rules.append(
                [
                    _match(
                        {"payload": {"protocol": protocol, "field": "saddr"}}, _networks(sources)
                    ),
                    _match(
                        {"payload": {"protocol": protocol, "field": "daddr"}}, _networks(targets)
                    ),
                    {"masquerade": None},
                ]
            )
    if nat_rules:
        body.append(
            {
                "add": {
                    "chain": {
                        **_in_table(),
                        "name": NAT_CHAIN,
                        "type": "nat",
                        "hook": "postrouting",
                        "prio": 100,
                        "policy": "accept",
                    }
                }
            }
        )
        body.extend(_rule(NAT_CHAIN, expr) for expr in nat_rules)
        chains.append((NAT_CHAIN, len(nat_rules)))
    return body, chains, skipped


def _networks(networks: Sequence[Network]) -> Any:
    collapsed = sorted(ipaddress.collapse_addresses(networks))  # type: ignore[type-var]
    return _anonymous([_element(n) for n in collapsed])


def _anonymous(items: list[Any]) -> Any:
    return items[0] if len(items) == 1 else {"set": items}


# The last ruleset made, with what it was made from: a pass every 30 s on an
# unchanged section (shared, not copied, by deltas that do not touch it) need
# not spend ~0.1 s making the same 5,000-source ruleset again.
_last: tuple[tuple[object, ...], tuple[object, ...], Ruleset] | None = None
_NO_FORWARD: Mapping[str, ForwardEntry] = MappingProxyType({})


def cached_ruleset_for(
    entries: Mapping[str, FirewallEntry],
    interface: str,
    forward: Mapping[str, ForwardEntry] | None = None,
    overlay: Sequence[str] = (),
    guarded: Sequence[str] = (),
) -> Ruleset:
    """`ruleset_for`, remembering the last answer for the very same section
    objects (desired states are immutable values: same object, same answer)."""
    global _last
    forward = _NO_FORWARD if forward is None else forward
    made_of = (id(entries), interface, id(forward), tuple(overlay), tuple(guarded))
    if _last is not None and _last[0] == made_of:
        return _last[2]
    ruleset = ruleset_for(entries, interface, forward, overlay, guarded)
    # The sections are held by the cache too, so that their ids stay theirs.
    _last = (made_of, (entries, forward), ruleset)
    return ruleset


def state_of(listing: Mapping[str, Any]) -> FirewallState:
    """The state of our table from `nft -j list table inet netmesh` output."""
    rules: dict[str, int] = {}
    elements: dict[str, int] = {}
    digest: str | None = None
    for item in listing.get("nftables", ()):
        if "chain" in item:
            rules.setdefault(item["chain"]["name"], 0)
        elif "set" in item:
            elements[item["set"]["name"]] = len(item["set"].get("elem", ()))
        elif "rule" in item:
            rule = item["rule"]
            rules[rule["chain"]] = rules.get(rule["chain"], 0) + 1
            comment = rule.get("comment", "")
            if rule["chain"] == BASE_CHAIN and comment.startswith(_DIGEST_PREFIX):
                digest = comment.removeprefix(_DIGEST_PREFIX)
    shape = FirewallShape(
        rules=tuple(sorted(rules.items())), elements=tuple(sorted(elements.items()))
    )
    return FirewallState(digest=digest, shape=shape)


def in_force(actual: FirewallState | None, ruleset: Ruleset) -> bool:
    """Whether the table read back is the one `ruleset` installs."""
    return actual is not None and actual.digest == ruleset.digest and actual.shape == ruleset.shape


def _merge(ports: Iterable[Ports]) -> tuple[PortRange, ...]:
    merged: list[PortRange] = []
    for low, high in sorted((p.low, p.high) for p in ports):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


def _in_table() -> dict[str, str]:
    return {"family": FAMILY, "table": TABLE}


def _rule(chain: str, expr: list[dict[str, Any]]) -> dict[str, Any]:
    return {"add": {"rule": {**_in_table(), "chain": chain, "expr": expr}}}


def _match(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


_ACCEPT: dict[str, Any] = {"accept": None}
_ESTABLISHED = [_match({"ct": {"key": "state"}}, ["established", "related"], "in"), _ACCEPT]


def _element(network: Network) -> Any:
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _ports(ranges: tuple[PortRange, ...]) -> Any:
    items: list[Any] = [low if low == high else {"range": [low, high]} for low, high in ranges]
    return items[0] if len(items) == 1 else {"set": items}


def _allow_rules(
    matches: list[dict[str, Any]], allow: Allow, version: int
) -> list[list[dict[str, Any]]]:
    """Rules accepting what `allow` lists of the traffic `matches` selects."""
    if allow.any:
        return [[*matches, _ACCEPT]]
    rules = []
    if allow.icmp:
        icmp = "icmp" if version == 4 else "ipv6-icmp"
        rules.append([*matches, _match({"meta": {"key": "l4proto"}}, icmp), _ACCEPT])
    for protocol, ranges in (("tcp", allow.tcp), ("udp", allow.udp)):
        if ranges:
            port = _match({"payload": {"protocol": protocol, "field": "dport"}}, _ports(ranges))
            rules.append([*matches, port, _ACCEPT])
    return rules


# -- the machine's side ------------------------------------------------------------


class FirewallControl(Protocol):
    """What the agent needs of a firewall: `NftFirewall` on a machine,
    `agent.fake.FakeFirewall` in tests. Each call may be repeated."""

    async def read(self) -> FirewallState | None:
        """The table as it is; None when there is none. Raises FirewallError."""
        ...

    async def replace(self, ruleset: Ruleset) -> None:
        """Install `ruleset` in place of the table, atomically. Raises FirewallError."""
        ...

    async def remove(self) -> None:
        """Delete the table (nothing else); no table is fine. Raises FirewallError."""
        ...


_REMOVE = msgspec.json.encode(
    {
        "nftables": [
            {"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"delete": {"table": {"family": FAMILY, "name": TABLE}}},
        ]
    }
)


class NftFirewall:
    """The table through the `nft` command's JSON interface, in the caller's
    network namespace. `nft` is the argv that runs it (tests put
    `ip netns exec NAME` in front)."""

    def __init__(self, nft: Sequence[str] | None = None) -> None:
        self.nft = tuple(nft) if nft else (shutil.which("nft") or "/usr/sbin/nft",)

    def available(self) -> bool:
        """Whether the nft command is there to run."""
        return shutil.which(self.nft[0]) is not None

    async def read(self) -> FirewallState | None:
        code, out, err = await self._run("-j", "list", "table", FAMILY, TABLE)
        if code != 0:
            if "No such file or directory" in err:
                return None
            raise FirewallError(f"nft list table {FAMILY} {TABLE}: {err.strip()}")
        try:
            return state_of(msgspec.json.decode(out))
        except (msgspec.DecodeError, KeyError, TypeError, AttributeError) as exc:
            raise FirewallError(f"nft list table: unreadable answer: {exc}") from None

    async def replace(self, ruleset: Ruleset) -> None:
        await self._batch(ruleset.batch(), f"replace table {FAMILY} {TABLE}")

    async def remove(self) -> None:
        await self._batch(_REMOVE, f"delete table {FAMILY} {TABLE}")

    async def _batch(self, batch: bytes, what: str) -> None:
        code, _, err = await self._run("-j", "-f", "-", stdin=batch)
        if code != 0:
            raise FirewallError(f"nft {what}: {err.strip()[:500]}", retryable=False)

    async def _run(self, *args: str, stdin: bytes | None = None) -> tuple[int, bytes, str]:
        try:
            process = await asyncio.create_subprocess_exec(
                *self.nft,
                *args,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise FirewallError(f"cannot run {self.nft[0]}: {exc}", retryable=False) from None
        try:
            async with asyncio.timeout(_NFT_TIMEOUT):
                out, err = await process.communicate(stdin)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise FirewallError(f"nft {' '.join(args)}: no answer in {_NFT_TIMEOUT}s") from None
        assert process.returncode is not None
        return process.returncode, out, err.decode(errors="replace")
