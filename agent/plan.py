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

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from agent.backend import DeviceState, PeerSpec, PeerState
from agent.dns import DnsOp, DnsState
from agent.exit import EXIT_MARK, ExitRule, ExitState, wanted_rules
from agent.firewall import FirewallState, Ruleset, cached_ruleset_for, in_force
from agent.forwarding import ForwardingState
from agent.link import LinkState
from agent.relay import RelayOp, RelayState
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
    # IPv4 forwarding where a gateway needs it (None: not read, or unreadable:
    # `forwarding_error` says why).
    forwarding: ForwardingState | None = None
    forwarding_error: str | None = None
    # Gateways taken for gone (agent/egress.py: their ranges go to the next one).
    dead_gateways: frozenset[str] = frozenset()
    # The exit-node routing rules the agent made (None: not read, or unreadable:
    # `exit_error` says why), and the brokers' addresses that stay off the tunnel.
    exit: ExitState | None = None
    exit_error: str | None = None
    exempt: tuple[str, ...] = ()
    dns: DnsState | None = None  # None: no DNS control (see agent/dns.py)
    relays: RelayState | None = None  # None: no relay control (see agent/relay.py)


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
class SetFwmark:
    mark: int

    def __str__(self) -> str:
        return f"set fwmark {self.mark:#x}" if self.mark else "clear fwmark"


@dataclass(frozen=True)
class AddExitRule:
    rule: ExitRule

    def __str__(self) -> str:
        return f"add rule {self.rule}"


@dataclass(frozen=True)
class RemoveExitRule:
    rule: ExitRule

    def __str__(self) -> str:
        return f"remove rule {self.rule}"


@dataclass(frozen=True)
class AddExitRoute:
    def __str__(self) -> str:
        return "add default route through the interface (exit table)"


@dataclass(frozen=True)
class RemoveExitRoute:
    def __str__(self) -> str:
        return "remove the exit table's default route"


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


@dataclass(frozen=True)
class EnableForwarding:
    interface: str

    def __str__(self) -> str:
        return f"enable ipv4 forwarding on {self.interface}"


@dataclass(frozen=True)
class RestoreForwarding:
    interface: str

    def __str__(self) -> str:
        return f"restore ipv4 forwarding on {self.interface} to what it was"


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
    | EnableForwarding
    | RestoreForwarding
    | SetFwmark
    | AddExitRule
    | RemoveExitRule
    | AddExitRoute
    | RemoveExitRoute
    | DnsOp
    | RelayOp
)


def plan_firewall(desired: DesiredState, actual: Actual) -> list[Op]:
    """The agent's nftables table, whole: installed whenever the agent holds a
    desired state (the interface exists or is made in this pass; an empty
    section still lets replies in and nothing new), replaced when what is in
    force is not exactly the desired ruleset (digest and shape, see
    agent/firewall.py). Removed only with the interface (`agent down`)."""
    entries = desired.sections.firewall
    forward = desired.sections.forward
    if (
        actual.firewall_error is not None
        and entries
        and lets_everything_in(entries)
        and not forward
    ):
        # nftables cannot be read (not installed, no permission), and nothing
        # needs filtering: every source the section names may send anything,
        # and WireGuard admits no other source. Not a failure, so a host
        # without nft keeps working in networks without a policy.
        return []
    ruleset = cached_ruleset_for(
        entries, actual.interface, forward, _overlay(desired), guarded(desired, actual)
    )
    if actual.firewall_error is None and in_force(actual.firewall, ruleset):
        return []
    return [ReplaceFirewall(ruleset)]


def _overlay(desired: DesiredState) -> tuple[str, ...]:
    """The host's networks (what a gateway masquerades from)."""
    if not desired.sections.forward:
        return ()
    return tuple(
        sorted({str(ipaddress.ip_network(a, strict=False)) for a in desired.sections.addresses})
    )


def guarded(desired: DesiredState, actual: Actual) -> tuple[str, ...]:
    """The interfaces a gateway's ranges go out of that did not forward
    before the agent switched them on: the forward chain keeps them from
    forwarding anything else (agent/forwarding.py)."""
    state = actual.forwarding
    if state is None or not desired.sections.forward:
        return ()
    found = set()
    for cidr in desired.sections.forward:
        name = state.route_interfaces.get(cidr)
        if name is None or name == actual.interface:
            continue
        if not state.originals.get(name, state.forwarding.get(name, False)):
            found.add(name)
    return tuple(sorted(found))


def plan_forwarding(desired: DesiredState, actual: Actual) -> list[Op]:
    """IPv4 forwarding on the overlay interface and on each interface a
    forwarded range goes out of, while the host is a gateway; put back as
    it was on every interface that no range needs any more."""
    forward = desired.sections.forward
    state = actual.forwarding
    if state is None:
        # Unreadable: try, and let the apply say why it cannot be done.
        return [EnableForwarding(actual.interface)] if forward else []
    needed = set()
    if forward:
        needed.add(actual.interface)
        needed.update(state.route_interfaces[c] for c in forward if c in state.route_interfaces)
    ops: list[Op] = [
        EnableForwarding(name) for name in sorted(needed) if not state.forwarding.get(name, False)
    ]
    ops.extend(RestoreForwarding(name) for name in sorted(state.originals) if name not in needed)
    return ops


def plan_exit(desired: DesiredState, actual: Actual) -> list[Op]:
    """The exit-node rules and route (agent/exit.py): the route and the rules
    that keep the tunnel and the brokers on the underlay go first, the rule
    that sends everything into the tunnel last; going back, that rule first."""
    state = actual.exit
    if state is None:
        # Unreadable: try, and let the apply say why it cannot be done.
        return [AddExitRoute()] if desired.sections.exit else []
    want = wanted_rules(actual.exempt) if desired.sections.exit else frozenset()
    exit_rule = ExitRule("exit")
    ops: list[Op] = []
    if want:
        if not state.route:
            ops.append(AddExitRoute())
        ops.extend(AddExitRule(r) for r in sorted(want - state.rules) if r != exit_rule)
        if exit_rule not in state.rules:
            ops.append(AddExitRule(exit_rule))
    elif exit_rule in state.rules:
        ops.append(RemoveExitRule(exit_rule))
    ops.extend(RemoveExitRule(r) for r in sorted(state.rules - want) if r != exit_rule)
    if not want and state.route:
        ops.append(RemoveExitRoute())
    return ops


def wanted_fwmark(desired: DesiredState, actual: Actual) -> int:
    """The device's mark: set while the host exits through a gateway, and
    kept until the rule sending everything into the tunnel is gone (unmarked,
    the tunnel's own packets would follow it)."""
    exiting = actual.exit is not None and ExitRule("exit") in actual.exit.rules
    return EXIT_MARK if desired.sections.exit or exiting else 0


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
    mark = wanted_fwmark(desired, actual)
    if (device.fwmark if device is not None else 0) != mark:
        ops.append(SetFwmark(mark))
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
