"""NAT traversal, the pure parts: `endpoint.seen` (what it records, what it
ignores, its refusals), the `paths` section (the candidates every viewer gets,
and what one sighting sends), and the agent's choice of endpoint (tables on a
fake clock)."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from agent.backend import DeviceState, PeerState
from agent.nat import (
    ASK_AGAIN,
    FRESH,
    PROBE_AFTER,
    RETRY_DIRECT,
    TRY_FOR,
    Answers,
    Attempt,
    PathKeeper,
    choose,
    gave_up,
    sightings,
    with_paths,
)
from controlplane.audit import verify_log
from events.commands import (
    CreateEnrollmentKey,
    CreateNetwork,
    Join,
    ReportEndpoint,
    ReportSeenEndpoint,
)
from events.desired import DesiredDelta, DesiredState, PathEntry, PeerEntry, Sections
from events.model import HostEndpointSeen
from events.signing import public_text
from events.tokens import make_token
from projections.desired import DesiredChanges, desired_for, messages
from tests.factories import World, public_key
from tests.test_gateway import host, office
from tests.test_policy_commands import ROOT, refused

PUBLIC_1 = "198.51.100.1"  # router of a1 and a2
PUBLIC_2 = "198.51.100.2"  # router of c


def lab() -> World:
    """pub (public, 203.0.113.9), a1 and a2 behind one NAT (192.168.1.10/.11),
    c behind another (192.168.2.10): each announces what it sees on its own
    interfaces."""
    world = office("pub", "a1", "a2", "c")
    for name, address in [
        ("pub", "203.0.113.9"),
        ("a1", "192.168.1.10"),
        ("a2", "192.168.1.11"),
        ("c", "192.168.2.10"),
    ]:
        world.run(ReportEndpoint(host_id=host(world, name), endpoints=(address,)))
    return world


def seen(world: World, by: str, name: str, endpoint: str) -> list[object]:
    """`by` reports seeing host `name` at `endpoint`; the events appended."""
    n = ["pub", "a1", "a2", "c"].index(name) + 1
    command = ReportSeenEndpoint(host_id=host(world, by), peer_key=public_key(n), endpoint=endpoint)
    decision, _ = world.run(command)
    return [event for _, event in decision.events]


def paths(world: World, viewer: str) -> dict[str, tuple[str, ...]]:
    state = desired_for(world.topology, host(world, viewer))
    assert state is not None
    names = {public_key(n): name for n, name in enumerate(["pub", "a1", "a2", "c"], 1)}
    return {names[key]: entry.candidates for key, entry in state.sections.paths.items()}


# -- the command ---------------------------------------------------------------


def test_a_sighting_records_the_public_mapping_once() -> None:
    world = lab()
    (event,) = seen(world, "pub", "a1", f"{PUBLIC_1}:51820")
    assert event == HostEndpointSeen(
        host_id=host(world, "a1"), endpoint=f"{PUBLIC_1}:51820", seen_by=host(world, "pub")
    )
    assert world.topology.hosts[host(world, "a1")].seen == f"{PUBLIC_1}:51820"
    # The same again, from anyone: nothing new.
    assert seen(world, "c", "a1", f"{PUBLIC_1}:51820") == []
    # Seen at an address it announces (its LAN, by a neighbour): not a mapping.
    assert seen(world, "a2", "a1", "192.168.1.10:51820") == []
    # A new mapping (the NAT rebound): recorded.
    (event,) = seen(world, "pub", "a1", f"{PUBLIC_1}:40001")
    assert isinstance(event, HostEndpointSeen) and event.endpoint == f"{PUBLIC_1}:40001"


def test_the_log_proves_who_saw_whom() -> None:
    world = World()
    world.add_root_admin(ROOT)
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24"), ROOT)
    decision, _ = world.run(CreateEnrollmentKey(network="office", uses=None), ROOT)
    key_id = decision.result["key_id"]
    token = make_token("nats://cp:4222", key_id, f"s{key_id.removeprefix('k')}")
    keys = [SigningKey.generate() for _ in range(2)]
    for n, key in enumerate(keys, 1):
        join = Join(
            token=token, public_key=public_key(n), name=f"h{n}", signing_key=public_text(key)
        )
        world.run(join, signed_by=key)
    sighting = ReportSeenEndpoint(
        host_id=host(world, "h1"), peer_key=public_key(2), endpoint=f"{PUBLIC_1}:51820"
    )
    world.run(sighting, signed_by=keys[0])
    assert verify_log(world.log).problems == []
    # Signed by another host's key: the log says so.
    forged = ReportSeenEndpoint(
        host_id=host(world, "h1"), peer_key=public_key(2), endpoint=f"{PUBLIC_1}:40000"
    )
    world.run(forged, signed_by=keys[1])
    assert [why for _, why in verify_log(world.log).problems] == [
        "signed by a key that is not the host's"
    ]


@pytest.mark.parametrize(
    ("peer_key", "endpoint", "code", "needle"),
    [
        (public_key(9), "198.51.100.1:51820", "not_found", "no peer"),
        (public_key(1), "198.51.100.1:51820", "not_found", "no peer"),  # itself
        (public_key(2), "198.51.100.1", "invalid", "IP:PORT"),
        (public_key(2), "not-an-address", "invalid", "not-an-address"),
        (public_key(2), "198.51.100.1:0", "invalid", "port"),
    ],
)
def test_sightings_refused(peer_key: str, endpoint: str, code: str, needle: str) -> None:
    world = lab()
    command = ReportSeenEndpoint(host_id=host(world, "pub"), peer_key=peer_key, endpoint=endpoint)
    rejected = refused(world, command)
    assert (rejected.code, needle in rejected.message) == (code, True), rejected.message
    assert world.topology.hosts[host(world, "a1")].seen == ""


# -- the paths section ---------------------------------------------------------------


def test_candidates_put_the_lan_first_behind_the_same_nat() -> None:
    world = lab()
    assert all(paths(world, name) == {} for name in ("pub", "a1", "a2", "c"))  # nobody seen
    seen(world, "pub", "a1", f"{PUBLIC_1}:51820")
    seen(world, "pub", "a2", f"{PUBLIC_1}:40002")
    seen(world, "pub", "c", f"{PUBLIC_2}:51820")
    a1 = (f"{PUBLIC_1}:51820", "192.168.1.10:51820")
    a2 = (f"{PUBLIC_1}:40002", "192.168.1.11:51820")
    c = (f"{PUBLIC_2}:51820", "192.168.2.10:51820")
    assert paths(world, "pub") == {"a1": a1, "a2": a2, "c": c}
    assert paths(world, "c") == {"a1": a1, "a2": a2}
    # a1 and a2 share a public address: each other's LAN address first.
    assert paths(world, "a1") == {"a2": a2[::-1], "c": c}
    assert paths(world, "a2") == {"a1": a1[::-1], "c": c}


def test_a_sighting_sends_small_deltas_that_agree_with_snapshots() -> None:
    world = lab()
    seen(world, "pub", "a1", f"{PUBLIC_1}:51820")
    published = {h: world.topology.revision_of(h) for h in world.topology.hosts}
    _, touched = world.run(
        ReportSeenEndpoint(
            host_id=host(world, "pub"), peer_key=public_key(3), endpoint=f"{PUBLIC_1}:40002"
        )
    )
    changes = DesiredChanges()
    for t in touched:
        changes.add(t)
    sent = {m.host_id: m for m in messages(world.topology, changes, published)}
    # Everyone who sees a2 learns its candidates; a2 re-reads its own (a1's order moved).
    assert set(sent) == {host(world, n) for n in ("pub", "a1", "a2", "c")}
    for name in ("pub", "a1", "a2", "c"):
        message = sent[host(world, name)]
        assert isinstance(message, DesiredDelta)
        assert set(message.upsert.peers) == set()  # the peers section is untouched
        expected = paths(world, name)
        got = {key: e.candidates for key, e in message.upsert.paths.items()}
        names = {public_key(n): x for n, x in enumerate(["pub", "a1", "a2", "c"], 1)}
        assert {names[k]: v for k, v in got.items()} == {
            k: v for k, v in expected.items() if k in {names[key] for key in got}
        }
    to_a2, to_pub = sent[host(world, "a2")], sent[host(world, "pub")]
    assert isinstance(to_a2, DesiredDelta) and isinstance(to_pub, DesiredDelta)
    assert set(to_a2.upsert.paths) == {public_key(2)}  # a1, LAN first now
    assert set(to_pub.upsert.paths) == {public_key(3)}


# -- the agent's choice (a fake clock: wall seconds, as handshakes are) -------------------

A, B = "198.51.100.1:51820", "192.168.1.10:51820"
RELAY = "203.0.113.1:52000"
T = 1_000_000.0
DIRECT = PathEntry(candidates=(A, B))
RELAYED = PathEntry(candidates=(A, B), relay=RELAY, relay_node="r")


def peer(endpoint: str | None, handshake: float, rx: int = 0, tx: int = 0) -> PeerState:
    return PeerState(
        public_key="k", endpoint=endpoint, last_handshake=handshake, rx_bytes=rx, tx_bytes=tx
    )


class Wire:
    """Peer k's device on a fake clock: what it sent and heard, read every second."""

    def __init__(self) -> None:
        self.answers = Answers()
        self.rx = self.tx = 0
        self.endpoint: str | None = None
        self.read(T - 1)

    def read(self, now: float, *, sent: bool = False, heard_from: str | None = None) -> PeerState:
        self.tx += 148 if sent else 0
        if heard_from is not None:
            self.rx += 92
            self.endpoint = heard_from  # WireGuard roams to where it heard from
        state = peer(self.endpoint, T if self.rx else 0, self.rx, self.tx)
        self.answers.observe(state, now)
        return state


def run(
    entry: PathEntry,
    wire: Wire,
    seconds: range,
    attempt: Attempt | None = None,
    answered_on: frozenset[str] = frozenset(),
) -> Attempt:
    """Each second: k is sent something; it answers when the endpoint it is
    given is one of `answered_on`. The attempt after the last second."""
    for second in seconds:
        now = T + second
        have = wire.read(now)
        attempt = choose("k", entry, attempt, have, wire.answers, now)
        wire.endpoint = attempt.endpoint  # the pass sets it
        wire.read(
            now + 0.5,
            sent=True,
            heard_from=attempt.endpoint if attempt.endpoint in answered_on else None,
        )
    assert attempt is not None
    return attempt


def test_the_first_candidate_first_and_a_working_path_kept() -> None:
    wire = Wire()
    assert choose("k", DIRECT, None, None, wire.answers, T) == Attempt(A, T)
    # The agent restarted beside a device with a fresh handshake: kept.
    kept = choose("k", DIRECT, None, peer(B, T - 10), wire.answers, T)
    assert (kept.endpoint, kept.worked) == (B, True)
    # A relay-only entry (a peer with no endpoint of its own).
    only = PathEntry(candidates=(), relay=RELAY)
    assert choose("k", only, None, None, wire.answers, T).relayed


def test_unanswered_candidates_are_tried_in_turn_then_asked_a_relay_for() -> None:
    wire = Wire()
    on_a = run(DIRECT, wire, range(0, int(TRY_FOR)))
    assert on_a.endpoint == A and not gave_up(DIRECT, on_a)
    on_b = run(DIRECT, wire, range(int(TRY_FOR), int(TRY_FOR) + 2), on_a)
    assert on_b.endpoint == B and on_b.tried == 2 and not gave_up(DIRECT, on_b)
    again = run(DIRECT, wire, range(int(TRY_FOR) + 2, int(3 * TRY_FOR)), on_b)
    assert again.endpoint == A and gave_up(DIRECT, again)  # every direct path failed
    assert not gave_up(RELAYED, again)  # ... unless a relay is offered


def test_an_answered_candidate_stays_while_it_answers() -> None:
    wire = Wire()
    attempt = run(DIRECT, wire, range(0, 200), answered_on=frozenset({A}))
    assert (attempt.endpoint, attempt.worked, attempt.since) == (A, True, T)


def test_a_relay_opened_for_a_pair_is_taken_at_once_unless_the_peer_just_answered() -> None:
    wire = Wire()
    failed = run(DIRECT, wire, range(0, int(3 * TRY_FOR)))
    assert gave_up(DIRECT, failed)  # asked for: the relay comes in the entry
    now = T + 3 * TRY_FOR
    relayed = choose("k", RELAYED, failed, wire.read(now), wire.answers, now)
    assert relayed.relayed and relayed.since == now and relayed.offered == RELAY
    # The other end (no attempt yet, or a direct one): the relay too, unless
    # the peer answered within TRIAL_FOR.
    assert choose("k", RELAYED, None, None, wire.answers, now).relayed
    working = run(DIRECT, wire, range(50, 60), answered_on=frozenset({A}))
    kept = choose("k", RELAYED, working, wire.read(T + 60), wire.answers, T + 60)
    assert kept.endpoint == A and kept.offered == RELAY
    # Once known, the same relay is no news: a working direct path stays.
    assert run(RELAYED, wire, range(61, 120), kept, frozenset({A})).endpoint == A


def test_a_direct_path_that_dies_fails_over_to_the_relay_within_try_for() -> None:
    wire = Wire()
    working = run(RELAYED, wire, range(0, 30), answered_on=frozenset({A}))
    assert working.endpoint == A
    # Cut at second 30: the relay from TRY_FOR after the first unanswered datagram.
    cut = run(RELAYED, wire, range(30, 30 + int(TRY_FOR) + 2), working, frozenset({RELAY}))
    assert cut.relayed and cut.since <= T + 30 + TRY_FOR + 1
    # No relay offered: the next candidate, and a relay is asked for at once.
    other = Wire()
    lost = run(DIRECT, other, range(0, 30), answered_on=frozenset({A}))
    lost = run(DIRECT, other, range(30, 30 + int(TRY_FOR) + 2), lost)
    assert lost.endpoint == B and lost.lost and gave_up(DIRECT, lost)


def test_from_the_relay_direct_is_tried_again_with_a_growing_wait() -> None:
    wire = Wire()
    relayed = run(RELAYED, wire, range(0, 32), answered_on=frozenset({RELAY}))
    retry = relayed.retry_at
    assert retry is not None and retry % RETRY_DIRECT == 0  # both ends try together
    assert relayed.since + RETRY_DIRECT <= retry < relayed.since + 2 * RETRY_DIRECT
    due = int(retry - T)
    # Direct still fails: a trial of TRIAL_FOR, then the relay, waiting twice as long.
    after = run(RELAYED, wire, range(32, due + 1), relayed, frozenset({RELAY}))
    assert after.trial and after.endpoint == A
    back = run(RELAYED, wire, range(due + 1, due + 10), after, frozenset({RELAY}))
    assert back.relayed and back.backoff == 2 * RETRY_DIRECT
    assert back.retry_at is not None and back.retry_at % (2 * RETRY_DIRECT) == 0
    # Direct works again: the trial answers and direct stays.
    again = int(back.retry_at - T)
    direct = run(RELAYED, wire, range(due + 10, again + 30), back, frozenset({RELAY, A}))
    assert direct.endpoint == A and direct.worked and not direct.trial and not direct.relayed


def test_a_relay_offered_for_a_path_that_died_is_taken_at_once() -> None:
    wire = Wire()
    working = run(DIRECT, wire, range(0, 30), answered_on=frozenset({A}))
    lost = run(DIRECT, wire, range(30, 30 + int(TRY_FOR) + 2), working)
    assert lost.lost and lost.endpoint == B
    now = T + 30 + TRY_FOR + 3
    assert choose("k", RELAYED, lost, wire.read(now), wire.answers, now).relayed
    # The same when the relay comes with the entry (a peer that had none):
    # the device's endpoint, which stopped answering, is not kept.
    dead = peer(A, T + 20, wire.rx, wire.tx)
    assert choose("k", RELAYED, None, dead, wire.answers, now).relayed


def test_a_trial_ends_as_soon_as_the_peer_comes_through_the_relay() -> None:
    wire = Wire()
    trial = Attempt(A, T, trial=True, backoff=RETRY_DIRECT)
    wire.read(T + 0.5, sent=True, heard_from=RELAY)  # the peer's packet, through the relay
    back = choose("k", RELAYED, trial, wire.read(T + 1), wire.answers, T + 1)
    assert back.relayed and back.backoff == 2 * RETRY_DIRECT


def test_a_failing_relay_gives_way_to_direct_and_a_withdrawn_one_at_once() -> None:
    wire = Wire()
    relayed = Attempt(RELAY, T, relayed=True, worked=True, retry_at=T + 999)
    failed = run(RELAYED, wire, range(0, int(TRY_FOR) + 2), relayed)
    assert failed.endpoint == A and not failed.relayed
    withdrawn = choose("k", DIRECT, relayed, None, wire.answers, T)
    assert withdrawn == Attempt(A, T)


def test_the_device_s_own_roaming_is_followed() -> None:
    wire = Wire()
    attempt = Attempt(A, T, worked=True)
    roamed = "203.0.113.5:999"
    wire.read(T + 1, heard_from=roamed)
    assert choose("k", DIRECT, attempt, wire.read(T + 2), wire.answers, T + 2) == Attempt(
        roamed, T + 2, worked=True
    )


def test_an_idle_peer_is_not_failing_and_an_unanswered_one_is_probed() -> None:
    wire = Wire()
    for second in range(100):  # nothing sent, nothing heard
        wire.read(T + second)
    assert not wire.answers.failing("k", T, T + 100) and wire.answers.to_probe(T + 100) == set()
    wire.read(T + 100, sent=True)
    assert wire.answers.to_probe(T + 101) == set()
    assert wire.answers.to_probe(T + 100 + PROBE_AFTER) == {"k"}
    wire.read(T + 103, heard_from=A)
    assert wire.answers.to_probe(T + 104) == set()


def desired(candidates: tuple[str, ...] = (A, B)) -> DesiredState:
    entry = PeerEntry(allowed_ips=("10.0.0.2/32",), endpoint=B, persistent_keepalive=25)
    other = PeerEntry(allowed_ips=("10.0.0.3/32",), endpoint="203.0.113.9:51820")
    return DesiredState(
        host_id="h",
        revision=7,
        sections=Sections(
            peers={"k": entry, "o": other},
            paths={"k": PathEntry(candidates=candidates)} if candidates else {},
        ),
    )


def test_the_desired_state_gets_the_endpoint_being_tried() -> None:
    choice = with_paths(desired(), None, {}, Answers(), T)
    assert choice.desired.peers["k"].endpoint == A
    assert choice.desired.peers["o"] == desired().peers["o"]  # no path: untouched
    assert choice.desired.peers["k"].persistent_keepalive == 25
    # No paths at all: the desired state as it came.
    plain = desired(())
    assert with_paths(plain, None, {}, Answers(), T).desired is plain


def test_the_keeper_asks_for_a_relay_once_per_wait() -> None:
    keeper = PathKeeper()
    state = desired()
    keeper.attempts["k"] = Attempt(A, T, tried=3)  # every direct path failed
    assert keeper.to_ask(state, T) == ["k"]
    keeper.asked_for("k", T, granted=False)
    assert keeper.to_ask(state, T + 1) == []
    assert keeper.to_ask(state, T + ASK_AGAIN) == ["k"]
    keeper.asked_for("k", T + ASK_AGAIN, granted=False)
    assert keeper.to_ask(state, T + 2 * ASK_AGAIN) == []  # the wait doubled
    assert keeper.to_ask(state, T + 3 * ASK_AGAIN) == ["k"]


def test_sightings_are_new_endpoints_with_fresh_handshakes_told_once() -> None:
    state = desired()
    keeper = PathKeeper()
    roamed = PeerState(public_key="o", endpoint="198.51.100.7:4000", last_handshake=T - 5)
    device = DeviceState(
        public_key="me",
        listen_port=51820,
        peers=(
            peer(A, T - 5),  # a candidate: known already
            roamed,
            PeerState(public_key="x", endpoint="198.51.100.8:1", last_handshake=T),  # not a peer
        ),
    )
    assert keeper.new_sightings(state, device, T) == {"o": "198.51.100.7:4000"}
    keeper.reported["o"] = "198.51.100.7:4000"
    assert keeper.new_sightings(state, device, T) == {}
    # Not with a stale handshake (an old source says nothing of now).
    assert sightings(state, device, {}, T + FRESH) == {}
