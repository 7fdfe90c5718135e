"""One reconciler per part of the machine the agent owns, run in one pass.

Each reconciler plans from the same reading of the machine (read once: reading
a 1,000-peer device costs ~10 ms) with its own pure planner, applies its own
ops, and reports its own outcome. One failing does not stop the others: a
route that cannot be added leaves the peers in place and up to date. Like
Tailscale's split of the WireGuard config from the router's, each part of the
desired state has its owner here:

| reconciler | sections it reads | what it owns |
| --- | --- | --- |
| firewall | firewall, forward | the nftables table `inet netmesh` (agent/firewall.py) |
| interface | interface, exit | the WireGuard device: there, our key, listen port, fwmark |
| link | interface (mtu), addresses | MTU, addresses, link up |
| peers | peers, egress, clients | the device's peers, in place (egress ranges, ingress clients) |
| routes | routes | routes through the interface that the agent added |
| exit | exit | rules and a table sending the default route into the tunnel (agent/exit.py) |
| forwarding | forward | IPv4 forwarding where a gateway needs it, put back after |
| dns | dns, dns_zones | its DNS server on the overlay addresses; its line in the host's resolver |
| relays | relays | a relay's UDP ports forwarding pairs' WireGuard datagrams (agent/relay.py) |

The firewall goes first: whatever the pass brings up (the interface, new
peers) meets the filter already in force. DNS goes last: it serves on the
addresses the link reconciler has just put on the interface. The relays touch
nothing else on the machine (their own sockets, in the agent's process).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.apply import apply, read_actual
from agent.backend import WireGuardBackend
from agent.dns import DnsControl, plan_dns
from agent.egress import choose, with_egress
from agent.exit import ExitControl
from agent.firewall import FirewallControl
from agent.forwarding import ForwardingControl
from agent.ingress import with_clients
from agent.link import LinkControl
from agent.plan import (
    Actual,
    Op,
    plan_exit,
    plan_firewall,
    plan_forwarding,
    plan_interface,
    plan_link,
    plan_peers,
    plan_routes,
)
from agent.relay import RelayControl, plan_relay_section
from events.desired import DesiredState

# (desired, actual, desired last applied by this reconciler, own public key) -> ops
Planner = Callable[[DesiredState, Actual, DesiredState | None, str], list[Op]]


@dataclass(frozen=True)
class Reconciler:
    name: str
    plan: Planner
    # The sections of the desired state it enforces (agents tell the control
    # plane these: a section nobody enforces must not pass for understood).
    sections: tuple[str, ...]


def _plan_peers(desired: DesiredState, actual: Actual, previous: DesiredState | None) -> list[Op]:
    """The peers, with each egress range on the gateway chosen for it, and
    the external clients this host takes in (an ingress gateway)."""
    desired = with_clients(desired)
    chosen = choose(desired.sections.egress, lambda key: key not in actual.dead_gateways)
    for cidr, entry in desired.sections.exit.items():
        chosen[cidr] = entry.peer
    return plan_peers(with_egress(desired, chosen), actual, previous=previous)


RECONCILERS: tuple[Reconciler, ...] = (
    Reconciler("firewall", lambda d, a, _prev, _key: plan_firewall(d, a), ("firewall", "forward")),
    Reconciler(
        "interface",
        lambda d, a, _, key: plan_interface(d, a, public_key=key),
        ("interface",),
    ),
    Reconciler("link", lambda d, a, _prev, _key: plan_link(d, a), ("interface", "addresses")),
    # `paths` (NAT traversal) is chosen into the peers' endpoints by the daemon (agent/nat.py).
    Reconciler(
        "peers",
        lambda d, a, prev, _key: _plan_peers(d, a, prev),
        ("peers", "egress", "clients", "paths"),
    ),
    Reconciler("routes", lambda d, a, _prev, _key: plan_routes(d, a), ("routes",)),
    Reconciler("exit", lambda d, a, _prev, _key: plan_exit(d, a), ("exit",)),
    Reconciler("forwarding", lambda d, a, _prev, _key: plan_forwarding(d, a), ("forward",)),
    Reconciler("dns", lambda d, a, _prev, _key: [*plan_dns(d, a.dns)], ("dns", "dns_zones")),
    Reconciler("relays", lambda d, a, _prev, _key: [*plan_relay_section(d, a.relays)], ("relays",)),
)
# Every section some reconciler enforces.
ENFORCED_SECTIONS: tuple[str, ...] = tuple(
    sorted({name for reconciler in RECONCILERS for name in reconciler.sections})
)


@dataclass(frozen=True)
class Outcome:
    """What one reconciler did in a pass."""

    name: str
    ops: tuple[Op, ...]
    applied: int  # ops carried out, in order
    error: str | None = None  # the op that failed and why

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PassResult:
    actual: Actual  # the machine as read at the start of the pass
    outcomes: tuple[Outcome, ...]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)

    @property
    def ops(self) -> int:
        return sum(len(o.ops) for o in self.outcomes)

    def errors(self) -> dict[str, str]:
        return {o.name: o.error for o in self.outcomes if o.error is not None}


async def reconcile(
    desired: DesiredState,
    backend: WireGuardBackend,
    link: LinkControl,
    *,
    firewall: FirewallControl,
    forwarding: ForwardingControl | None = None,
    dead_gateways: frozenset[str] = frozenset(),
    exit_routing: ExitControl | None = None,
    exempt: tuple[str, ...] = (),
    dns: DnsControl | None = None,
    relays: RelayControl | None = None,
    public_key: str,
    private_key: str,
    previous: dict[str, DesiredState],
    reconcilers: tuple[Reconciler, ...] = RECONCILERS,
    on_op: Callable[[str, Op], None] | None = None,
) -> PassResult:
    """Read the machine once, then plan and apply each reconciler in turn.

    `previous` holds, per reconciler, the desired state it last applied in
    full (to tell a control-plane endpoint change from roaming). Raises
    BackendError only when the machine cannot be read at all."""
    actual = await read_actual(
        backend,
        link,
        firewall,
        forwarding=forwarding,
        forwarded=tuple(desired.sections.forward),
        exit_routing=exit_routing,
        dns=dns,
        relays=relays,
    )
    if dead_gateways or exempt:
        actual = replace(actual, dead_gateways=dead_gateways, exempt=exempt)
    outcomes = []
    for reconciler in reconcilers:
        ops = reconciler.plan(desired, actual, previous.get(reconciler.name), public_key)
        if not ops:
            outcomes.append(Outcome(reconciler.name, (), 0))
            continue
        for op in ops:
            if on_op is not None:
                on_op(reconciler.name, op)
        # apply() reports a BackendError in its result: how far it got, and why.
        result = await apply(
            ops,
            backend,
            link,
            private_key,
            firewall,
            forwarding=forwarding,
            exit_routing=exit_routing,
            dns=dns,
            relays=relays,
        )
        error = None if result.ok else f"{ops[result.applied]}: {result.error}"
        outcomes.append(Outcome(reconciler.name, tuple(ops), result.applied, error))
    return PassResult(actual, tuple(outcomes))
