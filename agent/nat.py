"""NAT traversal on the agent: which endpoint to give each peer, and what to tell.

Pure (the clock is an argument): the daemon calls it once per pass with the
device it just read.

Choosing. For a peer with a `paths` entry (it is behind a NAT, see
projections/sections/paths.py) the agent tries the candidates in order:

- a peer with a fresh handshake (younger than FRESH) keeps the endpoint its
  device has, whichever it is (roaming included: never fight a working path);
- otherwise the current candidate gets TRY_FOR seconds to handshake, then the
  next one is tried, round and round. Both ends do the same towards each
  other, so each one's packets open its own NAT for the other's (hole
  punching): with endpoint-independent NATs the public mappings meet.

TRY_FOR is three of WireGuard's handshake attempts (one every 5 s, REKEY_TIMEOUT),
so a candidate that answers at all answers within it. A host behind a NAT
keeps its mapping open with the network's persistent keepalive (25 s by
default, below the 30 s a Linux NAT keeps an unanswered UDP mapping and far
below the 120 s of an answered one): a network with keepalive 0 cannot keep
hosts behind NATs reachable.

Telling. A peer whose device shows a fresh handshake from an endpoint that
is neither its `peers` endpoint nor one of its candidates was seen somewhere
new (its public mapping, as its NAT rewrote it): the agent reports it once
(`endpoint.seen`), and the control plane offers it to everyone else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from agent.backend import DeviceState, PeerState
from events.desired import DesiredState

TRY_FOR = 15.0  # seconds a candidate gets to handshake before the next one is tried
FRESH = 180.0  # a handshake younger than this: the path works (WireGuard's REJECT_AFTER_TIME)


@dataclass(frozen=True)
class Attempt:
    """The endpoint given to a peer, since when (wall clock, as handshakes are)."""

    endpoint: str
    since: float


def fresh(last_handshake: float, now: float) -> bool:
    """Whether a handshake at `last_handshake` (0: never) still carries traffic."""
    return last_handshake > 0 and now - last_handshake < FRESH


def choose(
    candidates: tuple[str, ...],
    attempt: Attempt | None,
    have: PeerState | None,
    now: float,
) -> Attempt:
    """The endpoint to give a peer now (`candidates` is not empty)."""
    if have is not None and have.endpoint and fresh(have.last_handshake, now):
        if attempt is not None and attempt.endpoint == have.endpoint:
            return attempt
        return Attempt(have.endpoint, now)
    if attempt is None or attempt.endpoint not in candidates:
        return Attempt(candidates[0], now)
    if now - attempt.since < TRY_FOR:
        return attempt
    following = candidates[(candidates.index(attempt.endpoint) + 1) % len(candidates)]
    return Attempt(following, now)


@dataclass(frozen=True)
class Choice:
    """A pass's choice: the desired state with the chosen endpoints in place,
    the attempts to remember, and when to look again (None: no attempt pending)."""

    desired: DesiredState
    attempts: dict[str, Attempt]
    wake_at: float | None


def with_paths(
    desired: DesiredState,
    device: DeviceState | None,
    attempts: Mapping[str, Attempt],
    now: float,
) -> Choice:
    """`desired` with every peer that has candidates given the one to try now."""
    paths = desired.sections.paths
    if not paths:
        return Choice(desired, {}, None)
    have = {p.public_key: p for p in device.peers} if device is not None else {}
    peers = dict(desired.sections.peers)
    chosen: dict[str, Attempt] = {}
    wake_at: float | None = None
    for key, path in paths.items():
        entry = peers.get(key)
        if entry is None or not path.candidates:
            continue
        peer = have.get(key)
        attempt = choose(path.candidates, attempts.get(key), peer, now)
        chosen[key] = attempt
        if entry.endpoint != attempt.endpoint:
            peers[key] = msgspec.structs.replace(entry, endpoint=attempt.endpoint)
        if peer is None or not fresh(peer.last_handshake, now):
            due = attempt.since + TRY_FOR
            wake_at = due if wake_at is None else min(wake_at, due)
    sections = msgspec.structs.replace(desired.sections, peers=peers)
    return Choice(msgspec.structs.replace(desired, sections=sections), chosen, wake_at)


def sightings(
    desired: DesiredState,
    device: DeviceState,
    reported: Mapping[str, str],
    now: float,
) -> dict[str, str]:
    """Peers seen at an endpoint the control plane does not offer for them
    (and not reported yet): public key -> endpoint."""
    found = {}
    for peer in device.peers:
        entry = desired.sections.peers.get(peer.public_key)
        if entry is None or not peer.endpoint or not fresh(peer.last_handshake, now):
            continue
        path = desired.sections.paths.get(peer.public_key)
        offered = {entry.endpoint, *(path.candidates if path is not None else ())}
        if peer.endpoint in offered or reported.get(peer.public_key) == peer.endpoint:
            continue
        found[peer.public_key] = peer.endpoint
    return found


class PathKeeper:
    """What the daemon remembers between passes: the attempts, and the
    sightings it reported (so each is told once)."""

    def __init__(self) -> None:
        self.attempts: dict[str, Attempt] = {}
        self.reported: dict[str, str] = {}
        self.wake_at: float | None = None

    def apply(self, desired: DesiredState, device: DeviceState | None, now: float) -> DesiredState:
        choice = with_paths(desired, device, self.attempts, now)
        self.attempts, self.wake_at = choice.attempts, choice.wake_at
        return choice.desired

    def new_sightings(
        self, desired: DesiredState, device: DeviceState, now: float
    ) -> dict[str, str]:
        return sightings(desired, device, self.reported, now)
