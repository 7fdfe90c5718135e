"""The sections of a host's desired state, one module per feature.

Each section is a class with:

- `name`: its field in `events.desired.Sections`;
- `rereads(topology, event)`: the rule saying whose entries an event changed
  (pure, run right after the event is folded into the topology);
- an instance per batch of events (`Section(topology)`, free to cache within
  the batch) with `entries(host)`, the whole section as the host sees it
  (sorted by key), and `entry(host, key)`, one entry (None: the host has no
  such entry). Entries may depend on who looks (the viewer `host`).

A change then costs work and bytes in proportion to the entries it changes:
the hosts named by the rereads get a delta with just those keys.
"""

from __future__ import annotations

from projections.sections.addresses import AddressSection
from projections.sections.base import Reread, SectionRule
from projections.sections.dns import DnsSection, DnsZoneSection
from projections.sections.egress import (
    EgressSection,
    ExitSection,
    ForwardSection,
    RouteSection,
)
from projections.sections.firewall import FirewallSection
from projections.sections.ingress import ClientSection
from projections.sections.interface import InterfaceSection
from projections.sections.paths import PathSection
from projections.sections.peers import PeerSection, peer_endpoint
from projections.sections.relays import RelaySection

SECTIONS: tuple[type[SectionRule], ...] = (
    InterfaceSection,
    AddressSection,
    PeerSection,
    RouteSection,
    FirewallSection,
    EgressSection,
    ForwardSection,
    ExitSection,
    DnsSection,
    DnsZoneSection,
    ClientSection,
    PathSection,
    RelaySection,
)

__all__ = ["SECTIONS", "Reread", "SectionRule", "peer_endpoint"]
