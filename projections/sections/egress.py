"""Egress gateways, as three sections of the desired state.

A gateway node forwards to ranges beyond the overlay (a LAN, a VPC). Every
other member of its network that may use a range gets:

- `routes[range]`: the range routed through the overlay interface;
- `egress[range]`: the gateways forwarding to it, best first (metric, then
  key). The agent puts the range in the allowed IPs of the first one it finds
  alive, so two gateways of one range fail over without the control plane.

The gateway itself gets `forward[range]`: masquerade or not, and which
sources may send what there (its own nftables forward chain enforces it).

Who may use a range: everyone in a network without a policy. Under a policy,
a member whose rules reach the range (a destination `*` or a CIDR selector
overlapping it) and who sees the gateway (a rule between the two: they must
be peers for the range to ride on the gateway's peer entry).

The internet (`0.0.0.0/0`, `::/0`) is never pushed on everyone: a range that
holds every address is left out of members' routes (using it is opt-in).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from events.desired import (
    EgressEntry,
    EgressVia,
    ExitEntry,
    ForwardEntry,
    ForwardRule,
    RouteEntry,
)
from events.model import (
    ClientCreated,
    ClientRemoved,
    EgressAdded,
    EgressRemoved,
    Event,
    ExitCleared,
    ExitSet,
    HostKeyRotated,
    IngressRemoved,
    NodeJoined,
    NodeRemoved,
    NodeTagged,
    NodeUntagged,
    PolicySet,
)
from projections.sections.base import Reread
from projections.sections.ingress import (
    client_forwarding,
    client_rereads,
    forward_rereads,
    ingress_hosts,
    reached_clients,
)
from projections.sections.reach import (
    INTERNET,
    all_ranges,
    forward_rules,
    forwarded,
    gateway_host,
    may_use,
    network_named,
    offered,
    sees,
)
from projections.topology import Topology


class _OfferedSection:
    """What `routes` and `egress` share: both hold exactly the offered ranges,
    and the same events move them."""

    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        EgressAdded,
        EgressRemoved,
        NodeRemoved,
        HostKeyRotated,
        NodeTagged,
        NodeUntagged,
        PolicySet,
    )
    name: ClassVar[str]

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._offered: dict[str, dict[str, list[EgressVia]]] = {}

    def offered(self, host_id: str) -> dict[str, list[EgressVia]]:
        if host_id not in self._offered:
            self._offered[host_id] = offered(self.topology, host_id)
        return self._offered[host_id]

    @classmethod
    def rereads(cls, topology: Topology, event: Event) -> Sequence[Reread]:
        match event:
            case EgressAdded(network=network, node_id=node_id, ranges=ranges):
                gateway = network_named(topology, network).gateways.get(node_id)
                keys = frozenset(ranges) | frozenset(gateway.ranges if gateway else ())
                return (Reread(cls.name, keys, networks=frozenset((network,))),)
            case EgressRemoved(network=network, ranges=ranges):
                return (Reread(cls.name, frozenset(ranges), networks=frozenset((network,))),)
            case NodeRemoved(network=network, node_id=node_id):
                departed = network_named(topology, network).departed_gateway
                if departed is None or departed.node_id != node_id:
                    return ()
                keys = frozenset(departed.ranges)
                return (Reread(cls.name, keys, networks=frozenset((network,))),)
            case HostKeyRotated(host_id=host_id):
                # Members name the gateway by its key.
                return [
                    Reread(cls.name, frozenset(g.ranges), networks=frozenset((n.network,)))
                    for n in topology.nodes_of_host(host_id)
                    if (g := network_named(topology, n.network).gateways.get(n.node_id)) is not None
                ]
            case (
                NodeTagged(network=network)
                | NodeUntagged(network=network)
                | PolicySet(network=network)
            ):
                # Who may use which range moved: every range of the network,
                # for the node tagged, or for everyone when it is a gateway
                # (who sees it may have moved).
                net = network_named(topology, network)
                keys = all_ranges(net)
                if not keys:
                    return ()
                if isinstance(event, PolicySet) or event.node_id in net.gateways:
                    return (Reread(cls.name, keys, networks=frozenset((network,))),)
                return (Reread(cls.name, keys, hosts=frozenset((event.host_id,))),)
        return ()


class RouteSection(_OfferedSection):
    """`routes`: the ranges this host reaches through gateways."""

    name: ClassVar[str] = "routes"

    def entries(self, host_id: str) -> dict[str, RouteEntry]:
        return {cidr: RouteEntry() for cidr in sorted(self.offered(host_id))}

    def entry(self, host_id: str, key: str) -> RouteEntry | None:
        return RouteEntry() if key in self.offered(host_id) else None


class EgressSection(_OfferedSection):
    """`egress`: the gateways of each range this host reaches, best first,
    and the ingress gateway of each external client it reaches (by the
    client's ip/32: its address rides on that gateway's allowed IPs)."""

    name: ClassVar[str] = "egress"
    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        *_OfferedSection.reacts_to,
        ClientCreated,
        ClientRemoved,
        IngressRemoved,
    )

    def __init__(self, topology: Topology) -> None:
        super().__init__(topology)
        self._reached: dict[str, dict[str, list[EgressVia]]] = {}

    def reached(self, host_id: str) -> dict[str, list[EgressVia]]:
        if host_id not in self._reached:
            clients = reached_clients(self.topology, host_id)
            self._reached[host_id] = {**self.offered(host_id), **clients}
        return self._reached[host_id]

    def entries(self, host_id: str) -> dict[str, EgressEntry]:
        return {
            cidr: EgressEntry(via=tuple(sorted(via)))
            for cidr, via in sorted(self.reached(host_id).items())
        }

    def entry(self, host_id: str, key: str) -> EgressEntry | None:
        via = self.reached(host_id).get(key)
        return EgressEntry(via=tuple(sorted(via))) if via else None

    @classmethod
    def rereads(cls, topology: Topology, event: Event) -> Sequence[Reread]:
        return [*super().rereads(topology, event), *client_rereads(topology, event, cls.name)]


class ForwardSection:
    """`forward`: the ranges this host forwards to, as an egress gateway, and
    what it forwards for its external clients, as an ingress gateway."""

    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        EgressAdded,
        EgressRemoved,
        NodeJoined,
        NodeRemoved,
        NodeTagged,
        NodeUntagged,
        PolicySet,
        ClientCreated,
        ClientRemoved,
        IngressRemoved,
    )
    name: ClassVar[str] = "forward"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._clients: dict[str, dict[str, tuple[bool, set[ForwardRule]]]] = {}

    def for_clients(self, host_id: str) -> dict[str, tuple[bool, set[ForwardRule]]]:
        if host_id not in self._clients:
            self._clients[host_id] = client_forwarding(self.topology, host_id)
        return self._clients[host_id]

    def entries(self, host_id: str) -> dict[str, ForwardEntry]:
        found: dict[str, ForwardEntry] = {}
        keys = forwarded(self.topology, host_id) | set(self.for_clients(host_id))
        for cidr in sorted(keys):
            entry = self.entry(host_id, cidr)
            if entry is not None:
                found[cidr] = entry
        return found

    def entry(self, host_id: str, key: str) -> ForwardEntry | None:
        nat = False
        rules: set[ForwardRule] = set()
        seen = False
        for node in self.topology.nodes_of_host(host_id):
            network = self.topology.networks.get(node.network)
            gateway = network.gateways.get(node.node_id) if network is not None else None
            if network is None or gateway is None or key not in gateway.ranges:
                continue
            seen = True
            nat = nat or gateway.nat
            rules.update(forward_rules(network, gateway, key))
        exclusive, for_clients = self.for_clients(host_id).get(key, (False, set()))
        if not seen and not for_clients:
            return None
        rules.update(for_clients)
        ordered = sorted(rules, key=lambda r: (r.destination, r.sources, r.allow))
        return ForwardEntry(nat=nat, rules=tuple(ordered), exclusive=exclusive)

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        found = list(forward_rereads(topology, event, ForwardSection.name))
        match event:
            case EgressAdded(network=network, node_id=node_id, host_id=host_id, ranges=ranges):
                gateway = network_named(topology, network).gateways.get(node_id)
                keys = frozenset(ranges) | frozenset(gateway.ranges if gateway else ())
                found.append(Reread(ForwardSection.name, keys, hosts=frozenset((host_id,))))
                # Ingress gateways' clients reach the ranges too.
                found.extend(_ingress_rereads(topology, network, frozenset(ranges)))
            case EgressRemoved(network=network, host_id=host_id, ranges=ranges):
                found.append(
                    Reread(ForwardSection.name, frozenset(ranges), hosts=frozenset((host_id,)))
                )
                found.extend(_ingress_rereads(topology, network, frozenset(ranges)))
            case (
                NodeJoined(network=network)
                | NodeRemoved(network=network)
                | NodeTagged(network=network)
                | NodeUntagged(network=network)
                | PolicySet(network=network)
            ):
                # Under a policy, a member's arrival, departure or tags move
                # the sources of the gateways' rules, and who may reach clients.
                net = network_named(topology, network)
                if isinstance(event, NodeRemoved) and net.departed_gateway is not None:
                    found.extend(
                        _ingress_rereads(topology, network, frozenset(net.departed_gateway.ranges))
                    )
                if net.access is None and not isinstance(event, PolicySet):
                    return found
                found.extend(
                    Reread(ForwardSection.name, frozenset(g.ranges), hosts=frozenset((host[0],)))
                    for g in net.gateways.values()
                    if (host := gateway_host(topology, g)) is not None
                )
                # An ingress gateway's: who reaches its clients, and which of
                # the network's ranges it (so its clients) may use.
                shared = frozenset((net.cidr,)) | all_ranges(net)
                found.extend(
                    Reread(ForwardSection.name, keys | shared, hosts=frozenset((host,)))
                    for host, keys in ingress_hosts(topology, network).items()
                )
        return found


def _ingress_rereads(topology: Topology, network: str, ranges: frozenset[str]) -> list[Reread]:
    """The ingress gateways of `network` with clients re-read `ranges` (their
    clients' rules towards the ranges they reach)."""
    return [
        Reread(ForwardSection.name, ranges, hosts=frozenset((host,)))
        for host in ingress_hosts(topology, network)
    ]


class ExitSection:
    """`exit`: the internet gateway this host's default route goes through
    (`netmesh node exit`), while it is one and this host may use it."""

    reacts_to: ClassVar[tuple[type[Event], ...]] = (
        ExitSet,
        ExitCleared,
        EgressAdded,
        EgressRemoved,
        NodeRemoved,
        HostKeyRotated,
        NodeTagged,
        NodeUntagged,
        PolicySet,
    )
    name: ClassVar[str] = "exit"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def entries(self, host_id: str) -> dict[str, ExitEntry]:
        entry = self.entry(host_id, INTERNET)
        return {INTERNET: entry} if entry is not None else {}

    def entry(self, host_id: str, key: str) -> ExitEntry | None:
        if key != INTERNET:
            return None
        for node in self.topology.nodes_of_host(host_id):  # by network name: one wins
            network = self.topology.networks.get(node.network)
            gateway = network.gateways.get(node.exit_via) if network and node.exit_via else None
            if network is None or gateway is None or INTERNET not in gateway.ranges:
                continue
            peer = gateway_host(self.topology, gateway)
            if peer is None or peer[0] == host_id or not sees(network, node.node_id, gateway):
                continue
            if may_use(network, node.node_id, INTERNET):
                return ExitEntry(peer=peer[1])
        return None

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        keys = frozenset((INTERNET,))
        match event:
            case ExitSet(host_id=host_id) | ExitCleared(host_id=host_id):
                return (Reread(ExitSection.name, keys, hosts=frozenset((host_id,))),)
            case (
                EgressAdded(network=network, node_id=gateway)
                | EgressRemoved(network=network, node_id=gateway)
                | NodeRemoved(network=network, node_id=gateway)
            ):
                users = _exit_users(topology, network, {gateway})
            case HostKeyRotated(host_id=host_id):
                users = set()
                for node in topology.nodes_of_host(host_id):
                    users |= _exit_users(topology, node.network, {node.node_id})
            case (
                NodeTagged(network=network)
                | NodeUntagged(network=network)
                | PolicySet(network=network)
            ):
                users = _exit_users(topology, network, None)
            case _:
                return ()
        return (Reread(ExitSection.name, keys, hosts=frozenset(users)),) if users else ()


def _exit_users(topology: Topology, network: str, via: set[str] | None) -> set[str]:
    """Hosts whose nodes in `network` exit through one of `via` (None: any)."""
    return {
        node.host_id
        for node in topology.nodes_of_network(network)
        if node.exit_via and (via is None or node.exit_via in via)
    }
