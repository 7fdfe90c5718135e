"""NAT traversal, the pure parts: `endpoint.seen` (what it records, what it
ignores, its refusals), the `paths` section (the candidates every viewer gets,
and what one sighting sends), and the agent's choice of endpoint (tables on a
fake clock)."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from agent.backend import DeviceState, PeerState
from agent.nat import FRESH, TRY_FOR, Attempt, PathKeeper, choose, sightings, with_paths
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
T = 1_000_000.0


def peer(endpoint: str | None, handshake: float) -> PeerState:
    return PeerState(public_key="k", endpoint=endpoint, last_handshake=handshake)


@pytest.mark.parametrize(
    ("attempt", "have", "now", "expected"),
    [
        # Nothing tried yet: the first candidate, from now.
        (None, None, T, Attempt(A, T)),
        (None, peer(None, 0), T, Attempt(A, T)),
        # Trying A: kept for TRY_FOR seconds, then B, then A again.
        (Attempt(A, T), peer(A, 0), T + TRY_FOR - 1, Attempt(A, T)),
        (Attempt(A, T), peer(A, 0), T + TRY_FOR, Attempt(B, T + TRY_FOR)),
        (Attempt(B, T), peer(B, 0), T + TRY_FOR, Attempt(A, T + TRY_FOR)),
        # A handshake that is fresh: whatever endpoint the device has stays
        # (a roamed one included), and the attempt stops moving on.
        (Attempt(A, T), peer(A, T + 3), T + 100, Attempt(A, T)),
        (Attempt(A, T), peer("203.0.113.5:999", T + 3), T + 5, Attempt("203.0.113.5:999", T + 5)),
        (None, peer(B, T - 10), T, Attempt(B, T)),
        # A stale handshake (the path died): back to trying, from the first.
        (Attempt(A, T - 500), peer(A, T - FRESH), T, Attempt(B, T)),
        (Attempt("gone:1", T), peer("gone:1", T - FRESH - 1), T + 1, Attempt(A, T + 1)),
    ],
)
def test_choose(
    attempt: Attempt | None, have: PeerState | None, now: float, expected: Attempt
) -> None:
    assert choose((A, B), attempt, have, now) == expected


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


def test_the_desired_state_gets_the_endpoint_being_tried_and_a_wake() -> None:
    choice = with_paths(desired(), None, {}, T)
    assert choice.desired.peers["k"].endpoint == A
    assert choice.desired.peers["o"] == desired().peers["o"]  # no path: untouched
    assert choice.desired.peers["k"].persistent_keepalive == 25
    assert choice.wake_at == T + TRY_FOR
    device = DeviceState(public_key="me", listen_port=51820, peers=(peer(A, T + 1),))
    working = with_paths(choice.desired, device, choice.attempts, T + 2)
    assert working.wake_at is None  # it works: nothing to look at again
    # No paths at all: the desired state as it came.
    plain = desired(())
    assert with_paths(plain, None, {}, T).desired is plain


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
