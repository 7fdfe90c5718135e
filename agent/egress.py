"""Which gateway carries each egress range (pure).

The `egress` section lists, per range, the gateways forwarding to it, best
first. The range rides on the allowed IPs of the first one that is alive
(WireGuard routes by allowed IPs: one peer per range), and the `routes`
section sends it into the interface. `with_egress` gives the desired state
the peers reconciler enforces: the control plane's, with the ranges added to
the chosen peers' allowed IPs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import msgspec

from events.desired import DesiredState, EgressEntry


def choose(
    egress: Mapping[str, EgressEntry], alive: Callable[[str], bool] = lambda _key: True
) -> dict[str, str]:
    """Range -> the public key of the gateway carrying it: the first alive,
    or the first of all when none is (better a gateway that may come back
    than no route at all)."""
    chosen = {}
    for cidr, entry in egress.items():
        if not entry.via:
            continue
        live = [via.peer for via in entry.via if alive(via.peer)]
        chosen[cidr] = live[0] if live else entry.via[0].peer
    return chosen


def with_egress(desired: DesiredState, chosen: Mapping[str, str]) -> DesiredState:
    """`desired` with each chosen range in its gateway's allowed IPs (a
    gateway that is not a peer carries nothing)."""
    if not chosen:
        return desired
    extra: dict[str, list[str]] = {}
    for cidr, key in chosen.items():
        if key in desired.sections.peers:
            extra.setdefault(key, []).append(cidr)
    if not extra:
        return desired
    peers = dict(desired.sections.peers)
    for key, ranges in extra.items():
        peer = peers[key]
        allowed = tuple(sorted({*peer.allowed_ips, *ranges}))
        peers[key] = msgspec.structs.replace(peer, allowed_ips=allowed)
    sections = msgspec.structs.replace(desired.sections, peers=peers)
    return msgspec.structs.replace(desired, sections=sections)
