"""The network aggregate: creating and deleting networks.

A network owns its address pool, its enrollment keys and its nodes; the names
of all networks and their address ranges form one namespace (no overlaps).
"""

from __future__ import annotations

import ipaddress
import re

from controlplane.rules.base import (
    Context,
    Decision,
    Rejected,
    network_subject,
    one_event,
    require_network,
)
from controlplane.rules.dns import check_domain
from controlplane.rules.spec import ByAdmin, CommandSpec, Produces, Scope
from events.commands import CreateNetwork, DeleteNetwork, ErrorCode, UpdateNetwork
from events.dns import default_domain
from events.model import NetworkCreated, NetworkDeleted, NetworkUpdated
from events.store import Expectation
from events.subjects import NETWORK_EVENTS_WILDCARD
from projections.topology import Topology

NETWORK_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")


def _named(_topology: Topology, cmd: CreateNetwork | UpdateNetwork | DeleteNetwork) -> str:
    return cmd.name


def whole_network(
    text: str, what: str, example: str
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """`text` as a network with no host bits set ("ip" alone: one address).
    Raises Rejected("invalid", ...) naming it `what`, showing `example`."""
    try:
        interface = ipaddress.ip_interface(text)
    except ValueError:
        raise Rejected(ErrorCode.INVALID, f"invalid {what} {text!r}: expected {example}") from None
    network = interface.network
    if interface.ip != network.network_address:
        raise Rejected(
            ErrorCode.INVALID, f"invalid {what} {text!r}: host bits set (did you mean {network}?)"
        )
    return network


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Raises Rejected("invalid", ...)."""
    if "/" not in text:
        raise Rejected(ErrorCode.INVALID, f"invalid CIDR {text!r}: missing prefix length, e.g. /24")
    network = whole_network(text, "CIDR", "e.g. 10.10.0.0/24")
    if network.num_addresses < 4:
        raise Rejected(
            ErrorCode.INVALID, f"CIDR {text!r} is too small: at most /30 (IPv4) or /126 (IPv6)"
        )
    return network


def create_network(topology: Topology, cmd: CreateNetwork, _ctx: Context) -> Decision:
    if not NETWORK_NAME.match(cmd.name):
        raise Rejected(
            ErrorCode.INVALID,
            f"invalid network name {cmd.name!r}: use 1-32 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
        )
    cidr = parse_cidr(cmd.cidr)
    if cidr.version == 6 and cmd.mtu < 1280:
        raise Rejected(ErrorCode.INVALID, f"MTU {cmd.mtu} is below 1280, the minimum for IPv6")
    if cmd.name in topology.networks:
        raise Rejected(ErrorCode.CONFLICT, f"network {cmd.name!r} already exists")
    for other in topology.networks.values():
        if ipaddress.ip_network(other.cidr).overlaps(cidr):
            raise Rejected(
                ErrorCode.CONFLICT, f"{cidr} overlaps network {other.name!r} ({other.cidr})"
            )
        for gateway in other.gateways.values():
            for egress in gateway.ranges:
                range_ = ipaddress.ip_network(egress)
                # The internet (0.0.0.0/0) overlaps everything and is routed
                # only by `node exit`, below every network's own routes.
                if range_.prefixlen and range_.overlaps(cidr):
                    raise Rejected(
                        ErrorCode.CONFLICT,
                        f"{cidr} overlaps egress range {egress} of network {other.name!r}",
                    )
    domain = check_domain(topology, cmd.dns_domain or default_domain(cmd.name), cmd.name)
    event = NetworkCreated(
        network=cmd.name,
        cidr=str(cidr),
        listen_port=cmd.listen_port,
        mtu=cmd.mtu,
        keepalive=cmd.keepalive,
        dns_domain=cmd.dns_domain,
    )
    # Overlap spans every network, so the check guards them all.
    return Decision(
        events=((network_subject(cmd.name), event),),
        expect=(Expectation(NETWORK_EVENTS_WILDCARD, topology.last_network_seq),),
        result={"network": cmd.name, "cidr": str(cidr), "dns_domain": domain},
    )


CREATE = CommandSpec[CreateNetwork](
    CreateNetwork,
    create_network,
    ByAdmin(Scope(_named)),
    Produces(
        (NetworkCreated,),
        about=("name", "network"),
        agree=(
            ("cidr", "cidr"),
            ("listen_port", "listen_port"),
            ("mtu", "mtu"),
            ("keepalive", "keepalive"),
            ("dns_domain", "dns_domain"),
        ),
    ),
)


def delete_network(topology: Topology, cmd: DeleteNetwork, _ctx: Context) -> Decision:
    require_network(topology, cmd.name)
    members = topology.nodes_of_network(cmd.name)
    if members and not cmd.force:
        raise Rejected(
            ErrorCode.CONFLICT,
            f"network {cmd.name!r} has {len(members)} node(s); remove them first, "
            "or pass --force to disconnect them",
        )
    subject = network_subject(cmd.name)
    return one_event(topology, subject, NetworkDeleted(network=cmd.name), {"network": cmd.name})


DELETE = CommandSpec[DeleteNetwork](
    DeleteNetwork,
    delete_network,
    ByAdmin(Scope(_named)),
    Produces((NetworkDeleted,), about=("name", "network")),
)


def update_network(topology: Topology, cmd: UpdateNetwork, _ctx: Context) -> Decision:
    network = require_network(topology, cmd.name)
    if cmd.mtu is None and cmd.keepalive is None and cmd.dns_domain is None:
        raise Rejected(
            ErrorCode.INVALID, "nothing to update: give --mtu, --keepalive or --dns-domain"
        )
    if cmd.mtu is not None and cmd.mtu < 1280 and ipaddress.ip_network(network.cidr).version == 6:
        raise Rejected(ErrorCode.INVALID, f"MTU {cmd.mtu} is below 1280, the minimum for IPv6")
    mtu = network.mtu if cmd.mtu is None else cmd.mtu
    keepalive = network.keepalive if cmd.keepalive is None else cmd.keepalive
    domain = (
        network.dns_domain
        if cmd.dns_domain is None
        else check_domain(topology, cmd.dns_domain, cmd.name)
    )
    result: dict[str, object] = {
        "network": cmd.name,
        "mtu": mtu,
        "keepalive": keepalive,
        "dns_domain": domain,
    }
    if (mtu, keepalive, domain) == (network.mtu, network.keepalive, network.dns_domain):
        return Decision(result={**result, "changed": False})
    # The event says what the admin signed (events verify compares them).
    event = NetworkUpdated(
        network=cmd.name, mtu=cmd.mtu, keepalive=cmd.keepalive, dns_domain=cmd.dns_domain
    )
    return one_event(topology, network_subject(cmd.name), event, {**result, "changed": True})


UPDATE = CommandSpec[UpdateNetwork](
    UpdateNetwork,
    update_network,
    ByAdmin(Scope(_named)),
    Produces(
        (NetworkUpdated,),
        about=("name", "network"),
        agree=(("mtu", "mtu"), ("keepalive", "keepalive"), ("dns_domain", "dns_domain")),
    ),
)

SPECS = (CREATE, UPDATE, DELETE)
