"""decide(topology, command, context) -> Decision: the rules of netmesh.

Pure: no I/O, no clock, no randomness (the context brings the time, the actor
and any fresh ids or secrets). A refused command raises `Rejected` with a stable
code and a one-line message meant for the person who typed the command.

The rules themselves live per aggregate in `controlplane.rules`, each beside
its command's spec; this is the one entry point, dispatching on the spec.
"""

from __future__ import annotations

from controlplane.rules import spec_for
from controlplane.rules.base import Context, Decision, Rejected
from controlplane.rules.nodes import host_id_for
from events.commands import Command
from projections.topology import Topology

__all__ = ["Context", "Decision", "Rejected", "decide", "host_id_for"]


def decide(topology: Topology, command: Command, ctx: Context) -> Decision:
    """Raises Rejected."""
    return spec_for(command).handler(topology, command, ctx)
