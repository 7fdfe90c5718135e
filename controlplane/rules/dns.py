"""Names in a network (part of the network's aggregate): its DNS domain and
custom records.

A network's domain is the suffix of its members' names; no two networks'
domains may be equal or nested (a host in both would not know which network a
name is in). A custom record is a name inside the domain that no record and no
node of the network has, with IPv4 (A) and IPv6 (AAAA) addresses or an alias
(CNAME), not both.
"""

from __future__ import annotations

import ipaddress

from controlplane.rules.base import (
    Context,
    Decision,
    Rejected,
    network_subject,
    one_event,
    require_network,
)
from controlplane.rules.spec import ByAdmin, CommandSpec, Produces, Scope
from events.commands import AddDnsRecord, ErrorCode, RemoveDnsRecord
from events.dns import DnsNameError, fqdn, node_label, parse_domain, parse_name, relative_name
from events.model import DnsRecordAdded, DnsRecordRemoved
from projections.topology import Network, Topology

MAX_ADDRESSES = 16  # per record: a DNS answer stays small (one UDP datagram)


def check_domain(topology: Topology, text: str, network: str) -> str:
    """`text` as the DNS domain of `network`, normalised. Raises Rejected
    when it is malformed or equal to, inside or around another network's."""
    try:
        domain = parse_domain(text)
    except DnsNameError as exc:
        raise Rejected(ErrorCode.INVALID, str(exc)) from None
    for other in topology.networks.values():
        if other.name == network:
            continue
        theirs = other.dns_domain
        if domain == theirs or domain.endswith("." + theirs) or theirs.endswith("." + domain):
            raise Rejected(
                ErrorCode.CONFLICT,
                f"DNS domain {domain} overlaps network {other.name!r}'s ({theirs})",
            )
    return domain


def _named(topology: Topology, cmd: AddDnsRecord | RemoveDnsRecord) -> tuple[Network, str, str]:
    """The network, the record's name relative to its domain, and whole.
    Raises Rejected."""
    network = require_network(topology, cmd.network)
    try:
        name = relative_name(cmd.name, network.dns_domain)
    except DnsNameError as exc:
        raise Rejected(ErrorCode.INVALID, f"{exc} of network {network.name!r}") from None
    return network, name, fqdn(name, network.dns_domain)


def _addresses(texts: tuple[str, ...], version: int, flag: str) -> None:
    """Raises Rejected on one that is not an address of `version`."""
    if len(texts) > MAX_ADDRESSES:
        raise Rejected(ErrorCode.INVALID, f"{len(texts)} addresses: at most {MAX_ADDRESSES}")
    for text in texts:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise Rejected(ErrorCode.INVALID, f"invalid IP address {text!r} for {flag}") from None
        if ip.version != version:
            raise Rejected(
                ErrorCode.INVALID,
                f"{text} is an IPv{ip.version} address: {flag} takes IPv{version}",
            )


def add_record(topology: Topology, cmd: AddDnsRecord, _ctx: Context) -> Decision:
    network, name, whole = _named(topology, cmd)
    if not (cmd.a or cmd.aaaa or cmd.cname):
        raise Rejected(ErrorCode.INVALID, f"{whole}: give --a, --aaaa or --cname")
    if cmd.cname and (cmd.a or cmd.aaaa):
        raise Rejected(ErrorCode.INVALID, f"{whole}: a CNAME cannot have addresses beside it")
    _addresses(cmd.a, 4, "--a")
    _addresses(cmd.aaaa, 6, "--aaaa")
    if cmd.cname:
        try:
            target = parse_name(cmd.cname, "CNAME target")
        except DnsNameError as exc:
            raise Rejected(ErrorCode.INVALID, str(exc)) from None
        if target == whole:
            raise Rejected(ErrorCode.INVALID, f"{whole} cannot be an alias of itself")
    if name in network.records:
        raise Rejected(
            ErrorCode.CONFLICT,
            f"{whole} already exists in network {network.name!r}: remove it first",
        )
    for node in topology.nodes_of_network(network.name):
        if node_label(node.name) == name:
            raise Rejected(ErrorCode.CONFLICT, f"{whole} is node {network.name}/{node.name}'s name")
    if name in network.clients:
        raise Rejected(ErrorCode.CONFLICT, f"{whole} is client {network.name}/{name}'s name")
    # The event says what the admin signed (events verify compares them);
    # the topology puts it in canonical form.
    event = DnsRecordAdded(
        network=network.name, name=cmd.name, a=cmd.a, aaaa=cmd.aaaa, cname=cmd.cname
    )
    return one_event(
        topology, network_subject(network.name), event, {"network": network.name, "name": whole}
    )


def _network_of(_topology: Topology, cmd: AddDnsRecord | RemoveDnsRecord) -> str:
    return cmd.network


ADD = CommandSpec[AddDnsRecord](
    AddDnsRecord,
    add_record,
    ByAdmin(Scope(_network_of)),
    Produces(
        (DnsRecordAdded,),
        about=("network", "network"),
        agree=(("name", "name"), ("a", "a"), ("aaaa", "aaaa"), ("cname", "cname")),
    ),
)


def remove_record(topology: Topology, cmd: RemoveDnsRecord, _ctx: Context) -> Decision:
    network, name, whole = _named(topology, cmd)
    if name not in network.records:
        raise Rejected(ErrorCode.NOT_FOUND, f"network {network.name!r} has no record {whole}")
    event = DnsRecordRemoved(network=network.name, name=cmd.name)
    return one_event(
        topology, network_subject(network.name), event, {"network": network.name, "name": whole}
    )


REMOVE = CommandSpec[RemoveDnsRecord](
    RemoveDnsRecord,
    remove_record,
    ByAdmin(Scope(_network_of)),
    Produces((DnsRecordRemoved,), about=("network", "network"), agree=(("name", "name"),)),
)

SPECS = (ADD, REMOVE)
