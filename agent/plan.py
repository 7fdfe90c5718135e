"""plan(desired, actual) -> ops: what to change so the machine is as desired.

One pure planner per part of the machine the agent owns (the firewall, the
WireGuard device, the link and its addresses, the peers, the routes): each is one
reconciler's plan (agent/reconcile.py), and `plan` is the WireGuard device's and
link's in order (the firewall, like Tailscale's router config beside wgcfg, is
planned apart: `plan_firewall`). Pure and typed; every op prints itself, so
the plan that is applied is also what is logged and shown (`--dry-run` for
free). Rules that keep tunnels up:

- touch only what differs: an unchanged peer is never written;
- a peer is changed in place (its allowed IPs replaced), never removed and
  re-added, so its session survives;
- add before delete: new addresses and peers come before old ones go;
- an endpoint is written when a peer is added or when the control plane changed
  it, not whenever WireGuard's roaming moved it (that would fight the roaming).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agent.backend import DeviceState, PeerSpec, PeerState
from agent.dns import DnsOp, DnsState
from agent.firewall import FirewallState, Ruleset, cached_ruleset_for, in_force
from agent.link import LinkState
from events.desired import DesiredState, FirewallEntry, PeerEntry


@dataclass(frozen=True)
class Actual:
    """What is on the machine now. `device`/`link` are None when the interface is absent.

    `interface` is the overlay interface's name; `firewall` the agent's nftables
    table (None: no table), and `firewall_error` why it could not be read (then
    the firewall is planned as if it had to be installed: the apply says why
    it cannot be, and the other parts go on)."""

    device: DeviceState | None
    link: LinkState | None
    interface: str = ""
    firewall: FirewallState | None = None
    firewall_error: str | None = None
    dns: DnsState | None = None  # None: no DNS control (see agent/dns.py)


@dataclass(frozen=True)
class CreateInterface:
    def __str__(self) -> str:
        return "create interface"


@dataclass(frozen=True)
class SetPrivateKey:
    public_key: str  # of the key being set: the private key itself is never printed

    def __str__(self) -> str:
        return f"set private key (public {self.public_key})"


@dataclass(frozen=True)
class SetListenPort:
    port: int

    def __str__(self) -> str:
        return f"set listen port {self.port}"


@dataclass(frozen=True)
class SetMtu:
    mtu: int

    def __str__(self) -> str:
        return f"set mtu {self.mtu}"


@dataclass(frozen=True)
class SetUp:
    def __str__(self) -> str:
        return "set link up"


@dataclass(frozen=True)
class AddAddress:
    cidr: str

    def __str__(self) -> str:
        return f"add address {self.cidr}"


@dataclass(frozen=True)
class RemoveAddress:
    cidr: str

    def __str__(self) -> str:
        return f"remove address {self.cidr}"


@dataclass(frozen=True)
class UpsertPeer:
    peer: PeerSpec
    name: str
    new: bool

    def __str__(self) -> str:
        verb = "add" if self.new else "update"
        endpoint = f" endpoint {self.peer.endpoint}" if self.peer.endpoint else ""
        return (
            f"{verb} peer {self.name or '?'} {self.peer.public_key} "
            f"allowed {','.join(self.peer.allowed_ips)}{endpoint} "
            f"keepalive {self.peer.persistent_keepalive}"
        )


@dataclass(frozen=True)
class RemovePeer:
    public_key: str

    def __str__(self) -> str:
        return f"remove peer {self.public_key}"


@dataclass(frozen=True)
class AddRoute:
    cidr: str

    def __str__(self) -> str:
        return f"add route {self.cidr}"


@dataclass(frozen=True)
class RemoveRoute:
    cidr: str

    def __str__(self) -> str:
        return f"remove route {self.cidr}"


@dataclass(frozen=True)
class ReplaceFirewall:
    ruleset: Ruleset

    def __str__(self) -> str:
        return f"replace firewall on {self.ruleset.interface}: {self.ruleset}"


Op = (
    ReplaceFirewall
    | CreateInterface
    | SetPrivateKey
    | SetListenPort
    | SetMtu
    | SetUp
    | AddAddress
    | RemoveAddress
    | UpsertPeer
    | RemovePeer
    | AddRoute
    | RemoveRoute
    | DnsOp
)


def plan_firewall(desired: DesiredState, actual: Actual) -> list[Op]:
    """The agent's nftables table, whole: installed whenever the agent holds a
    desired state (the interface exists or is made in this pass; an empty
    section still lets replies in and nothing new), replaced when what is in
    force is not exactly the desired ruleset (digest and shape, see
    agent/firewall.py). Removed only with the interface (`agent down`)."""
    entries = desired.sections.firewall
    if actual.firewall_error is not None and entries and lets_everything_in(entries):
        # nftables cannot be read (not installed, no permission), and nothing
        # needs filtering: every source the section names may send anything,
        # and WireGuard admits no other source. Not a failure, so a host
        # without nft keeps working in networks without a policy.
        return []
    ruleset = cached_ruleset_for(entries, actual.interface)
    if actual.firewall_error is None and in_force(actual.firewall, ruleset):
        return []
    return [ReplaceFirewall(ruleset)]


def lets_everything_in(entries: Mapping[str, FirewallEntry]) -> bool:
    """Whether a firewall section filters nothing (every entry allows any)."""
    return all("any" in entry.allow for entry in entries.values())


def plan_interface(desired: DesiredState, actual: Actual, *, public_key: str) -> list[Op]:
    """The WireGuard device itself: there, with our key and the listen port."""
    ops: list[Op] = []
    device = actual.device
    if device is None or actual.link is None:
        ops.append(CreateInterface())
    if device is None or device.public_key != public_key:
        ops.append(SetPrivateKey(public_key))
    if device is None or device.listen_port != desired.interface.listen_port:
        ops.append(SetListenPort(desired.interface.listen_port))
    return ops


def plan_link(desired: DesiredState, actual: Actual) -> list[Op]:
    """The link: MTU, addresses (add before delete), administratively up."""
    ops: list[Op] = []
    # No device: the interface reconciler makes one (replacing any link of that
    # name whose device it could not reach), so the link read is not the one
    # these ops will meet: plan them all (each is idempotent).
    link = actual.link if actual.device is not None else None
    if link is None or link.mtu != desired.interface.mtu:
        ops.append(SetMtu(desired.interface.mtu))
    have_addresses = set(link.addresses) if link else set()
    want_addresses = set(desired.sections.addresses)
    stale = have_addresses - want_addresses
    # The kernel knows an address by its IP, not its prefix: one whose prefix
    # changes must go before it can come back (add-before-delete cannot apply).
    wanted_ips = {a.split("/")[0] for a in want_addresses}
    reprefixed = sorted(a for a in stale if a.split("/")[0] in wanted_ips)
    ops.extend(RemoveAddress(a) for a in reprefixed)
    ops.extend(AddAddress(a) for a in sorted(want_addresses - have_addresses))
    ops.extend(RemoveAddress(a) for a in sorted(stale - set(reprefixed)))
    if link is None or not link.up:
        ops.append(SetUp())
    return ops


def plan_peers(
    desired: DesiredState, actual: Actual, *, previous: DesiredState | None = None
) -> list[Op]:
    """Peers changed in place, added before the stale ones go."""
    ops: list[Op] = []
    device = actual.device
    have_peers = {p.public_key: p for p in device.peers} if device else {}
    before = previous.peers if previous else {}
    for key, peer in sorted(desired.peers.items()):
        op = _peer_op(key, peer, have_peers.get(key), before.get(key))
        if op is not None:
            ops.append(op)
    ops.extend(RemovePeer(k) for k in sorted(set(have_peers) - set(desired.peers)))
    return ops


def plan_routes(desired: DesiredState, actual: Actual) -> list[Op]:
    """Routes through the interface: only those the agent made are read back
    (`LinkState.routes`), so only those can be removed."""
    # No device: a new link will be made (see `plan_link`), with no routes yet.
    have = set(actual.link.routes) if actual.link and actual.device else set()
    want = set(desired.sections.routes)
    ops: list[Op] = [AddRoute(r) for r in sorted(want - have)]
    ops.extend(RemoveRoute(r) for r in sorted(have - want))
    return ops


def plan(
    desired: DesiredState,
    actual: Actual,
    *,
    public_key: str,
    previous: DesiredState | None = None,
) -> list[Op]:
    """The WireGuard device's and link's ops (every section but the firewall),
    in the order the agent applies them; empty when nothing differs.

    `public_key` is this host's own key (the device must hold its private half);
    `previous` is the desired state last applied, used to tell a control-plane
    endpoint change from WireGuard roaming.
    """
    return [
        *plan_interface(desired, actual, public_key=public_key),
        *plan_link(desired, actual),
        *plan_peers(desired, actual, previous=previous),
        *plan_routes(desired, actual),
    ]


def _peer_op(
    key: str, peer: PeerEntry, have: PeerState | None, before: PeerEntry | None
) -> UpsertPeer | None:
    allowed = tuple(sorted(peer.allowed_ips))
    if have is None:
        spec = PeerSpec(
            public_key=key,
            allowed_ips=allowed,
            endpoint=peer.endpoint,
            persistent_keepalive=peer.persistent_keepalive,
        )
        return UpsertPeer(spec, peer.name, new=True)
    endpoint_moved = peer.endpoint is not None and (
        (before is None and have.endpoint is None)
        or (before is not None and before.endpoint != peer.endpoint)
    )
    if (
        tuple(sorted(have.allowed_ips)) == allowed
        and have.persistent_keepalive == peer.persistent_keepalive
        and not (endpoint_moved and have.endpoint != peer.endpoint)
    ):
        return None
    spec = PeerSpec(
        public_key=key,
        allowed_ips=allowed,
        endpoint=peer.endpoint if endpoint_moved else None,
        persistent_keepalive=peer.persistent_keepalive,
    )
    return UpsertPeer(spec, peer.name, new=False)
