"""The host aggregate: what a host says about itself (endpoints, a new
WireGuard key, leaving), and an admin asking a host for a new key."""

from __future__ import annotations

from controlplane.rules.base import (
    Context,
    Decision,
    Rejected,
    guard,
    host_subject,
    network_subject,
    one_event,
    parse_endpoint,
    parse_public_key,
)
from controlplane.rules.nodes import network_of_node, resolve_node
from controlplane.rules.spec import ByAdmin, ByHost, CommandSpec, Produces, Scope
from events.commands import (
    ErrorCode,
    LeaveNetworks,
    ReportEndpoint,
    RequestKeyRotation,
    RotateHostKey,
)
from events.model import (
    Event,
    HostEndpointObserved,
    HostKeyRotated,
    HostKeyRotationRequested,
    NodeRemoved,
)
from projections.topology import Topology


def _host_of(cmd: ReportEndpoint | LeaveNetworks | RotateHostKey) -> str:
    return cmd.host_id


def report_endpoint(topology: Topology, cmd: ReportEndpoint, _ctx: Context) -> Decision:
    host = topology.hosts.get(cmd.host_id)
    if host is None:
        raise Rejected(ErrorCode.NOT_FOUND, f"no host {cmd.host_id!r}")
    endpoints = tuple(parse_endpoint(e) for e in cmd.endpoints)
    listen_port = cmd.listen_port or host.listen_port
    if (host.endpoints, host.listen_port) == (endpoints, listen_port):
        return Decision(result={"host_id": host.host_id, "changed": False})
    subject = host_subject(host.host_id)
    event = HostEndpointObserved(host_id=host.host_id, endpoints=endpoints, listen_port=listen_port)
    return one_event(topology, subject, event, {"host_id": host.host_id, "changed": True})


REPORT_ENDPOINT = CommandSpec[ReportEndpoint](
    ReportEndpoint,
    report_endpoint,
    ByHost(_host_of),
    Produces((HostEndpointObserved,), about=("host_id", "host_id")),
)


def leave(topology: Topology, cmd: LeaveNetworks, _ctx: Context) -> Decision:
    if cmd.host_id not in topology.hosts:
        raise Rejected(ErrorCode.NOT_FOUND, f"no host {cmd.host_id!r}")
    nodes = [n for n in topology.nodes_of_host(cmd.host_id) if cmd.network in (None, n.network)]
    if cmd.network is not None and not nodes:
        raise Rejected(ErrorCode.NOT_FOUND, f"host {cmd.host_id} is not in network {cmd.network!r}")
    events = tuple(
        (
            network_subject(n.network),
            NodeRemoved(network=n.network, node_id=n.node_id, host_id=n.host_id),
        )
        for n in nodes
    )
    return Decision(
        events=events,
        expect=tuple(guard(topology, network_subject(n.network)) for n in nodes),
        result={"host_id": cmd.host_id, "left": sorted(n.network for n in nodes)},
    )


LEAVE = CommandSpec[LeaveNetworks](
    LeaveNetworks,
    leave,
    ByHost(_host_of),
    Produces((NodeRemoved,), about=("host_id", "host_id")),
)


def rotate_key(topology: Topology, cmd: RotateHostKey, _ctx: Context) -> Decision:
    host = topology.hosts.get(cmd.host_id)
    if host is None:
        raise Rejected(ErrorCode.NOT_FOUND, f"no host {cmd.host_id!r}")
    if not host.signing_key:
        # Without a signing key anyone could claim to be this host: re-enroll.
        raise Rejected(
            ErrorCode.UNAUTHORIZED, f"host {cmd.host_id} has no signing key: re-enroll it to rotate"
        )
    new_key = parse_public_key(cmd.public_key)
    if new_key == host.public_key:
        return Decision(result={"host_id": host.host_id, "changed": False})
    if new_key in topology.host_by_public_key:
        raise Rejected(ErrorCode.CONFLICT, "that public key belongs to another host")
    subject = host_subject(host.host_id)
    event = HostKeyRotated(host_id=host.host_id, public_key=new_key, previous_key=host.public_key)
    return one_event(
        topology, subject, event, {"host_id": host.host_id, "changed": True, "public_key": new_key}
    )


ROTATE_KEY = CommandSpec[RotateHostKey](
    RotateHostKey,
    rotate_key,
    ByHost(_host_of),
    Produces(
        (HostKeyRotated,), about=("host_id", "host_id"), agree=(("public_key", "public_key"),)
    ),
)


def request_rotation(topology: Topology, cmd: RequestKeyRotation, _ctx: Context) -> Decision:
    node = resolve_node(topology, cmd.node)
    host = topology.hosts[node.host_id]
    if not host.signing_key:
        raise Rejected(
            ErrorCode.CONFLICT,
            f"host {host.host_id} has no signing key: re-enroll it to rotate its key",
        )
    subject = host_subject(host.host_id)
    event = HostKeyRotationRequested(host_id=host.host_id, epoch=host.key_epoch + 1)
    return one_event(
        topology,
        subject,
        event,
        {"host_id": host.host_id, "node": node.node_id, "epoch": event.epoch},
    )


def _rotation_network_in_log(
    topology: Topology, cmd: RequestKeyRotation, event: Event
) -> str | None:
    """The event names only the host: the network is that of the node the
    signed command names, among the nodes the log has at that point, and
    that node must be one of the host's."""
    try:
        node = resolve_node(topology, cmd.node)
    except Rejected:
        return None
    if not isinstance(event, HostKeyRotationRequested) or node.host_id != event.host_id:
        return None
    return node.network


REQUEST_ROTATION = CommandSpec[RequestKeyRotation](
    RequestKeyRotation,
    request_rotation,
    ByAdmin(
        Scope(
            lambda topology, cmd: network_of_node(topology, cmd.node),
            of_event=_rotation_network_in_log,
        )
    ),
    Produces((HostKeyRotationRequested,)),
)

SPECS = (REPORT_ENDPOINT, LEAVE, ROTATE_KEY, REQUEST_ROTATION)
