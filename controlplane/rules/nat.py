"""NAT traversal (part of the host aggregate): where peers saw a host from.

A host behind a NAT announces its private address, which no one outside its
LAN can reach. Once it has a handshake with a peer that can be reached (it
sends first: its persistent keepalive does), that peer's WireGuard device
knows the host's public mapping (the source of its packets; stock WireGuard,
kernel or wireguard-go, shows it as the peer's endpoint). The peer's agent
reports it, signed, as `endpoint.seen`; the host's aggregate records it as
`host.endpoint_seen`, and the `paths` section offers it to every other peer
(projections/sections/paths.py).
"""

from __future__ import annotations

from controlplane.rules.base import (
    Context,
    Decision,
    Rejected,
    host_subject,
    one_event,
    parse_endpoint,
)
from controlplane.rules.spec import ByHost, CommandSpec, Produces
from events.commands import ErrorCode, ReportSeenEndpoint
from events.model import HostEndpointSeen
from projections.sections.paths import endpoint_ip
from projections.topology import Topology


def report_seen(topology: Topology, cmd: ReportSeenEndpoint, _ctx: Context) -> Decision:
    if cmd.host_id not in topology.hosts:
        raise Rejected(ErrorCode.NOT_FOUND, f"no host {cmd.host_id!r}")
    peer_id = topology.host_by_public_key.get(cmd.peer_key)
    peer = topology.hosts.get(peer_id) if peer_id is not None else None
    if peer is None or peer.host_id == cmd.host_id:
        raise Rejected(ErrorCode.NOT_FOUND, "no peer with that public key")
    endpoint = parse_endpoint(cmd.endpoint)
    if endpoint == endpoint_ip(endpoint):
        raise Rejected(ErrorCode.INVALID, f"invalid endpoint {cmd.endpoint!r}: expected IP:PORT")
    result = {"host_id": peer.host_id, "endpoint": endpoint}
    announced = {endpoint_ip(e) for e in peer.endpoints}
    # Seen at an address it announces: a LAN path, not a NAT mapping.
    if endpoint == peer.seen or endpoint_ip(endpoint) in announced:
        return Decision(result={**result, "changed": False})
    event = HostEndpointSeen(host_id=peer.host_id, endpoint=endpoint, seen_by=cmd.host_id)
    return one_event(topology, host_subject(peer.host_id), event, {**result, "changed": True})


REPORT_SEEN = CommandSpec[ReportSeenEndpoint](
    ReportSeenEndpoint,
    report_seen,
    ByHost(lambda cmd: cmd.host_id),
    Produces((HostEndpointSeen,), about=("host_id", "seen_by"), agree=(("endpoint", "endpoint"),)),
)

SPECS = (REPORT_SEEN,)
