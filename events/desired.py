"""Desired state: what the control plane tells one host to be, in named sections.

This is protocol (see PROTOCOL.md in this folder for its versions): agents of
one version must read what control planes of the next version write. Fields
are only ever added, with defaults.

A host's desired state is a set of named sections (`Sections`): the WireGuard
interface, its addresses, its peers, its routes, its firewall, the ranges it
reaches through gateways (egress) and those it forwards to (forward); later
features add their own (dns, ...). Each section is a keyed map of entries. A host's subject
`netmesh.desired.<host>` carries a snapshot (every section whole, published
with a rollup so that it replaces everything before it), then deltas: per
section, entries upserted by key and keys removed, all under one revision. A
delta names the revision it applies to (`base`): an agent applies it only on
top of exactly that revision, and on a gap goes back to the snapshot.

Adding a section is one field in `Sections` (and its entry type): the framing,
signing, feed, cache and delta arithmetic here are generic over sections.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

PROTOCOL = 7

# The key of the one entry of the `interface` section.
WIREGUARD = "wireguard"


class InterfaceEntry(msgspec.Struct, frozen=True, kw_only=True):
    """The WireGuard interface's own settings."""

    listen_port: int
    mtu: int
    # Raised by `netmesh node rotate-key`: an agent holding a lower epoch makes
    # a new WireGuard key and announces it.
    key_epoch: int = 0


_DEFAULT_INTERFACE = InterfaceEntry(listen_port=51820, mtu=1420)


class AddressEntry(msgspec.Struct, frozen=True, kw_only=True):
    """An interface address, keyed by "ip/prefix" (the network's prefix, so the
    connected route covers the network)."""

    network: str = ""  # the network it is this host's address in


class PeerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One WireGuard peer, keyed by its public key (base64, as `wg` prints it)."""

    allowed_ips: tuple[str, ...]  # CIDRs, e.g. ("10.10.0.2/32",)
    endpoint: str | None = None  # "ip:port" or "[ipv6]:port"; None when the peer is unreachable
    persistent_keepalive: int = 0  # seconds, 0 = off
    name: str = ""  # for logs and humans; not part of WireGuard config


class RouteEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A route through the overlay interface, keyed by its destination CIDR
    (fields such as a metric come with the feature that needs them)."""


class FirewallEntry(msgspec.Struct, frozen=True, kw_only=True):
    """What may arrive on the overlay interface from one source, keyed by the
    source's CIDR (a peer's overlay address as /32 or /128, or a range).

    `allow` holds port specs as the policy writes them: "any", "icmp",
    "N/tcp", "N-M/udp". The agent accepts replies to what the host opened,
    accepts what some entry allows and drops everything else arriving on the
    overlay interface: an empty section lets nothing new in."""

    allow: tuple[str, ...]


class EgressVia(msgspec.Struct, frozen=True, kw_only=True, order=True):
    """A gateway a range can be reached through: the peer's public key and its
    metric (lower is preferred)."""

    metric: int
    peer: str


class EgressEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A range beyond the overlay, keyed by its CIDR, and the gateways that
    forward to it, best first (by metric, then key). The agent routes the range
    through the first one it finds alive: that peer's allowed IPs carry it."""

    via: tuple[EgressVia, ...]


class ForwardRule(msgspec.Struct, frozen=True, kw_only=True):
    """Overlay traffic a gateway forwards: from these source CIDRs, to
    `destination` (the range or a part of it), on these ports (as in the
    firewall section: "any", "icmp", "N/tcp", "N-M/udp")."""

    sources: tuple[str, ...]
    destination: str
    allow: tuple[str, ...]


class ForwardEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A range this host forwards to from the overlay (an egress gateway),
    keyed by its CIDR: masqueraded unless `nat` is off; `rules` say who may
    send what there (in a network without a policy: its CIDR, anything).

    On an ingress gateway, its external clients' addresses (ip/32) and what
    they may reach are entries too (not masqueraded). `exclusive`: traffic to
    the key's CIDR that no rule here allows is dropped, whatever broader
    entries allow (a client under a policy: the network's CIDR is a
    destination of its fellow clients' rules, the policy says who reaches it)."""

    nat: bool = True
    rules: tuple[ForwardRule, ...] = ()
    exclusive: bool = False


class ExitEntry(msgspec.Struct, frozen=True, kw_only=True):
    """The host's default route goes through a gateway (an exit node), keyed
    by the range it covers ("0.0.0.0/0"): the peer whose allowed IPs carry it.
    The agent routes it the way wg-quick does (a routing table of its own,
    the tunnel's packets marked so that they still go out the underlay)."""

    peer: str


class DnsEntry(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A name the host's DNS server answers, keyed by the fully qualified name
    (lowercase, no trailing dot), inside one of the `dns_zones`: its IPv4 (A)
    and IPv6 (AAAA) addresses, or the name it is an alias of (CNAME)."""

    a: tuple[str, ...] = ()
    aaaa: tuple[str, ...] = ()
    cname: str = ""


class DnsZoneEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A domain the host's DNS server is the authority for, keyed by the
    domain (lowercase, no trailing dot): names in it that no `dns` entry holds
    do not exist (NXDOMAIN). The host's resolver is pointed at the server for
    these domains only."""

    network: str = ""  # the network whose domain it is


class ClientEntry(msgspec.Struct, frozen=True, kw_only=True):
    """An external WireGuard client (no agent) this host takes in as an
    ingress gateway, keyed by its public key: a peer allowed only its address
    ("ip/32"), with no endpoint (the client connects first and keeps its
    mapping open; WireGuard learns where it is from its packets)."""

    address: str
    name: str = ""  # for logs and humans


class PathEntry(msgspec.Struct, frozen=True, kw_only=True):
    """How to reach one peer behind a NAT, keyed by its public key: the
    endpoints ("ip:port") to try, best first. The agent tries them in turn
    (agent/nat.py); a peer without an entry is reached at its `peers` endpoint."""

    candidates: tuple[str, ...]
    # A relay for this pair (protocol 7): "ip:port" on the relay host that
    # forwards this pair's datagrams as they are, tried after the candidates
    # fail (agent/nat.py); `relay_node` names the relay for status.
    relay: str = ""
    relay_node: str = ""


class RelayEntry(msgspec.Struct, frozen=True, kw_only=True):
    """On a relay host, one pair of hosts whose WireGuard datagrams it
    forwards as they are (it holds neither's key), keyed by the pair's host
    ids sorted and joined with ",". `hosts[i]` sends to UDP port `ports[i]`;
    what arrives on one port goes out of the other to where that side's last
    datagram came from."""

    hosts: tuple[str, str]
    ports: tuple[int, int]
    names: tuple[str, str] = ("", "")


class Sections(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """Every section of a host's desired state, each a map key -> entry.

    Closed-world: a section this agent does not know is a decoding error, not
    something silently left unenforced (an older agent must be upgraded).
    Entries are open-world (fields added with defaults).
    """

    interface: dict[str, InterfaceEntry] = {}
    addresses: dict[str, AddressEntry] = {}
    peers: dict[str, PeerEntry] = {}
    routes: dict[str, RouteEntry] = {}
    firewall: dict[str, FirewallEntry] = {}
    egress: dict[str, EgressEntry] = {}
    forward: dict[str, ForwardEntry] = {}
    exit: dict[str, ExitEntry] = {}
    dns: dict[str, DnsEntry] = {}
    dns_zones: dict[str, DnsZoneEntry] = {}
    clients: dict[str, ClientEntry] = {}
    paths: dict[str, PathEntry] = {}  # NAT traversal: projections/sections/paths.py
    relays: dict[str, RelayEntry] = {}  # on a relay host: the pairs it forwards


SECTION_NAMES: tuple[str, ...] = Sections.__struct_fields__


def section(sections: Sections, name: str) -> dict[str, Any]:
    """The entries of section `name`."""
    entries: dict[str, Any] = getattr(sections, name)
    return entries


class DesiredState(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="snapshot"):
    """Everything a host's agent needs (a snapshot).

    `revision` is the event-stream sequence this state reflects: agents apply a
    state only when its revision is newer than the one they hold.
    """

    host_id: str
    revision: int
    sections: Sections = Sections()
    protocol: int = PROTOCOL

    @property
    def interface(self) -> InterfaceEntry:
        """The interface settings (defaults if the control plane sent none)."""
        return self.sections.interface.get(WIREGUARD) or _DEFAULT_INTERFACE

    @property
    def peers(self) -> dict[str, PeerEntry]:
        return self.sections.peers

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(sorted(self.sections.addresses))


class DesiredDelta(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="delta"):
    """What changed in a host's desired state between revision `base` and `revision`.

    `upsert` holds whole entries by key, per section; `remove` the keys that
    go, per section. An empty delta (nothing changed for this host, but its
    revision moved) keeps the chain of revisions unbroken.
    """

    host_id: str
    revision: int
    base: int
    upsert: Sections = Sections()
    remove: dict[str, tuple[str, ...]] = {}
    protocol: int = PROTOCOL

    def __post_init__(self) -> None:
        unknown = set(self.remove) - set(SECTION_NAMES)
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(sorted(unknown))}")


DesiredMessage = DesiredState | DesiredDelta


class DeltaMismatch(Exception):
    """A delta that does not apply to the state at hand (a gap in the chain)."""


def apply_delta(state: DesiredState, delta: DesiredDelta) -> DesiredState:
    """The state `delta` leads to from `state`. Raises DeltaMismatch when
    `delta.base` is not `state.revision` or the hosts differ. Sections the
    delta does not touch are shared with `state`, not copied."""
    if delta.host_id != state.host_id or delta.base != state.revision:
        raise DeltaMismatch(
            f"delta {delta.base}->{delta.revision} for {delta.host_id} does not apply to "
            f"revision {state.revision} of {state.host_id}"
        )
    changed: dict[str, dict[str, Any]] = {}
    for name in SECTION_NAMES:
        upserts = section(delta.upsert, name)
        removals = delta.remove.get(name, ())
        if not upserts and not removals:
            continue
        entries = dict(section(state.sections, name))
        for key in removals:
            entries.pop(key, None)
        entries.update(upserts)
        changed[name] = entries
    sections = msgspec.structs.replace(state.sections, **changed) if changed else state.sections
    return DesiredState(host_id=state.host_id, revision=delta.revision, sections=sections)


def sections_of(entries: dict[str, dict[str, Any]]) -> Sections:
    """`Sections` from section name -> entries (names must be known)."""
    return Sections(**entries)


desired_encoder = msgspec.json.Encoder()
_message_decoder: msgspec.json.Decoder[DesiredState | DesiredDelta] = msgspec.json.Decoder(
    DesiredMessage
)


class _Version(msgspec.Struct):
    """What a message says of its version (a cheap first pass over it)."""

    protocol: int = 1
    kind: str = ""


_version_decoder = msgspec.json.Decoder(_Version)


class UnknownSection(msgspec.ValidationError):
    """A message with a section this agent does not know: the control plane is
    newer. Upgrade the agent."""


def decode_message(data: bytes) -> DesiredMessage:
    """A snapshot or a delta, of this version or an older one (upcast).
    Raises msgspec.DecodeError (ValidationError, UnknownSection included) on
    anything else."""
    version = _version_decoder.decode(data)
    if version.protocol > PROTOCOL:
        raise UnknownSection(
            f"desired-state protocol {version.protocol} is newer than this agent's "
            f"({PROTOCOL}): upgrade the agent"
        )
    try:
        if version.protocol == PROTOCOL:
            return _message_decoder.decode(data)
        message: DesiredMessage = msgspec.convert(
            upcast(msgspec.json.decode(data)),
            DesiredMessage,
        )
        return message
    except msgspec.ValidationError as exc:
        text = str(exc)
        unknown_field = "unknown field" in text and ("$.sections" in text or "$.upsert" in text)
        if unknown_field or "unknown section" in text:
            raise UnknownSection(
                f"{text}: a section unknown to this agent (desired-state protocol "
                f"{PROTOCOL}); upgrade the agent"
            ) from None
        raise


def decode_state(data: bytes) -> DesiredState:
    """A snapshot (an agent's cached state, of any version). Raises msgspec.DecodeError."""
    message = decode_message(data)
    if not isinstance(message, DesiredState):
        raise msgspec.ValidationError("expected a snapshot, got a delta")
    return message


# -- older versions, upcast on the raw dict (one function per step) -----------


def _v1_to_v2(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 1 had whole states only, without `kind`."""
    return {**raw, "kind": "snapshot", "protocol": 2}


def _v2_to_v3(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 2: a flat interface and a peer list; deltas carried `interface`
    whole (when any of its settings moved) and peers by public key."""

    def peers(items: Any) -> dict[str, Any]:
        return {
            p["public_key"]: {k: v for k, v in p.items() if k != "public_key"}
            for p in items or ()
            if isinstance(p, dict) and "public_key" in p
        }

    def interface(settings: dict[str, Any]) -> dict[str, Any]:
        entry = {k: settings[k] for k in ("listen_port", "mtu", "key_epoch") if k in settings}
        return {
            "interface": {WIREGUARD: entry},
            "addresses": {a: {} for a in settings.get("addresses") or ()},
        }

    common = {"host_id": raw.get("host_id"), "revision": raw.get("revision"), "protocol": 3}
    if raw.get("kind") == "delta":
        upsert: dict[str, Any] = {"peers": peers(raw.get("upsert"))}
        if isinstance(raw.get("interface"), dict):
            # Version 2 changed addresses only through snapshots: a delta's
            # `interface` repeated them, so upserting them loses nothing.
            upsert.update(interface(raw["interface"]))
        return {
            **common,
            "kind": "delta",
            "base": raw.get("base"),
            "upsert": upsert,
            "remove": {"peers": raw.get("remove") or []},
        }
    return {
        **common,
        "kind": "snapshot",
        "sections": {**interface(raw), "peers": peers(raw.get("peers"))},
    }


def _v3_to_v4(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 3 had no firewall: everything arriving on the overlay was let in.
    A snapshot says so explicitly (an absent section now means "let nothing
    in"); a delta changed no firewall.

    No delta ever removes these two entries (no control plane writes them):
    a snapshot replaces them, and every way a host comes under a policy sends
    it one (a network's first policy, a join, a policy cleared)."""
    if raw.get("kind") == "delta":
        return {**raw, "protocol": 4}
    sections = dict(raw.get("sections") or {})
    sections["firewall"] = {cidr: {"allow": ["any"]} for cidr in ALLOW_EVERYTHING}
    return {**raw, "protocol": 4, "sections": sections}


def _v4_to_v5(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 5 added gateways (the `egress`, `forward` and `exit` sections)
    and DNS (`dns`, `dns_zones`): a version-4 message has none of them, which
    is what it meant (no ranges through gateways, nothing forwarded, no names:
    the agent serves nothing and leaves the host's resolver as it is)."""
    return {**raw, "protocol": 5}


def _v5_to_v6(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 6 added external clients (the `clients` section, on ingress
    gateways) and NAT traversal (the `paths` section): a version-5 message has
    none of them, which is what it meant (no clients; every peer at its
    `peers` endpoint)."""
    return {**raw, "protocol": 6}


def _v6_to_v7(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 7 added relays (the `relays` section on relay hosts, `relay`
    in a `paths` entry): a version-6 message has none, which is what it meant."""
    return {**raw, "protocol": 7}


# The firewall of a host that enforces no policy (what version 3 meant).
ALLOW_EVERYTHING = ("0.0.0.0/0", "::/0")

_UPCASTS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: _v1_to_v2,
    2: _v2_to_v3,
    3: _v3_to_v4,
    4: _v4_to_v5,
    5: _v5_to_v6,
    6: _v6_to_v7,
}


def upcast(raw: dict[str, Any]) -> dict[str, Any]:
    """An older message's raw dict as today's version would write it."""
    version = raw.get("protocol", 1) if "kind" in raw else 1
    if not isinstance(version, int) or version < 1:
        version = 1
    while version < PROTOCOL:
        step = _UPCASTS.get(version)
        if step is None:  # pragma: no cover - every version below PROTOCOL has a step
            raise msgspec.ValidationError(f"no upcast from desired-state protocol {version}")
        raw = step(raw)
        version = int(raw["protocol"])
    return raw


# Header on every desired-state message, so that the control plane can learn
# each host's published revision from a headers-only scan of the stream.
REVISION_HEADER = "Netmesh-Revision"
