"""A network's access policy (part of the network's aggregate): setting and
clearing it.

The rules are the authority on what a policy may be: a document that does not
parse, names an unknown kind of selector or a bad port, or whose own `tests`
fail against the network's members as they are now, is refused (one line).
Tags and node names no member has yet are only warnings: a policy may be set
before the nodes it is written for join.
"""

from __future__ import annotations

from controlplane.rules.base import (
    Context,
    Decision,
    Rejected,
    network_subject,
    one_event,
    require_network,
)
from controlplane.rules.spec import ByAdmin, CommandSpec, Produces, Scope
from events.commands import ClearPolicy, ErrorCode, SetPolicy
from events.model import PolicyCleared, PolicySet
from events.policy import Policy, PolicyError, parse_policy
from projections.access import Member, failing_tests, unknown_references
from projections.topology import Topology

# The document travels in the event and again in its signed proof.
MAX_DOCUMENT = 256 * 1024


def network_members(topology: Topology, network: str) -> dict[str, Member]:
    """The network's nodes as a policy sees them, by name."""
    return {node.name: node.member() for node in topology.nodes_of_network(network)}


def check_policy(topology: Topology, network: str, document: str) -> tuple[Policy, list[str]]:
    """The policy `document` compiles to in `network`, and its warnings.
    Raises Rejected ("invalid", one line) when it may not be set."""
    if len(document.encode()) > MAX_DOCUMENT:
        raise Rejected(
            ErrorCode.INVALID, f"policy is {len(document.encode())} bytes: at most {MAX_DOCUMENT}"
        )
    try:
        policy = parse_policy(document)
    except PolicyError as exc:
        raise Rejected(ErrorCode.INVALID, f"invalid policy: {exc}") from None
    members = network_members(topology, network)
    failures = failing_tests(policy, members)
    if failures:
        raise Rejected(ErrorCode.INVALID, f"policy tests fail: {'; '.join(failures)}")
    return policy, unknown_references(policy, members.values())


def set_policy(topology: Topology, cmd: SetPolicy, _ctx: Context) -> Decision:
    network = require_network(topology, cmd.network)
    _, warnings = check_policy(topology, cmd.network, cmd.document)
    result: dict[str, object] = {"network": cmd.network, "warnings": warnings}
    if network.policy is not None and network.policy_text == cmd.document:
        return Decision(result={**result, "changed": False, "revision": network.policy_seq})
    event = PolicySet(network=cmd.network, document=cmd.document)
    # Its revision is the event's sequence: the service's reply carries it (`seq`).
    return one_event(topology, network_subject(cmd.network), event, {**result, "changed": True})


SET = CommandSpec[SetPolicy](
    SetPolicy,
    set_policy,
    ByAdmin(Scope(lambda _topology, cmd: cmd.network)),
    Produces((PolicySet,), about=("network", "network"), agree=(("document", "document"),)),
)


def clear_policy(topology: Topology, cmd: ClearPolicy, _ctx: Context) -> Decision:
    network = require_network(topology, cmd.network)
    if network.policy is None:
        return Decision(result={"network": cmd.network, "changed": False})
    event = PolicyCleared(network=cmd.network)
    return one_event(
        topology, network_subject(cmd.network), event, {"network": cmd.network, "changed": True}
    )


CLEAR = CommandSpec[ClearPolicy](
    ClearPolicy,
    clear_policy,
    ByAdmin(Scope(lambda _topology, cmd: cmd.network)),
    Produces((PolicyCleared,), about=("network", "network")),
)

SPECS = (SET, CLEAR)
