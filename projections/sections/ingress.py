"""Ingress gateways and their external clients, in the desired state.

An external client (a phone, a stock WireGuard app) is a peer of its ingress
gateway only. So:

- the gateway gets `clients[key]`: the client as a WireGuard peer, allowed
  its address;
- every other member that may reach the client gets `egress[ip/32]` with the
  gateway as its one `via`: the agent puts the address in the gateway's
  allowed IPs, as it does for a range behind an egress gateway (the address
  is inside the network's CIDR, so no route is needed);
- the gateway forwards between its clients and the overlay (`forward`):
  to each client what may reach it (under a policy, what the policy's rules
  allow towards the client's address, and nothing else: the entry is
  `exclusive`), and from its clients to the network and to the ranges it
  reaches through other gateways (members' own firewalls, and those
  gateways' forward rules, judge what arrives).

Under a policy a client is selected by its address (a CIDR selector): a
member reaches it when a rule reaches the address and the member sees the
gateway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from events.desired import ClientEntry, EgressVia, ForwardRule
from events.model import (
    ClientCreated,
    ClientRemoved,
    Event,
    HostKeyRotated,
    IngressRemoved,
    NodeRemoved,
    NodeTagged,
    NodeUntagged,
    PolicySet,
)
from projections.sections.base import Reread
from projections.sections.reach import forward_rules, may_use, offered
from projections.topology import Client, Gateway, Network, Topology


def client_cidr(client: Client) -> str:
    return f"{client.address}/32"


def reached_clients(topology: Topology, host_id: str) -> dict[str, list[EgressVia]]:
    """Client address (ip/32) -> its gateway, for the clients `host_id`
    reaches through an ingress gateway on another host."""
    found: dict[str, list[EgressVia]] = {}
    for node in topology.nodes_of_host(host_id):
        network = topology.networks.get(node.network)
        if network is None or not network.clients:
            continue
        for client in network.clients.values():
            gateway = topology.nodes.get(client.via)
            host = topology.hosts.get(gateway.host_id) if gateway is not None else None
            if gateway is None or host is None or host.host_id == host_id:
                continue
            cidr = client_cidr(client)
            visible = network.access is None or network.access.sees(node.node_id, client.via)
            if visible and may_use(network, node.node_id, cidr):
                found[cidr] = [EgressVia(metric=0, peer=host.public_key)]
    return found


def own_clients(topology: Topology, host_id: str) -> list[tuple[Network, Client]]:
    """The clients whose ingress gateway is a node of `host_id`."""
    found: list[tuple[Network, Client]] = []
    for node in topology.nodes_of_host(host_id):
        network = topology.networks.get(node.network)
        if network is not None and node.node_id in network.ingress:
            found.extend((network, c) for c in network.clients_via(node.node_id))
    return found


def client_forwarding(topology: Topology, host_id: str) -> dict[str, tuple[bool, set[ForwardRule]]]:
    """What `host_id` forwards for its clients, by forward key: (exclusive,
    rules): towards each client, and from a network's clients to the network
    and to the ranges the host reaches through that network's other gateways."""
    found: dict[str, tuple[bool, set[ForwardRule]]] = {}
    by_network: dict[str, list[str]] = {}
    for network, client in own_clients(topology, host_id):
        cidr = client_cidr(client)
        by_network.setdefault(network.name, []).append(cidr)
        if network.access is None:
            towards = {ForwardRule(sources=(network.cidr,), destination=cidr, allow=("any",))}
        else:
            # As a gateway to the client's address: what the rules allow there.
            towards = set(forward_rules(network, Gateway(client.via, (cidr,)), cidr))
        found[cidr] = (network.access is not None, towards)
    for name, cidrs in by_network.items():
        sources = tuple(sorted(cidrs))
        ranges = sorted(offered(topology, host_id, name))
        for destination in (topology.networks[name].cidr, *ranges):
            rule = ForwardRule(sources=sources, destination=destination, allow=("any",))
            found.setdefault(destination, (False, set()))[1].add(rule)
    return found


class ClientSection:
    """`clients`: the external clients this host takes in (an ingress gateway)."""

    reacts_to: ClassVar[tuple[type[Event], ...]] = (ClientCreated, ClientRemoved, IngressRemoved)
    name: ClassVar[str] = "clients"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def entries(self, host_id: str) -> dict[str, ClientEntry]:
        return {
            client.public_key: ClientEntry(address=client_cidr(client), name=client.name)
            for _, client in sorted(own_clients(self.topology, host_id), key=_by_key)
        }

    def entry(self, host_id: str, key: str) -> ClientEntry | None:
        for _, client in own_clients(self.topology, host_id):
            if client.public_key == key:
                return ClientEntry(address=client_cidr(client), name=client.name)
        return None

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        match event:
            case ClientCreated(host_id=host_id, public_key=key):
                return (Reread(ClientSection.name, frozenset((key,)), hosts=frozenset((host_id,))),)
            case ClientRemoved(host_id=host_id) | IngressRemoved(host_id=host_id):
                network = topology.networks.get(event.network)
                departed = network.departed_clients if network is not None else ()
                keys = frozenset(c.public_key for c in departed)
                if not keys:
                    return ()
                return (Reread(ClientSection.name, keys, hosts=frozenset((host_id,))),)
        return ()


def _by_key(item: tuple[Network, Client]) -> str:
    return item[1].public_key


def client_rereads(topology: Topology, event: Event, section: str) -> list[Reread]:
    """For `egress` (members reaching clients): whose client entries `event` moved."""
    match event:
        case ClientCreated(network=network, address=address):
            return [Reread(section, frozenset((f"{address}/32",)), networks=frozenset((network,)))]
        case ClientRemoved(network=network) | IngressRemoved(network=network):
            keys = _departed(topology, network)
            return [Reread(section, keys, networks=frozenset((network,)))] if keys else []
        case NodeRemoved(network=network):
            keys = _departed(topology, network)
            return [Reread(section, keys, networks=frozenset((network,)))] if keys else []
        case HostKeyRotated(host_id=host_id):
            # Members name the gateway by its key.
            found = []
            for node in topology.nodes_of_host(host_id):
                net = topology.networks.get(node.network)
                if net is not None and node.node_id in net.ingress:
                    keys = frozenset(client_cidr(c) for c in net.clients_via(node.node_id))
                    if keys:
                        found.append(Reread(section, keys, networks=frozenset((node.network,))))
            return found
        case (
            NodeTagged(network=network) | NodeUntagged(network=network) | PolicySet(network=network)
        ):
            keys = _all_clients(topology, network)
            if not keys:
                return []
            net = topology.networks.get(network)
            gateway = (
                net is not None
                and not isinstance(event, PolicySet)
                and (event.node_id in net.ingress)
            )
            if isinstance(event, PolicySet) or gateway:  # who sees a gateway may have moved
                return [Reread(section, keys, networks=frozenset((network,)))]
            return [Reread(section, keys, hosts=frozenset((event.host_id,)))]
    return []


def forward_rereads(topology: Topology, event: Event, section: str) -> list[Reread]:
    """For `forward` on ingress gateways: whose forward entries `event` moved."""
    match event:
        case ClientCreated(network=network, host_id=host_id, address=address):
            keys = frozenset((f"{address}/32",)) | _shared_keys(topology, host_id)
            return [Reread(section, keys, hosts=frozenset((host_id,)))]
        case (
            ClientRemoved(network=network, host_id=host_id)
            | IngressRemoved(network=network, host_id=host_id)
        ):
            keys = _departed(topology, network)
            if not keys:
                return []
            return [
                Reread(section, keys | _shared_keys(topology, host_id), hosts=frozenset((host_id,)))
            ]
    return []


def ingress_hosts(topology: Topology, network: str) -> dict[str, frozenset[str]]:
    """Host -> the client keys (ip/32) of its clients in `network`, for the
    ingress gateways of `network` that have any."""
    found: dict[str, set[str]] = {}
    net = topology.networks.get(network)
    if net is None:
        return {}
    for client in net.clients.values():
        node = topology.nodes.get(client.via)
        if node is not None:
            found.setdefault(node.host_id, set()).add(client_cidr(client))
    return {host: frozenset(keys) for host, keys in found.items()}


def _shared_keys(topology: Topology, host_id: str) -> frozenset[str]:
    """The forward keys every client of `host_id` is a source of: its
    networks' CIDRs and the ranges it reaches (whose rules list the clients)."""
    keys = {
        n.cidr for n in (topology.networks.get(x) for x in topology.networks_of_host(host_id)) if n
    }
    keys.update(offered(topology, host_id))
    return frozenset(keys)


def _departed(topology: Topology, network: str) -> frozenset[str]:
    net = topology.networks.get(network)
    return (
        frozenset(client_cidr(c) for c in net.departed_clients) if net is not None else frozenset()
    )


def _all_clients(topology: Topology, network: str) -> frozenset[str]:
    net = topology.networks.get(network)
    return (
        frozenset(client_cidr(c) for c in net.clients.values()) if net is not None else frozenset()
    )
