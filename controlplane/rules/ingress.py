"""Ingress gateways and external clients (part of the network's aggregate).

An external client is a WireGuard device that does not run the agent (a
phone, a laptop with a stock WireGuard app, a router). It connects to one
ingress gateway, a node of the network that takes it in as a peer and
forwards between it and the network; every other member reaches it through
that gateway. Its address comes from the network's pool (the network owns
it, as for nodes). Only its public key is ever sent here: the admin's CLI, or
the device itself, made the key pair.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from controlplane.rules.base import (
    Context,
    Decision,
    Rejected,
    network_subject,
    one_event,
    parse_public_key,
    require_network,
)
from controlplane.rules.gateways import INTERNET, node_in_network
from controlplane.rules.nodes import allocate_address, network_of_node, resolve_node
from controlplane.rules.spec import ByAdmin, CommandSpec, Produces, Scope
from events.commands import AddIngress, CreateClient, ErrorCode, RemoveClient, RemoveIngress
from events.dns import node_label
from events.model import ClientCreated, ClientRemoved, IngressAdded, IngressRemoved
from projections.sections.peers import peer_endpoint
from projections.sections.reach import EVERYTHING, offered
from projections.topology import Client, Network, Node, Topology

# A client's name is one DNS label (it gets a name in the network's domain).
CLIENT_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
MAX_CLIENTS = 1000  # per gateway: each is a WireGuard peer on its host


def client_view(topology: Topology, network: Network, client: Client) -> dict[str, Any]:
    """What a client's WireGuard configuration needs besides its private
    key: its gateway's key, endpoint and overlay address (its DNS server),
    the network's CIDR, MTU and domain, and the ranges the gateway reaches
    (through other gateways or itself), which the client reaches through it."""
    via = topology.nodes.get(client.via)
    host = topology.hosts.get(via.host_id) if via is not None else None
    reached = (
        set(offered(topology, host.host_id, network.name)) | _forwarded_in(via, network)
        if host and via
        else set()
    )
    return {
        "network_cidr": network.cidr,
        "mtu": network.mtu,
        "dns_domain": network.dns_domain,
        "ranges": sorted(reached - EVERYTHING, key=ipaddress.ip_network),
        "gateway": {
            "name": via.name if via is not None else None,
            "public_key": host.public_key if host is not None else None,
            "endpoint": peer_endpoint(host) if host is not None else None,
            "address": via.address if via is not None else None,
        },
    }


def _forwarded_in(node: Node, network: Network) -> set[str]:
    """The ranges `node` itself forwards to, as a gateway of `network`."""
    gateway = network.gateways.get(node.node_id)
    return set(gateway.ranges) if gateway is not None else set()


def _result(node: Node, **more: object) -> dict[str, object]:
    return {"node_id": node.node_id, "network": node.network, "name": node.name, **more}


def add_ingress(topology: Topology, cmd: AddIngress, _ctx: Context) -> Decision:
    node = resolve_node(topology, cmd.node)
    network = topology.networks[node.network]
    if node.node_id in network.ingress:
        return Decision(result=_result(node, changed=False))
    event = IngressAdded(network=node.network, node_id=node.node_id, host_id=node.host_id)
    return one_event(topology, network_subject(node.network), event, _result(node, changed=True))


def _node_network(topology: Topology, cmd: AddIngress | RemoveIngress) -> str | None:
    return network_of_node(topology, cmd.node)


ADD = CommandSpec[AddIngress](
    AddIngress, add_ingress, ByAdmin(Scope(_node_network)), Produces((IngressAdded,))
)


def remove_ingress(topology: Topology, cmd: RemoveIngress, _ctx: Context) -> Decision:
    node = resolve_node(topology, cmd.node)
    network = topology.networks[node.network]
    if node.node_id not in network.ingress:
        raise Rejected(ErrorCode.NOT_FOUND, f"node {node.name!r} is not an ingress gateway")
    clients = [c.name for c in network.clients_via(node.node_id)]
    event = IngressRemoved(network=node.network, node_id=node.node_id, host_id=node.host_id)
    return one_event(
        topology, network_subject(node.network), event, _result(node, clients_removed=clients)
    )


REMOVE = CommandSpec[RemoveIngress](
    RemoveIngress, remove_ingress, ByAdmin(Scope(_node_network)), Produces((IngressRemoved,))
)


def create_client(topology: Topology, cmd: CreateClient, _ctx: Context) -> Decision:
    network = require_network(topology, cmd.network)
    if not CLIENT_NAME.match(cmd.name):
        raise Rejected(
            ErrorCode.INVALID,
            f"invalid client name {cmd.name!r}: use lowercase letters, digits and '-' (max 63)",
        )
    public_key = parse_public_key(cmd.public_key)
    if public_key != cmd.public_key:  # recorded as signed: `events verify` compares them
        raise Rejected(
            ErrorCode.INVALID, f"public key {cmd.public_key!r}: write it as {public_key}"
        )
    via = node_in_network(topology, network.name, cmd.via)
    if via.node_id not in network.ingress:
        raise Rejected(
            ErrorCode.INVALID,
            f"node {via.name!r} is not an ingress gateway "
            f"(netmesh gateway ingress add {network.name}/{via.name})",
        )
    if cmd.full_tunnel:
        gateway = network.gateways.get(via.node_id)
        if gateway is None or INTERNET not in gateway.ranges:
            raise Rejected(
                ErrorCode.INVALID,
                f"--full-tunnel: node {via.name!r} is not an internet gateway "
                f"(netmesh gateway egress add {network.name}/{via.name} --range {INTERNET})",
            )
    if cmd.name in network.clients:
        raise Rejected(
            ErrorCode.CONFLICT, f"client {cmd.name!r} already exists in network {network.name!r}"
        )
    for node in topology.nodes_of_network(network.name):
        if node.name == cmd.name or node_label(node.name) == cmd.name:
            raise Rejected(
                ErrorCode.CONFLICT, f"{cmd.name!r} is node {network.name}/{node.name}'s name"
            )
    if cmd.name in network.records:
        raise Rejected(
            ErrorCode.CONFLICT, f"{cmd.name!r} is a DNS record of network {network.name!r}"
        )
    for other in topology.networks.values():
        for client in other.clients.values():
            if client.public_key == public_key:
                raise Rejected(
                    ErrorCode.CONFLICT,
                    f"public key is client {other.name}/{client.name}'s already",
                )
    if public_key in topology.host_by_public_key:
        raise Rejected(ErrorCode.CONFLICT, "public key is a host's: make a new key for the client")
    if len(network.clients_via(via.node_id)) >= MAX_CLIENTS:
        raise Rejected(
            ErrorCode.EXHAUSTED, f"node {via.name!r} has {MAX_CLIENTS} clients: use another"
        )
    address = allocate_address(
        network.cidr,
        topology.addresses.get(network.name, ()),
        topology.address_floor.get(network.name, 0),
    )
    event = ClientCreated(
        network=network.name,
        name=cmd.name,
        public_key=public_key,
        address=address,
        via=via.node_id,
        host_id=via.host_id,
        full_tunnel=cmd.full_tunnel,
    )
    client = Client(cmd.name, public_key, address, via.node_id, 0.0, cmd.full_tunnel)
    result: dict[str, object] = {
        "network": network.name,
        "name": cmd.name,
        "address": address,
        "public_key": public_key,
        "via": via.name,
        "via_node_id": via.node_id,
        "full_tunnel": cmd.full_tunnel,
        **client_view(topology, network, client),
    }
    return one_event(topology, network_subject(network.name), event, result)


def _network_of(_topology: Topology, cmd: CreateClient | RemoveClient) -> str:
    return cmd.network


CREATE = CommandSpec[CreateClient](
    CreateClient,
    create_client,
    ByAdmin(Scope(_network_of)),
    Produces(
        (ClientCreated,),
        about=("network", "network"),
        agree=(("name", "name"), ("public_key", "public_key"), ("full_tunnel", "full_tunnel")),
    ),
)


def remove_client(topology: Topology, cmd: RemoveClient, _ctx: Context) -> Decision:
    network = require_network(topology, cmd.network)
    client = network.clients.get(cmd.name)
    if client is None:
        raise Rejected(
            ErrorCode.NOT_FOUND, f"network {network.name!r} has no client named {cmd.name!r}"
        )
    via = topology.nodes[client.via]
    event = ClientRemoved(
        network=network.name, name=client.name, via=client.via, host_id=via.host_id
    )
    result: dict[str, object] = {
        "network": network.name,
        "name": client.name,
        "address": client.address,
    }
    return one_event(topology, network_subject(network.name), event, result)


REMOVE_CLIENT = CommandSpec[RemoveClient](
    RemoveClient,
    remove_client,
    ByAdmin(Scope(_network_of)),
    Produces((ClientRemoved,), about=("network", "network"), agree=(("name", "name"),)),
)

SPECS = (ADD, REMOVE, CREATE, REMOVE_CLIENT)
