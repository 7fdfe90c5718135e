"""Reading a network's access policy: `policy show`, `policy explain` and
`policy set --plan`, answered from the write model's topology (the compiled
policy and its access index live there, not in the SQLite read model).

Pure: each takes the topology and returns JSON-able data, or raises Rejected.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from controlplane.rules.base import Rejected, require_network
from controlplane.rules.policies import check_policy, network_members
from events.commands import ErrorCode
from events.policy import PolicyError, parse_ports
from projections.access import (
    AccessIndex,
    Member,
    allowed,
    canonical_ports,
    may_see,
    rules_between,
    verdict,
)
from projections.policy_plan import plan_policy
from projections.topology import Topology

NO_POLICY = "no policy: everyone reaches everyone"


def show_policy(topology: Topology, network_name: str) -> dict[str, Any]:
    """The document in force as it was written, and its revision (the
    sequence of the event that set it)."""
    network = require_network(topology, network_name)
    return {
        "network": network.name,
        "policy": network.policy is not None,
        "document": network.policy_text if network.policy is not None else None,
        "revision": network.policy_seq or None,
        "error": network.policy_error or None,
    }


def _member(members: dict[str, Member], network: str, name: str) -> Member:
    """A node by name, or an address (an external client or a host behind a
    gateway, which CIDR selectors name)."""
    member = members.get(name)
    if member is not None:
        return member
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        raise Rejected(
            ErrorCode.NOT_FOUND, f"no node named {name!r} in network {network!r} (nor an address)"
        ) from None
    return Member("", str(address))


def explain_access(
    topology: Topology, network_name: str, source: str, destination: str, port: str | None
) -> dict[str, Any]:
    """Whether node `source` may open `port` towards node `destination` and
    which rule decides it; without a port, what it may open and by which rules."""
    network = require_network(topology, network_name)
    members = network_members(topology, network.name)
    src = _member(members, network.name, source)
    dst = _member(members, network.name, destination)
    try:
        ports = parse_ports(port) if port is not None else None
    except PolicyError as exc:
        raise Rejected(ErrorCode.INVALID, str(exc)) from None
    answer: dict[str, Any] = {"network": network.name, "from": source, "to": destination}
    if port is not None:
        answer["port"] = port
    policy = network.policy
    if policy is None:
        return {
            **answer,
            "policy": False,
            "allowed": True if ports is not None else ["any"],
            "peers": True,
            "reason": NO_POLICY,
            "rules": [],
        }
    answer.update(policy=True, revision=network.policy_seq, peers=may_see(policy, src, dst))
    if network.policy_error:
        answer["error"] = network.policy_error
    if ports is not None:
        found = verdict(policy, src, dst, ports)
        named = "; ".join(map(str, found.rules))
        if found.allowed:
            reason = f"allowed by {named}"
        elif found.partly:
            reason = f"partly allowed (the rest is denied) by {named}"
        else:
            reason = "denied: no rule allows it"
        rules = [{"index": rule.index, "rule": str(rule)} for rule in found.rules]
        return {
            **answer,
            "allowed": found.allowed,
            "partly": found.partly,
            "reason": reason,
            "rules": rules,
        }
    between = rules_between(policy, src, dst)
    return {
        **answer,
        "allowed": list(canonical_ports(allowed(policy, src, dst))),
        "reason": "allowed by the rules listed" if between else "denied: no rule allows anything",
        "rules": [
            {"index": rule.index, "rule": str(rule), "ports": [str(p) for p in rule.ports]}
            for rule in between
        ],
    }


def plan_policy_change(topology: Topology, network_name: str, document: str) -> dict[str, Any]:
    """What setting `document` would change, per host; refused as `policy set`
    would refuse it (Rejected)."""
    network = require_network(topology, network_name)
    policy, warnings = check_policy(topology, network.name, document)
    members = {node.node_id: node.member() for node in topology.nodes_of_network(network.name)}
    after = AccessIndex(policy, members.items())
    same = network.policy is not None and network.policy_text == document
    hosts = [] if same else plan_policy(members, network.cidr, network.access, after)
    return {
        "network": network.name,
        "warnings": warnings,
        "changed": not same,
        "hosts": [host.to_json() for host in hosts],
        "text": [str(host) for host in hosts],
    }
