"""Relays, the pure parts: `relay add/remove` and `relay.request` (what they
append, their refusals, what the log proves), the sections (the relay's
`relays`, the pair's `paths`), what each change sends, and the read model."""

from __future__ import annotations

from pathlib import Path

import pytest
from nacl.signing import SigningKey

from controlplane.audit import verify_log
from controlplane.rules.base import Rejected
from controlplane.rules.relays import DEFAULT_PORTS
from events.commands import (
    AddRelay,
    CreateEnrollmentKey,
    CreateNetwork,
    Join,
    RemoveNode,
    RemoveRelay,
    ReportEndpoint,
    ReportSeenEndpoint,
    RequestRelay,
)
from events.desired import DesiredDelta, PathEntry, RelayEntry
from events.model import RelayAdded, RelayPairOpened, RelayRemoved
from events.signing import public_text
from events.tokens import make_token
from projections.desired import desired_for
from tests.factories import World, public_key
from tests.test_gateway import host, reloaded, sent_by
from tests.test_policy_commands import ROOT, appended, refused

NAMES = ["r", "s", "c", "p", "r2"]
ADDRESSES = {
    "r": "203.0.113.1",  # public: the relay
    "s": "192.168.1.10",  # behind a symmetric NAT
    "c": "192.168.2.10",  # behind another NAT
    "p": "203.0.113.4",  # public
    "r2": "203.0.113.5",  # public: a second relay, later
}


def lab(*names: str) -> World:
    """Network office with `names` (of NAMES), each announcing its address;
    s and c seen behind NATs by r."""
    world = World()
    world.add_root_admin(ROOT)
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24"), ROOT)
    decision, _ = world.run(CreateEnrollmentKey(network="office", uses=None), ROOT)
    key_id = decision.result["key_id"]
    token = make_token("nats://cp:4222", key_id, f"s{key_id.removeprefix('k')}")
    for name in names:
        n = NAMES.index(name) + 1
        world.run(Join(token=token, public_key=public_key(n), name=name))
        world.run(ReportEndpoint(host_id=host(world, name), endpoints=(ADDRESSES[name],)))
    for name, mapping in (("s", "198.51.100.1:40001"), ("c", "198.51.100.2:51820")):
        if name in names and "r" in names:
            seen = ReportSeenEndpoint(
                host_id=host(world, "r"), peer_key=key(name), endpoint=mapping
            )
            world.run(seen)
    return world


def key(name: str) -> str:
    return public_key(NAMES.index(name) + 1)


def ask(world: World, by: str, peer: str) -> list[object]:
    decision, _ = world.run(RequestRelay(host_id=host(world, by), peer_key=key(peer)))
    return [event for _, event in decision.events]


def sections(world: World, name: str):  # type: ignore[no-untyped-def]
    state = desired_for(world.topology, host(world, name))
    assert state is not None
    return state.sections


# -- relay add / remove ---------------------------------------------------------


def test_relay_add_is_recorded_once_with_its_ports() -> None:
    world = lab("r", "s", "c")
    (event,) = appended(world, AddRelay(node="r"))
    assert isinstance(event, RelayAdded) and event.ports == DEFAULT_PORTS
    assert appended(world, AddRelay(node="office/r")) == []
    assert appended(world, AddRelay(node="r", ports="52000-52999")) == []
    relay = world.topology.networks["office"].relays[event.node_id]
    assert relay.host_id == host(world, "r")


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (AddRelay(node="s"), "seen behind a NAT"),
        (AddRelay(node="nobody"), "no node"),
        (AddRelay(node="r", ports="52000"), "invalid ports"),
        (AddRelay(node="r", ports="x-y"), "invalid ports"),
        (AddRelay(node="r", ports="60000-70000"), "invalid ports"),
        (AddRelay(node="r", ports="51000-52000"), "WireGuard port"),
        (AddRelay(node="r", network="lab"), "no network"),
        (RemoveRelay(node="r"), "not a relay"),
    ],
)
def test_relay_refusals_are_one_line_and_write_nothing(command: object, says: str) -> None:
    world = lab("r", "s", "c")
    assert says in refused(world, command).message


def test_a_node_with_no_endpoint_cannot_relay() -> None:
    world = lab("r")
    world.run(ReportEndpoint(host_id=host(world, "r"), endpoints=()))
    assert "announces no endpoint" in refused(world, AddRelay(node="r")).message


def test_a_node_outside_the_named_network_cannot_relay_for_it() -> None:
    world = lab("r", "s")
    world.run(CreateNetwork(name="lab", cidr="10.20.0.0/24"), ROOT)
    assert "not 'lab'" in refused(world, AddRelay(node="r", network="lab")).message


def test_changing_a_relay_s_ports_needs_a_remove_first() -> None:
    world = lab("r")
    world.run(AddRelay(node="r", ports="53000-53009"), ROOT)
    assert "remove it first" in refused(world, AddRelay(node="r", ports="54000-54009")).message


# -- relay.request ----------------------------------------------------------------


def test_a_request_opens_the_pair_on_the_relay_s_lowest_free_ports() -> None:
    world = lab("r", "s", "c", "p")
    world.run(AddRelay(node="r", ports="53000-53009"), ROOT)
    (event,) = ask(world, "s", "c")
    assert isinstance(event, RelayPairOpened)
    hosts = tuple(sorted((host(world, "s"), host(world, "c"))))
    assert (event.hosts, event.ports, event.asked_by) == (hosts, (53000, 53001), host(world, "s"))
    # Asked again, by either side: the pair is open already.
    assert ask(world, "c", "s") == []
    (event,) = ask(world, "s", "p")
    assert event.ports == (53002, 53003)  # type: ignore[attr-defined]


def test_a_request_needs_a_relay_with_free_ports_other_than_the_pair() -> None:
    world = lab("r", "s", "c", "p")
    with pytest.raises(Rejected, match="no relay"):
        ask(world, "s", "c")
    world.run(AddRelay(node="r", ports="53000-53003"), ROOT)
    with pytest.raises(Rejected, match="no relay"):
        ask(world, "s", "r")  # the relay itself is not a relay for its own pairs
    ask(world, "s", "c")
    ask(world, "s", "p")
    with pytest.raises(Rejected, match="no relay with free ports"):
        ask(world, "c", "p")  # two pairs, four ports: full


def test_pairs_go_to_the_least_loaded_relay() -> None:
    world = lab("r", "s", "c", "p", "r2")
    world.run(AddRelay(node="r"), ROOT)
    (first,) = ask(world, "s", "c")
    world.run(AddRelay(node="r2"), ROOT)
    (second,) = ask(world, "s", "p")
    relays = world.topology.networks["office"].relays
    assert relays[first.relay].host_id == host(world, "r")  # type: ignore[attr-defined]
    assert relays[second.relay].host_id == host(world, "r2")  # type: ignore[attr-defined]


def test_the_log_proves_which_host_asked_for_a_relay() -> None:
    world = World()
    world.add_root_admin(ROOT)
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24"), ROOT)
    decision, _ = world.run(CreateEnrollmentKey(network="office", uses=None), ROOT)
    key_id = decision.result["key_id"]
    token = make_token("nats://cp:4222", key_id, f"s{key_id.removeprefix('k')}")
    keys = [SigningKey.generate() for _ in range(3)]
    for n, signing in enumerate(keys, 1):
        join = Join(
            token=token,
            public_key=public_key(n),
            name=f"h{n}",
            endpoints=(f"203.0.113.{n}",),
            signing_key=public_text(signing),
        )
        world.run(join, signed_by=signing)
    world.run(AddRelay(node="h1"), ROOT)
    world.run(RequestRelay(host_id=host(world, "h2"), peer_key=public_key(3)), signed_by=keys[1])
    assert verify_log(world.log).problems == []
    world.run(RemoveRelay(node="h1"), ROOT)
    world.run(AddRelay(node="h1"), ROOT)
    forged = RequestRelay(host_id=host(world, "h2"), peer_key=public_key(3))
    world.run(forged, signed_by=keys[2])  # h3 signing for h2
    assert [why for _, why in verify_log(world.log).problems] == [
        "signed by a key that is not the host's"
    ]


# -- sections -----------------------------------------------------------------------


def test_the_pair_gets_the_relay_last_and_the_relay_gets_the_pair() -> None:
    world = lab("r", "s", "c", "p")
    world.run(AddRelay(node="r", ports="53000-53009"), ROOT)
    ask(world, "c", "s")
    s_id, c_id = host(world, "s"), host(world, "c")
    (a, b) = sorted((s_id, c_id))
    ports = {a: 53000, b: 53001}
    assert sections(world, "r").relays == {
        f"{a},{b}": RelayEntry(
            hosts=(a, b),
            ports=(53000, 53001),
            names=tuple("s" if h == s_id else "c" for h in (a, b)),  # type: ignore[arg-type]
        )
    }
    # s reaches c at c's public mapping, then its LAN address, then the relay.
    assert sections(world, "s").paths[key("c")] == PathEntry(
        candidates=("198.51.100.2:51820", "192.168.2.10:51820"),
        relay=f"203.0.113.1:{ports[s_id]}",
        relay_node="r",
    )
    assert sections(world, "c").paths[key("s")].relay == f"203.0.113.1:{ports[c_id]}"
    # p is not in the pair: nothing relayed for it.
    assert {k: e.relay for k, e in sections(world, "p").paths.items()} == {
        key("s"): "",
        key("c"): "",
    }


def test_a_relayed_pair_of_public_hosts_gets_their_endpoint_then_the_relay() -> None:
    world = lab("r", "p", "r2")
    world.run(AddRelay(node="r"), ROOT)
    ask(world, "p", "r2")
    entry = sections(world, "p").paths[key("r2")]
    assert entry.candidates == ("203.0.113.5:51820",) and entry.relay.startswith("203.0.113.1:")


def test_opening_a_pair_sends_three_small_deltas() -> None:
    world = lab(*NAMES[:4], *(f"h{n}" for n in range(0)))
    world.run(AddRelay(node="r"), ROOT)
    sent = sent_by(world, RequestRelay(host_id=host(world, "s"), peer_key=key("c")))
    assert sorted(m.host_id for m in sent) == sorted(host(world, n) for n in ("r", "s", "c"))
    for message in sent:
        assert isinstance(message, DesiredDelta)
        upserted = {name: len(getattr(message.upsert, name)) for name in ("paths", "relays")}
        assert sum(upserted.values()) == 1, upserted


def test_removing_the_relay_closes_its_pairs() -> None:
    world = lab("r", "s", "c", "p")
    world.run(AddRelay(node="r"), ROOT)
    ask(world, "s", "c")
    ask(world, "p", "s")
    (event,) = appended(world, RemoveRelay(node="r"))
    assert isinstance(event, RelayRemoved)
    assert sections(world, "r").relays == {}
    assert all(e.relay == "" for n in ("s", "c") for e in sections(world, n).paths.values())
    # p was never seen behind a NAT: with no relay it has no entry for s's side
    # but s's own (s is behind a NAT); and s has none for p.
    assert key("p") not in sections(world, "s").paths
    assert world.topology.networks["office"].relay_pairs == {}


def test_removing_the_relay_sends_the_pairs_deltas() -> None:
    world = lab("r", "s", "c", "p")
    world.run(AddRelay(node="r"), ROOT)
    ask(world, "s", "c")
    sent = sent_by(world, RemoveRelay(node="r"))
    assert sorted(m.host_id for m in sent) == sorted(host(world, n) for n in ("r", "s", "c"))
    for message in sent:
        assert isinstance(message, DesiredDelta)
        if message.host_id == host(world, "r"):
            pair = ",".join(sorted((host(world, "s"), host(world, "c"))))
            assert set(message.remove["relays"]) == {pair}
        else:  # seen behind NATs: the entry stays, without the relay
            (entry,) = message.upsert.paths.values()
            assert entry.relay == ""


def test_a_pair_closes_when_one_of_its_hosts_leaves() -> None:
    world = lab("r", "s", "c", "p")
    world.run(AddRelay(node="r"), ROOT)
    ask(world, "s", "c")
    sent = sent_by(world, RemoveNode(node="office/c"))
    assert world.topology.networks["office"].relay_pairs == {}
    relay = next(m for m in sent if m.host_id == host(world, "r"))
    assert isinstance(relay, DesiredDelta) and len(relay.remove["relays"]) == 1
    assert sections(world, "r").relays == {}


def test_a_relay_leaving_closes_its_pairs() -> None:
    world = lab("r", "s", "c")
    world.run(AddRelay(node="r"), ROOT)
    ask(world, "s", "c")
    sent = sent_by(world, RemoveNode(node="office/r"))
    assert world.topology.networks["office"].relays == {}
    assert world.topology.networks["office"].relay_pairs == {}
    s = next(m for m in sent if m.host_id == host(world, "s"))
    assert isinstance(s, DesiredDelta)
    assert key("c") in s.upsert.paths or key("c") in s.remove.get("paths", ())
    assert all(e.relay == "" for e in sections(world, "s").paths.values())


def test_a_relay_s_new_endpoint_reaches_its_pairs() -> None:
    world = lab("r", "s", "c")
    world.run(AddRelay(node="r"), ROOT)
    ask(world, "s", "c")
    sent = sent_by(world, ReportEndpoint(host_id=host(world, "r"), endpoints=("203.0.113.77",)))
    s = next(m for m in sent if m.host_id == host(world, "s"))
    assert isinstance(s, DesiredDelta)
    assert s.upsert.paths[key("c")].relay.startswith("203.0.113.77:")


async def test_relays_and_pairs_survive_the_read_model(tmp_path: Path) -> None:
    world = lab("r", "s", "c", "p")
    world.run(AddRelay(node="r", ports="53000-53099"), ROOT)
    ask(world, "s", "c")
    ask(world, "p", "c")
    loaded = await reloaded(world, tmp_path)
    network = world.topology.networks["office"]
    assert loaded.networks["office"].relays == network.relays
    assert loaded.networks["office"].relay_pairs == network.relay_pairs
    for host_id in world.topology.hosts:
        assert desired_for(loaded, host_id) == desired_for(world.topology, host_id)
