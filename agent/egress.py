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


# -- is a gateway alive? --------------------------------------------------------
#
# A gateway is alive while its WireGuard peer sends us something. Idle, it may
# send nothing for minutes, so the agent probes each gateway of a range that
# has more than one every PROBE_INTERVAL: a small UDP datagram to its overlay
# address (what happens to it there does not matter). WireGuard answers any
# data packet it decrypts with at least a keepalive within 10 s (its passive
# keepalive), so a live gateway's received bytes move at least every ~10 s; a
# gateway whose bytes have not moved for DEAD_AFTER is taken for gone. Failover
# thus takes at most DEAD_AFTER + PROBE_INTERVAL (+ a pass), and the way back
# starts at the first bytes the gateway sends again (a handshake, a reply).

PROBE_INTERVAL = 1.0
DEAD_AFTER = 15.0
PROBE_PORT = 9  # discard


class Liveness:
    """Per peer, the last time its received bytes moved (a fake clock in
    tests: every method takes `now`)."""

    def __init__(self, dead_after: float = DEAD_AFTER) -> None:
        self.dead_after = dead_after
        self._rx: dict[str, int] = {}
        self._moved: dict[str, float] = {}

    def observe(self, key: str, rx_bytes: int, now: float) -> None:
        """A reading of a peer's received bytes. The first reading counts as
        movement: a gateway is given DEAD_AFTER to show it is alive."""
        if self._rx.get(key) != rx_bytes or key not in self._moved:
            self._moved[key] = now
        self._rx[key] = rx_bytes

    def forget_others(self, keys: set[str]) -> None:
        for key in set(self._rx) - keys:
            del self._rx[key]
            self._moved.pop(key, None)

    def dead(self, now: float) -> frozenset[str]:
        """The peers observed whose bytes have not moved for `dead_after`."""
        return frozenset(k for k, t in self._moved.items() if now - t >= self.dead_after)


def candidates(egress: Mapping[str, EgressEntry]) -> set[str]:
    """The gateways worth watching: those of ranges with a second gateway to
    fail over to."""
    return {via.peer for entry in egress.values() if len(entry.via) > 1 for via in entry.via}
