"""The `routes` section: destinations routed through the overlay interface.

Nothing builds routes yet (the overlay's own range is covered by each
address's connected route); egress gateways will. The section exists so that
agents already reconcile it: they own exactly the routes they added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from events.desired import RouteEntry
from events.model import Event
from projections.sections.base import Reread
from projections.topology import Topology


class RouteSection:
    reacts_to: ClassVar[tuple[type[Event], ...]] = ()
    name: ClassVar[str] = "routes"

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def entries(self, host_id: str) -> dict[str, RouteEntry]:
        return {}

    def entry(self, host_id: str, key: str) -> RouteEntry | None:
        return None

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        return ()
