"""What agents report on `netmesh.report.<host_id>.<kind>` (stream NETMESH_REPORTS).

Reports are observations, not admin actions: they are kept (the latest of each
kind per host) but are not events. An observation that changes the network (a
new endpoint) becomes an event through the `endpoint.report` command.
"""

from __future__ import annotations

import msgspec

APPLIED = "applied"


class PeerReport(msgspec.Struct, frozen=True, kw_only=True):
    public_key: str
    endpoint: str | None = None
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0


class AppliedReport(msgspec.Struct, frozen=True, kw_only=True):
    host_id: str
    revision: int  # the desired revision the interface now reflects (0 = none yet)
    at: float
    interface: str
    error: str | None = None  # set when the last apply failed; revision is then the last good
    # reconciler (interface, link, peers, routes: agent/reconcile.py) -> why its last pass failed
    reconciler_errors: dict[str, str] = {}
    peers: tuple[PeerReport, ...] = ()
    # Desired-state messages refused since the agent started (unsigned, badly
    # signed), and why the last one was: someone is publishing on our subject.
    rejected: int = 0
    last_rejection: str | None = None


applied_encoder = msgspec.json.Encoder()
applied_decoder = msgspec.json.Decoder(AppliedReport)
