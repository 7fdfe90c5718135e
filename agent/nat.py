"""NAT traversal and relays on the agent: which endpoint to give each peer,
and what to tell the control plane.

Pure (the clock is an argument): the daemon feeds it what the device reads
(every second: each peer's endpoint, handshake and byte counters) and calls
it once per pass.

Is a path working? WireGuard answers any data packet it decrypts within 10 s
(its passive keepalive) and every peer sends a persistent keepalive (25 s by
default), so bytes we send that go unanswered say the path is gone: an
attempt whose sent bytes have had no answer for TRY_FOR seconds has failed.
`Answers` keeps, per peer, when its received bytes last moved and since when
sent bytes are unanswered; the daemon probes a peer whose bytes have been
unanswered for PROBE_AFTER (a datagram into the tunnel, which its WireGuard
must answer), so a working path answers in time even when idle.

Choosing. For a peer with a `paths` entry (it is behind a NAT, or a relay
forwards between us, see projections/sections/paths.py) the agent tries:

- a working path stays, whatever endpoint the device has (roaming included:
  never fight a path that answers);
- a failing direct candidate gives way to the next one, round and round; once
  every direct candidate has failed (or a path that worked dies) the relay is
  next, when there is one; a failing relay gives way to the direct candidates;
- while on the relay, direct is tried again after RETRY_DIRECT (doubling up
  to RETRY_DIRECT_MAX after each failed trial; at multiples of the wait on the
  wall clock, so that both ends try together): a trial fails after TRIAL_FOR
  unanswered seconds, or as soon as the peer's packets come through the relay
  again (WireGuard then moves the endpoint back itself).

Both ends do this towards each other, so each one's packets open its own NAT
for the other's (hole punching), and a datagram through the relay makes the
other end's WireGuard roam to the relay too.

Asking. A peer all of whose direct paths fail, with no relay offered, is
asked for (`relay.request`): again after ASK_AGAIN if still none, doubling.

Telling. A peer whose device shows a fresh handshake from an endpoint that
is neither its `peers` endpoint nor one of its candidates (nor its relay) was
seen somewhere new (its public mapping, as its NAT rewrote it): the agent
reports it once (`endpoint.seen`), and the control plane offers it to
everyone else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import msgspec

from agent.backend import DeviceState, PeerState
from events.desired import DesiredState, PathEntry

TRY_FOR = 15.0  # unanswered seconds after which an attempt has failed (3 handshakes)
PROBE_AFTER = 2.0  # unanswered seconds after which a peer is probed each second
TRIAL_FOR = 5.0  # unanswered seconds after which a trial of direct, from the relay, failed
RETRY_DIRECT = 60.0  # on the relay: first trial of direct after this
RETRY_DIRECT_MAX = 960.0
ASK_AGAIN = 10.0  # no relay granted: asked again after this (doubling, to RETRY_DIRECT_MAX)
FRESH = 180.0  # a handshake younger than this: the path works (WireGuard's REJECT_AFTER_TIME)


def fresh(last_handshake: float, now: float) -> bool:
    """Whether a handshake at `last_handshake` (0: never) still carries traffic."""
    return last_handshake > 0 and now - last_handshake < FRESH


class Answers:
    """Per peer: when its received bytes last moved, and since when bytes sent
    to it are unanswered (None: answered)."""

    def __init__(self) -> None:
        self._bytes: dict[str, tuple[int, int]] = {}
        self.heard_at: dict[str, float] = {}
        self.unanswered: dict[str, float] = {}

    def observe(self, peer: PeerState, now: float) -> None:
        key = peer.public_key
        was = self._bytes.get(key)
        self._bytes[key] = (peer.rx_bytes, peer.tx_bytes)
        if was is None:
            return  # a first reading says nothing of what moved
        if peer.rx_bytes != was[0]:
            self.heard_at[key] = now
            self.unanswered.pop(key, None)
        elif peer.tx_bytes != was[1] and key not in self.unanswered:
            self.unanswered[key] = now

    def forget_others(self, keys: set[str]) -> None:
        for table in (self._bytes, self.heard_at, self.unanswered):
            for key in set(table) - keys:
                del table[key]

    def failing(self, key: str, since: float, now: float, after: float = TRY_FOR) -> bool:
        """Whether bytes sent to `key` since `since` went unanswered `after` seconds."""
        start = self.unanswered.get(key)
        return start is not None and now - max(start, since) >= after

    def heard_since(self, key: str, since: float) -> bool:
        return self.heard_at.get(key, 0.0) > since

    def to_probe(self, now: float) -> set[str]:
        """The peers unanswered for PROBE_AFTER: a probe makes a live one answer."""
        return {k for k, t in self.unanswered.items() if now - t >= PROBE_AFTER}


@dataclass(frozen=True)
class Attempt:
    """The endpoint given to a peer, since when (wall clock, as handshakes are)."""

    endpoint: str
    since: float
    relayed: bool = False  # the endpoint is the relay's
    worked: bool = False  # an answer came while on it
    trial: bool = False  # a trial of direct, from the relay
    lost: bool = False  # a path that worked died since the last answer
    tried: int = 1  # direct candidates tried in a row without an answer
    retry_at: float | None = None  # on the relay: when to try direct again
    backoff: float = RETRY_DIRECT
    offered: str = ""  # the relay offered when it was chosen ("": none)


def choose(
    key: str,
    entry: PathEntry,
    attempt: Attempt | None,
    have: PeerState | None,
    answers: Answers,
    now: float,
) -> Attempt:
    """The endpoint to give peer `key` now (its entry names at least one)."""
    relay = entry.relay
    newly = relay and (attempt is None or attempt.offered != relay)
    # A relay just opened for us: one end gave up on the direct path. Unless
    # the peer answered just now, both ends move to it (the relay forwards
    # only between ends that both send to it).
    if (
        newly
        and not (attempt is not None and attempt.relayed)
        and not answers.heard_since(key, now - TRIAL_FOR)
    ):
        return replace(_on_relay(relay, now, RETRY_DIRECT), offered=relay)
    return replace(_choose(key, entry, attempt, have, answers, now), offered=relay)


def _choose(
    key: str,
    entry: PathEntry,
    attempt: Attempt | None,
    have: PeerState | None,
    answers: Answers,
    now: float,
) -> Attempt:
    direct, relay = entry.candidates, entry.relay
    order = (*direct, relay) if relay else direct
    if attempt is None:
        if have is not None and have.endpoint and fresh(have.last_handshake, now):
            if not answers.failing(key, 0.0, now):
                # A path that works (the agent restarted, or a relay was just offered): kept.
                return Attempt(have.endpoint, now, relayed=have.endpoint == relay, worked=True)
            if relay and have.endpoint != relay:  # it worked and died
                return _on_relay(relay, now, RETRY_DIRECT)
        return Attempt(order[0], now, relayed=order[0] == relay)
    if (attempt.relayed and attempt.endpoint != relay) or (
        attempt.endpoint not in order and not attempt.worked
    ):
        return Attempt(order[0], now, relayed=order[0] == relay)  # no longer offered
    # The device moved the endpoint itself: the peer's packets came from there.
    if (
        have is not None
        and have.endpoint
        and have.endpoint != attempt.endpoint
        and answers.heard_since(key, attempt.since)
    ):
        if relay and have.endpoint == relay:
            backoff = (
                min(attempt.backoff * 2, RETRY_DIRECT_MAX) if attempt.trial else attempt.backoff
            )
            return _on_relay(relay, now, backoff)
        return Attempt(have.endpoint, now, worked=True)
    if not attempt.worked and answers.heard_since(key, attempt.since):
        attempt = replace(attempt, worked=True, trial=False, lost=False, tried=0)
        if not attempt.relayed:
            attempt = replace(attempt, backoff=RETRY_DIRECT, retry_at=None)
    if relay and attempt.lost and not attempt.worked:
        return _on_relay(relay, now, attempt.backoff)  # a relay came for a path that died
    limit = TRIAL_FOR if attempt.trial else TRY_FOR
    if not answers.failing(key, attempt.since, now, limit):
        due = attempt.retry_at
        if attempt.relayed and direct and due is not None and now >= due:
            return Attempt(direct[0], now, trial=True, backoff=attempt.backoff)
        return attempt
    # Failed: move on.
    if attempt.relayed:
        return Attempt(direct[0], now) if direct else Attempt(relay, now, relayed=True)
    if attempt.trial and relay:
        return _on_relay(relay, now, min(attempt.backoff * 2, RETRY_DIRECT_MAX))
    lost = attempt.worked or attempt.lost
    if relay and (lost or attempt.tried >= len(direct)):
        return _on_relay(relay, now, attempt.backoff)
    position = direct.index(attempt.endpoint) if attempt.endpoint in direct else -1
    following = direct[(position + 1) % len(direct)]
    tried = 1 if attempt.worked else attempt.tried + 1
    return Attempt(following, now, lost=lost, tried=tried)


def _on_relay(relay: str, now: float, backoff: float) -> Attempt:
    return Attempt(
        relay, now, relayed=True, worked=True, retry_at=retry_time(now, backoff), backoff=backoff
    )


def retry_time(now: float, backoff: float) -> float:
    """When to try direct again: the first multiple of `backoff` (wall clock)
    at least `backoff` from now. Both ends of a pair then try at the same
    moment (their clocks agree within seconds, and every backoff is a power of
    two times RETRY_DIRECT): two NATs open towards each other only together."""
    return math.ceil((now + backoff) / backoff) * backoff


def gave_up(entry: PathEntry | None, attempt: Attempt) -> bool:
    """Whether every direct path to a peer failed (or one that worked died)
    with no relay offered."""
    if entry is not None and entry.relay:
        return False
    direct = len(entry.candidates) if entry is not None else 1
    return not attempt.worked and (attempt.lost or attempt.tried > direct)


@dataclass(frozen=True)
class Choice:
    """A pass's choice: the desired state with the chosen endpoints in place,
    and the attempts to remember."""

    desired: DesiredState
    attempts: dict[str, Attempt]


def with_paths(
    desired: DesiredState,
    device: DeviceState | None,
    attempts: Mapping[str, Attempt],
    answers: Answers,
    now: float,
) -> Choice:
    """`desired` with every peer that has a `paths` entry given the endpoint
    to try now."""
    paths = desired.sections.paths
    if not paths:
        return Choice(desired, {})
    have = {p.public_key: p for p in device.peers} if device is not None else {}
    peers = dict(desired.sections.peers)
    chosen: dict[str, Attempt] = {}
    for key, path in paths.items():
        entry = peers.get(key)
        if entry is None or not (path.candidates or path.relay):
            continue
        attempt = choose(key, path, attempts.get(key), have.get(key), answers, now)
        chosen[key] = attempt
        if entry.endpoint != attempt.endpoint:
            peers[key] = msgspec.structs.replace(entry, endpoint=attempt.endpoint)
    sections = msgspec.structs.replace(desired.sections, peers=peers)
    return Choice(msgspec.structs.replace(desired, sections=sections), chosen)


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
        offered = {
            entry.endpoint,
            *(path.candidates if path is not None else ()),
            path.relay if path is not None else "",
        }
        if peer.endpoint in offered or reported.get(peer.public_key) == peer.endpoint:
            continue
        found[peer.public_key] = peer.endpoint
    return found


@dataclass
class PathKeeper:
    """What the daemon remembers between passes: the attempts, the answers
    its peers gave, the sightings it reported (each told once), and the relays
    it asked for (when to ask again)."""

    attempts: dict[str, Attempt] = field(default_factory=dict)
    answers: Answers = field(default_factory=Answers)
    reported: dict[str, str] = field(default_factory=dict)
    # Peers whose direct paths all failed without a path entry to try (no
    # relay offered): since when (a failing peer with no entry has no attempt).
    failing_since: dict[str, float] = field(default_factory=dict)
    asked: dict[str, tuple[float, float]] = field(default_factory=dict)  # key -> (next ask, wait)

    def observe(self, device: DeviceState, now: float) -> None:
        for peer in device.peers:
            self.answers.observe(peer, now)
        self.answers.forget_others({p.public_key for p in device.peers})

    def apply(self, desired: DesiredState, device: DeviceState | None, now: float) -> DesiredState:
        choice = with_paths(desired, device, self.attempts, self.answers, now)
        self.attempts = choice.attempts
        return choice.desired

    def moved(self, desired: DesiredState, device: DeviceState | None, now: float) -> bool:
        """Whether a pass now would give some peer another endpoint."""
        choice = with_paths(desired, device, self.attempts, self.answers, now)
        return any(
            self.attempts.get(k) is None or self.attempts[k].endpoint != a.endpoint
            for k, a in choice.attempts.items()
        )

    def to_probe(self, now: float) -> set[str]:
        """Peers unanswered for a while, and those given a new endpoint in the
        last seconds: a datagram now punches our NAT open towards it, or
        tells a relay where we are (it forwards only to ends it heard from)."""
        recent = {k for k, a in self.attempts.items() if now - a.since < PROBE_AFTER + 1}
        return self.answers.to_probe(now) | recent

    def to_ask(self, desired: DesiredState, now: float) -> list[str]:
        """Peers to ask a relay for now: all their direct paths failed and no
        relay is offered (asked again after a wait, doubling)."""
        wanted = []
        for key in desired.sections.peers:
            entry = desired.sections.paths.get(key)
            if entry is not None and entry.relay:
                self.asked.pop(key, None)
                continue
            attempt = self.attempts.get(key)
            if attempt is not None:
                stuck = gave_up(entry, attempt)
            else:  # no entry: reached at its `peers` endpoint
                stuck = self.answers.failing(key, 0.0, now)
            if not stuck:
                continue
            due, _ = self.asked.get(key, (0.0, ASK_AGAIN))
            if now >= due:
                wanted.append(key)
        return wanted

    def asked_for(self, key: str, now: float, granted: bool) -> None:
        _, wait = self.asked.get(key, (0.0, ASK_AGAIN / 2))
        wait = min(wait * 2, RETRY_DIRECT_MAX)
        self.asked[key] = (now + (ASK_AGAIN if granted else wait), wait)

    def new_sightings(
        self, desired: DesiredState, device: DeviceState, now: float
    ) -> dict[str, str]:
        return sightings(desired, device, self.reported, now)
