"""Carry out a plan on the machine: WireGuard through the backend, the link
through rtnetlink, the firewall through nft, DNS through the agent's server
and the host's resolver. Device ops that follow each other
go in one backend call.

On failure it stops and says how far it got; the next pass re-reads the machine
and plans again from what is really there.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from agent.backend import BackendError, DeviceState, PeerSpec, WireGuardBackend
from agent.dns import DnsControl, PointResolver, RestoreResolver, ServeDns
from agent.exit import ExitControl, ExitError
from agent.firewall import FirewallControl, FirewallError
from agent.forwarding import ForwardingControl, ForwardingError
from agent.link import LinkControl, LinkState
from agent.plan import (
    Actual,
    AddAddress,
    AddExitRoute,
    AddExitRule,
    AddRoute,
    CreateInterface,
    EnableForwarding,
    Op,
    RemoveAddress,
    RemoveExitRoute,
    RemoveExitRule,
    RemovePeer,
    RemoveRoute,
    ReplaceFirewall,
    RestoreForwarding,
    SetFwmark,
    SetListenPort,
    SetMtu,
    SetPrivateKey,
    SetUp,
    UpsertPeer,
)
from agent.relay import CloseRelay, OpenRelay, RelayControl, RelayError, carry_out

DeviceOp = SetPrivateKey | SetListenPort | SetFwmark | UpsertPeer | RemovePeer


@dataclass(frozen=True)
class ApplyResult:
    applied: int  # ops carried out, in plan order
    error: BackendError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def read_actual(
    backend: WireGuardBackend,
    link: LinkControl,
    firewall: FirewallControl | None = None,
    *,
    forwarding: ForwardingControl | None = None,
    forwarded: tuple[str, ...] = (),
    exit_routing: ExitControl | None = None,
    dns: DnsControl | None = None,
    relays: RelayControl | None = None,
) -> Actual:
    """What is on the machine now. The device is read once: `exists()` is itself
    a read, and reading a 1,000-peer device twice doubled an agent's pass.
    A firewall that cannot be read (no nft) is said in `firewall_error`, not
    raised: it is the firewall reconciler's failure, not the whole pass's."""
    device: DeviceState | None
    try:
        device = await backend.read()
    except BackendError:
        if await backend.exists():
            raise  # there, but unreadable: not the same as absent
        device = None
    link_state: LinkState | None = await link.state() if await link.exists() else None
    actual = Actual(
        device=device,
        link=link_state,
        interface=backend.interface,
        dns=await dns.read() if dns is not None else None,
        relays=await relays.read() if relays is not None else None,
    )
    if forwarding is not None:
        # `forwarded`: the ranges the host forwards to (whose routes matter).
        try:
            actual = replace(actual, forwarding=await forwarding.read(forwarded, backend.interface))
        except ForwardingError as exc:
            actual = replace(actual, forwarding_error=str(exc))
    if exit_routing is not None:
        try:
            actual = replace(actual, exit=await exit_routing.read())
        except ExitError as exc:
            actual = replace(actual, exit_error=str(exc))
    if firewall is None:
        return actual
    try:
        return replace(actual, firewall=await firewall.read())
    except FirewallError as exc:
        return replace(actual, firewall_error=str(exc))


async def apply(
    ops: list[Op],
    backend: WireGuardBackend,
    link: LinkControl,
    private_key: str,
    firewall: FirewallControl | None = None,
    *,
    forwarding: ForwardingControl | None = None,
    exit_routing: ExitControl | None = None,
    dns: DnsControl | None = None,
    relays: RelayControl | None = None,
) -> ApplyResult:
    done = 0
    i = 0
    try:
        while i < len(ops):
            op = ops[i]
            if isinstance(op, OpenRelay | CloseRelay):
                # Each pair on its own: one whose port cannot be bound does
                # not keep the others from being forwarded.
                start = i
                relay_ops: list[OpenRelay | CloseRelay] = []
                while i < len(ops) and isinstance(ops[i], OpenRelay | CloseRelay):
                    relay_ops.append(ops[i])  # type: ignore[arg-type]
                    i += 1
                failed = await carry_out(relays, relay_ops)
                if failed is not None:
                    return ApplyResult(start + failed[0], RelayError(failed[1], retryable=True))
                done += len(relay_ops)
                continue
            if isinstance(op, DeviceOp):
                group: list[DeviceOp] = []
                while i < len(ops) and isinstance(ops[i], DeviceOp):
                    group.append(ops[i])  # type: ignore[arg-type]
                    i += 1
                await _configure(backend, group, private_key)
                done += len(group)
                continue
            match op:
                case CreateInterface():
                    await backend.create()
                case SetMtu(mtu=mtu):
                    await link.set_mtu(mtu)
                case SetUp():
                    await link.set_up()
                case AddAddress(cidr=cidr):
                    await link.add_address(cidr)
                case RemoveAddress(cidr=cidr):
                    await link.remove_address(cidr)
                case AddRoute(cidr=cidr):
                    await link.add_route(cidr)
                case RemoveRoute(cidr=cidr):
                    await link.remove_route(cidr)
                case ReplaceFirewall(ruleset=ruleset):
                    if firewall is None:
                        raise FirewallError("no firewall to apply to", retryable=False)
                    await firewall.replace(ruleset)
                case AddExitRoute() | RemoveExitRoute() | AddExitRule() | RemoveExitRule():
                    if exit_routing is None:
                        raise ExitError("no exit routing control", retryable=False)
                    await _route_exit(exit_routing, op)
                case EnableForwarding(interface=name) | RestoreForwarding(interface=name):
                    if forwarding is None:
                        raise ForwardingError("no forwarding control", retryable=False)
                    if isinstance(op, EnableForwarding):
                        await forwarding.enable(name)
                    else:
                        await forwarding.restore(name)
                case ServeDns() | PointResolver() | RestoreResolver():
                    if dns is None:
                        raise BackendError("no DNS control to apply to", retryable=False)
                    await _dns(dns, op)
            done += 1
            i += 1
    except BackendError as exc:
        return ApplyResult(done, exc)
    return ApplyResult(done)


async def _route_exit(
    control: ExitControl, op: AddExitRoute | RemoveExitRoute | AddExitRule | RemoveExitRule
) -> None:
    match op:
        case AddExitRoute():
            await control.add_route()
        case RemoveExitRoute():
            await control.remove_route()
        case AddExitRule(rule=rule):
            await control.add_rule(rule)
        case RemoveExitRule(rule=rule):
            await control.remove_rule(rule)


async def _dns(dns: DnsControl, op: ServeDns | PointResolver | RestoreResolver) -> None:
    match op:
        case ServeDns(addresses=addresses, zone=zone):
            await dns.serve(addresses, zone)
        case PointResolver(routing=routing):
            await dns.point(routing)
        case RestoreResolver():
            await dns.restore()


async def _configure(backend: WireGuardBackend, group: list[DeviceOp], private_key: str) -> None:
    upserts: list[PeerSpec] = []
    removals: list[str] = []
    key: str | None = None
    port: int | None = None
    mark: int | None = None
    for op in group:
        match op:
            case SetPrivateKey():
                key = private_key
            case SetListenPort(port=p):
                port = p
            case SetFwmark(mark=m):
                mark = m
            case UpsertPeer(peer=peer):
                upserts.append(peer)
            case RemovePeer(public_key=public_key):
                removals.append(public_key)
    await backend.configure(
        private_key=key,
        listen_port=port,
        fwmark=mark,
        upsert_peers=tuple(upserts),
        remove_peers=tuple(removals),
    )
