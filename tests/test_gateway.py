"""Egress gateways, the pure parts: the commands (what they append, their
refusals, what the log proves), the sections every host gets, what one
change sends, and the agent's choice of gateway (a table and a fake clock)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.egress import Liveness, candidates, choose, with_egress
from controlplane.audit import verify_log
from controlplane.rules.base import Rejected
from events.commands import (
    AddEgress,
    AddIngress,
    ClearExit,
    CreateClient,
    CreateEnrollmentKey,
    CreateNetwork,
    Join,
    RemoveClient,
    RemoveEgress,
    RemoveIngress,
    RemoveNode,
    RotateHostKey,
    SetExit,
    SetPolicy,
)
from events.desired import (
    DesiredDelta,
    DesiredState,
    EgressEntry,
    EgressVia,
    ExitEntry,
    ForwardEntry,
    ForwardRule,
    PeerEntry,
)
from events.model import EgressAdded, EgressRemoved, ExitCleared, ExitSet
from events.signing import public_text
from events.tokens import make_token
from projections.desired import DesiredChanges, desired_for, messages
from projections.topology import Topology, Touched
from tests.desired_states import desired_state
from tests.factories import World, public_key

# The root admin and its command helpers, shared with the policy commands' tests.
from tests.test_policy_commands import ROOT, appended, refused
from tests.test_policy_projections import PolicyWorld

LAN = "192.168.1.0/24"


def office(*names: str) -> World:
    """Network office (10.10.0.0/24), the hosts `names` joined in order."""
    world = World()
    world.add_root_admin(ROOT)
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24"), ROOT)
    decision, _ = world.run(CreateEnrollmentKey(network="office", uses=None), ROOT)
    key_id = decision.result["key_id"]
    token = make_token("nats://cp:4222", key_id, f"s{key_id.removeprefix('k')}")
    for n, name in enumerate(names, 1):
        world.run(Join(token=token, public_key=public_key(n), name=name))
    return world


def host(world: World, name: str) -> str:
    return next(n.host_id for n in world.topology.nodes.values() if n.name == name)


def sections(world: World, name: str) -> tuple[set[str], dict[str, EgressEntry], set[str]]:
    state = desired_for(world.topology, host(world, name))
    assert state is not None
    s = state.sections
    return set(s.routes), dict(s.egress), set(s.forward)


# -- commands ---------------------------------------------------------------------


def test_egress_add_records_the_ranges_and_a_repeat_is_a_no_op() -> None:
    world = office("a", "g")
    (event,) = appended(world, AddEgress(node="office/g", ranges=(LAN, "172.16.0.0/16")))
    assert isinstance(event, EgressAdded)
    assert (event.ranges, event.nat, event.metric) == (("172.16.0.0/16", LAN), True, 100)
    assert appended(world, AddEgress(node="g", ranges=(LAN,))) == []
    # Another metric or NAT is a change (it holds for all of the gateway's ranges).
    (event,) = appended(world, AddEgress(node="g", ranges=(LAN,), nat=False, metric=5))
    assert isinstance(event, EgressAdded)
    gateway = world.topology.networks["office"].gateways[event.node_id]
    assert (gateway.ranges, gateway.nat, gateway.metric) == (("172.16.0.0/16", LAN), False, 5)


def test_egress_remove_takes_one_range_or_all() -> None:
    world = office("a", "g")
    world.run(AddEgress(node="g", ranges=(LAN, "172.16.0.0/16")), ROOT)
    (event,) = appended(world, RemoveEgress(node="g", ranges=(LAN,)))
    assert isinstance(event, EgressRemoved) and event.ranges == (LAN,)
    (event,) = appended(world, RemoveEgress(node="g"))
    assert isinstance(event, EgressRemoved) and event.ranges == ("172.16.0.0/16",)
    assert world.topology.networks["office"].gateways == {}


@pytest.mark.parametrize(
    ("command", "code", "needle"),
    [
        (AddEgress(node="office/nobody", ranges=(LAN,)), "not_found", "nobody"),
        (AddEgress(node="lab/g", ranges=(LAN,)), "not_found", "lab/g"),
        (AddEgress(node="g", ranges=()), "invalid", "--range"),
        (AddEgress(node="g", ranges=("192.168.1/24",)), "invalid", "192.168.1/24"),
        (AddEgress(node="g", ranges=("192.168.1.7/24",)), "invalid", "192.168.1.0/24"),
        (AddEgress(node="g", ranges=("10.10.0.128/25",)), "conflict", "office"),
        (AddEgress(node="g", ranges=("10.0.0.0/8",)), "conflict", "office"),
        (AddEgress(node="g", ranges=("10.20.0.0/16",)), "conflict", "lab"),
        (AddEgress(node="g", ranges=("fd00:1::/64",)), "invalid", "IPv6"),
        (AddEgress(node="g", ranges=(LAN,), metric=-1), "invalid", "metric"),
        (RemoveEgress(node="a"), "not_found", "not an egress gateway"),
    ],
)
def test_egress_refusals(command: object, code: str, needle: str) -> None:
    world = office("a", "g")
    world.run(CreateNetwork(name="lab", cidr="10.20.0.0/24"), ROOT)
    error = refused(world, command)
    assert (error.code, needle in error.message) == (code, True), error.message


def test_removing_a_range_a_gateway_lacks_is_refused() -> None:
    world = office("a", "g")
    world.run(AddEgress(node="g", ranges=(LAN,)), ROOT)
    error = refused(world, RemoveEgress(node="g", ranges=("172.16.0.0/16",)))
    assert error.code == "not_found" and LAN in error.message


def test_a_network_may_not_be_created_over_an_egress_range() -> None:
    world = office("a", "g")
    world.run(AddEgress(node="g", ranges=(LAN,)), ROOT)
    error = refused(world, CreateNetwork(name="home", cidr="192.168.1.128/25"))
    assert error.code == "conflict" and LAN in error.message


def test_egress_events_verify_and_cannot_carry_other_ranges() -> None:
    import msgspec

    world = office("a", "g")
    world.run(AddEgress(node="g", ranges=(LAN,)), ROOT)
    world.run(RemoveEgress(node="g"), ROOT)
    assert verify_log(world.log, root=public_text(ROOT)).problems == []
    added = next(i for i, r in enumerate(world.log) if isinstance(r.event, EgressAdded))
    record = world.log[added]
    forged = msgspec.structs.replace(record.event, ranges=("172.16.0.0/16",))
    world.log[added] = msgspec.structs.replace(
        record, envelope=msgspec.structs.replace(record.envelope, data=forged)
    )
    problems = [why for _, why in verify_log(world.log, root=public_text(ROOT)).problems]
    assert problems[0] == "the event's ranges are not the signed ones", problems


def test_a_removal_s_ranges_are_the_signed_ones_or_all_when_none_were_signed() -> None:
    import msgspec

    world = office("a", "g")
    world.run(AddEgress(node="g", ranges=(LAN, "172.16.0.0/16")), ROOT)
    world.run(RemoveEgress(node="g", ranges=(LAN,)), ROOT)
    world.run(RemoveEgress(node="g"), ROOT)  # all that is left: the event names it
    assert verify_log(world.log, root=public_text(ROOT)).problems == []
    first = next(i for i, r in enumerate(world.log) if isinstance(r.event, EgressRemoved))
    record = world.log[first]
    forged = msgspec.structs.replace(record.event, ranges=(LAN, "172.16.0.0/16"))
    world.log[first] = msgspec.structs.replace(
        record, envelope=msgspec.structs.replace(record.envelope, data=forged)
    )
    problems = [why for _, why in verify_log(world.log, root=public_text(ROOT)).problems]
    assert problems[0] == "the event's ranges are not the signed ones", problems


# -- sections ---------------------------------------------------------------------


def test_members_route_the_range_and_the_gateway_forwards_it() -> None:
    world = office("a", "b", "g")
    world.run(AddEgress(node="g", ranges=(LAN,), nat=False), ROOT)
    g_key = public_key(3)
    for member in ("a", "b"):
        routes, egress, forward = sections(world, member)
        assert routes == {LAN} and forward == set()
        assert egress == {LAN: EgressEntry(via=(EgressVia(metric=100, peer=g_key),))}
    routes, egress, forward = sections(world, "g")
    assert (routes, egress, forward) == (set(), {}, {LAN})
    state = desired_for(world.topology, host(world, "g"))
    assert state is not None
    assert state.sections.forward[LAN] == ForwardEntry(
        nat=False,
        rules=(ForwardRule(sources=("10.10.0.0/24",), destination=LAN, allow=("any",)),),
    )


def test_two_gateways_of_a_range_are_listed_best_first_and_neither_routes_via_the_other() -> None:
    world = office("a", "g1", "g2")
    world.run(AddEgress(node="g1", ranges=(LAN,), metric=20), ROOT)
    world.run(AddEgress(node="g2", ranges=(LAN,), metric=10), ROOT)
    _, egress, _ = sections(world, "a")
    assert [v.peer for v in egress[LAN].via] == [public_key(3), public_key(2)]
    for gateway in ("g1", "g2"):
        routes, egress, forward = sections(world, gateway)
        assert (routes, egress, forward) == (set(), {}, {LAN})


def sent_by(world: World, command: object) -> list[DesiredState | DesiredDelta]:
    """What `command` makes the control plane send: a message per host whose
    desired state it changed."""
    published = {h: world.topology.revision_of(h) for h in world.topology.hosts}
    _, touched = world.run(command, ROOT)  # type: ignore[arg-type]
    changes = DesiredChanges()
    for t in touched:
        changes.add(t)
    return messages(world.topology, changes, published)


def test_adding_a_range_sends_each_member_one_small_delta() -> None:
    world = office(*(f"h{n}" for n in range(20)))
    sent = sent_by(world, AddEgress(node="h0", ranges=(LAN,)))
    assert len(sent) == 20
    for message in sent:
        assert isinstance(message, DesiredDelta)
        upsert = message.upsert
        counts = {name: len(getattr(upsert, name)) for name in ("routes", "egress", "forward")}
        gateway = message.host_id == host(world, "h0")
        assert counts == (
            {"routes": 0, "egress": 0, "forward": 1}
            if gateway
            else {"routes": 1, "egress": 1, "forward": 0}
        )
        assert not upsert.peers and not upsert.firewall


def test_removing_the_gateway_node_withdraws_its_ranges() -> None:
    world = office("a", "g")
    world.run(AddEgress(node="g", ranges=(LAN,)), ROOT)
    world.run(RemoveNode(node="office/g"), ROOT)
    assert sections(world, "a") == (set(), {}, set())
    assert world.topology.networks["office"].gateways == {}


POLICY = """{rules: [
  {from: ["tag:dev"], to: ["192.168.1.0/25", "g"], ports: ["22/tcp"]},
  {from: ["b"], to: ["g"]},
]}"""


def test_under_a_policy_only_members_whose_rules_reach_the_range_use_it() -> None:
    from events.commands import TagNode

    world = office("a", "b", "g")
    world.run(TagNode(node="a", tags=("dev",)), ROOT)
    world.run(AddEgress(node="g", ranges=(LAN,)), ROOT)
    world.run(SetPolicy(network="office", document=POLICY), ROOT)
    assert sections(world, "a")[0] == {LAN}
    # b sees the gateway, but no rule of b's reaches the range.
    assert sections(world, "b")[0] == set()
    state = desired_for(world.topology, host(world, "g"))
    assert state is not None
    a_address = next(n.address for n in world.topology.nodes.values() if n.name == "a")
    assert state.sections.forward[LAN].rules == (
        ForwardRule(sources=(f"{a_address}/32",), destination="192.168.1.0/25", allow=("22/tcp",)),
    )


# -- exit nodes ---------------------------------------------------------------------


def internet(*names: str) -> World:
    world = office(*names)
    world.run(AddEgress(node="g", ranges=("0.0.0.0/0",)), ROOT)
    return world


def test_an_internet_gateway_is_pushed_on_nobody_and_an_exit_is_opt_in() -> None:
    world = internet("a", "b", "g")
    for name in ("a", "b"):
        assert sections(world, name) == (set(), {}, set())
    (event,) = appended(world, SetExit(node="a", via="g"))
    assert isinstance(event, ExitSet)
    state = desired_for(world.topology, host(world, "a"))
    assert state is not None
    assert state.sections.exit == {"0.0.0.0/0": ExitEntry(peer=public_key(3))}
    other = desired_for(world.topology, host(world, "b"))
    assert other is not None and other.sections.exit == {}
    assert appended(world, SetExit(node="a", via="office/g")) == [], "already"
    (event,) = appended(world, ClearExit(node="a"))
    assert isinstance(event, ExitCleared)
    assert appended(world, ClearExit(node="a")) == []


def test_an_exit_follows_its_gateway_s_internet_range() -> None:
    world = internet("a", "g")
    world.run(SetExit(node="a", via="g"), ROOT)
    world.run(RemoveEgress(node="g"), ROOT)
    state = desired_for(world.topology, host(world, "a"))
    assert state is not None and state.sections.exit == {}
    world.run(AddEgress(node="g", ranges=("0.0.0.0/0",)), ROOT)
    state = desired_for(world.topology, host(world, "a"))
    assert state is not None and set(state.sections.exit) == {"0.0.0.0/0"}


@pytest.mark.parametrize(
    ("command", "code", "needle"),
    [
        (SetExit(node="a", via="b"), "invalid", "not an internet gateway"),
        (SetExit(node="a", via="a"), "invalid", "its own exit"),
        (SetExit(node="g", via="a"), "invalid", "not an internet gateway"),
        (SetExit(node="a", via="nobody"), "not_found", "nobody"),
        (SetExit(node="nobody", via="g"), "not_found", "nobody"),
    ],
)
def test_exit_refusals(command: object, code: str, needle: str) -> None:
    world = internet("a", "b", "g")
    error = refused(world, command)
    assert (error.code, needle in error.message) == (code, True), error.message


def test_a_gateway_of_the_internet_cannot_exit_itself() -> None:
    world = internet("a", "g")
    world.run(AddEgress(node="a", ranges=("0.0.0.0/0",)), ROOT)
    error = refused(world, SetExit(node="a", via="g"))
    assert "internet gateway itself" in error.message


# -- the agent's choice -------------------------------------------------------------


def test_the_range_rides_on_the_first_live_gateway() -> None:
    egress = {
        LAN: EgressEntry(via=(EgressVia(metric=10, peer="G1"), EgressVia(metric=20, peer="G2"))),
        "172.16.0.0/16": EgressEntry(via=(EgressVia(metric=5, peer="G2"),)),
    }
    assert choose(egress) == {LAN: "G1", "172.16.0.0/16": "G2"}
    assert choose(egress, lambda key: key != "G1") == {LAN: "G2", "172.16.0.0/16": "G2"}
    # None alive: the best of all (it may come back) rather than no route.
    assert choose(egress, lambda _key: False) == {LAN: "G1", "172.16.0.0/16": "G2"}
    assert candidates(egress) == {"G1", "G2"}
    assert candidates({LAN: egress["172.16.0.0/16"]}) == set()


def test_with_egress_puts_the_range_in_the_gateway_s_allowed_ips_only() -> None:
    peers = [
        ("G1", PeerEntry(allowed_ips=("10.10.0.2/32",))),
        ("G2", PeerEntry(allowed_ips=("10.10.0.3/32",))),
    ]
    desired = desired_state(peers=peers)
    after = with_egress(desired, {LAN: "G2", "172.16.0.0/16": "gone"})
    assert after.peers["G1"].allowed_ips == ("10.10.0.2/32",)
    assert after.peers["G2"].allowed_ips == ("10.10.0.3/32", LAN)
    assert with_egress(desired, {}) is desired


@pytest.mark.parametrize(
    ("readings", "now", "dead"),
    [
        ([("G", 100, 0.0)], 14.9, set()),  # a first reading is a sign of life
        ([("G", 100, 0.0)], 15.0, {"G"}),
        ([("G", 100, 0.0), ("G", 100, 10.0)], 15.0, {"G"}),  # no bytes since 0
        ([("G", 100, 0.0), ("G", 180, 10.0)], 15.0, set()),  # bytes at 10
        ([("G", 100, 0.0), ("G", 180, 10.0)], 25.0, {"G"}),
        ([("G", 100, 0.0), ("H", 5, 20.0)], 25.0, {"G"}),
    ],
)
def test_a_gateway_is_gone_when_its_bytes_stop_for_the_bound(
    readings: list[tuple[str, int, float]], now: float, dead: set[str]
) -> None:
    liveness = Liveness(dead_after=15.0)
    for key, rx, at in readings:
        liveness.observe(key, rx, at)
    assert liveness.dead(now) == dead
    liveness.forget_others(set())
    assert liveness.dead(now) == frozenset()


# -- the property: whatever gateways do, deltas add up to the derived state ---------

GATEWAY_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "egress",
                "egress",
                "unegress",
                "exit",
                "exit off",
                "remove",
                "rejoin",
                "policy",
                "tag",
                "tag gw",
                "rotate",
                "ingress",
                "uningress",
                "client",
                "client",
                "unclient",
            ]
        ),
        st.integers(0, 5),
        st.integers(0, 5),
        st.booleans(),
    ),
    min_size=1,
    max_size=30,
)
RANGES = ("192.168.1.0/24", "192.168.1.0/25", "172.16.0.0/16", "0.0.0.0/0")
POLICIES = (
    None,
    '{rules: [{from: ["tag:dev"], to: ["192.168.1.0/24", "*"]}, {from: ["*"], to: ["tag:dev"]}]}',
    '{rules: [{from: ["*"], to: ["0.0.0.0/0"], ports: ["443/tcp"]}]}',
    # External clients are selected by address: some are in this range, some not.
    '{rules: [{from: ["tag:dev"], to: ["10.10.0.8/29", "*"], ports: ["22/tcp"]},'
    ' {from: ["10.10.0.0/24"], to: ["tag:dev"]}]}',
    # Only gateways tagged gw are seen (so used), by members tagged dev.
    '{rules: [{from: ["tag:dev"], to: ["tag:gw", "192.168.1.0/24", "172.16.0.0/16",'
    ' "10.10.0.8/29"]}]}',
)


@settings(max_examples=200, deadline=None)
@given(GATEWAY_OPS)
# Found by hypothesis: a policy change took a range from an ingress gateway
# whose clients' forward entry for it was not re-read.
@example(
    [
        ("egress", 0, 0, False),
        ("policy", 0, 2, False),
        ("ingress", 1, 0, False),
        ("client", 0, 0, True),
        ("policy", 0, 1, False),
    ]
)
def test_deltas_under_any_gateway_changes_equal_the_derived_state(
    ops: list[tuple[str, int, int, bool]],
) -> None:
    world = PolicyWorld({f"h{n}": () for n in range(6)})
    pending: list[Touched] = []
    applied = 0
    for op, n, m, flush in ops:
        name = f"h{n}"
        try:
            if op == "egress":
                command: object = AddEgress(
                    node=f"office/{name}", ranges=(RANGES[m % 4],), nat=flush, metric=m
                )
            elif op == "unegress":  # of a gateway there is, if any
                there = sorted(world.topology.networks["office"].gateways)
                command = RemoveEgress(node=there[m % len(there)] if there else name)
            elif op == "exit":
                gateways = _internet_gateways(world)
                if not gateways:  # one first, often enough for exits to happen
                    make = AddEgress(node=f"office/h{m}", ranges=("0.0.0.0/0",))
                    pending.extend(world.world.run(make)[1])
                    gateways = _internet_gateways(world)
                command = SetExit(node=f"office/{name}", via=gateways[m % len(gateways)])
            elif op == "exit off":
                command = ClearExit(node=f"office/{name}")
            elif op == "remove":
                command = RemoveNode(node=f"office/{name}")
            elif op == "rejoin":
                pending.extend(world.join(name))
                continue
            elif op == "policy":
                pending.extend(world.set_policy(POLICIES[m % len(POLICIES)]))
                continue
            elif op == "tag":
                pending.extend(world.tag(name, "dev"))
                continue
            elif op == "tag gw":  # who sees a gateway moves with its tags
                pending.extend(world.tag(name, "gw"))
                continue
            elif op == "ingress":
                command = AddIngress(node=f"office/{name}")
            elif op == "uningress":
                command = RemoveIngress(node=f"office/{name}")
            elif op == "client":  # through an ingress gateway there is, if any
                there = sorted(world.topology.networks["office"].ingress)
                command = CreateClient(
                    network="office",
                    name=f"c{m}",
                    via=there[n % len(there)] if there else name,
                    public_key=public_key(700 + m),
                )
            elif op == "unclient":
                command = RemoveClient(network="office", name=f"c{m}")
            else:
                command = RotateHostKey(
                    host_id=world.host[name], public_key=public_key(500 + len(world.world.log))
                )
            decision, touched = world.world.run(command)  # type: ignore[arg-type]
            applied += bool(decision.events)
        except (Rejected, KeyError, StopIteration):
            continue
        pending.extend(touched)
        if flush:
            world.flush(pending)
            pending = []
    world.flush(pending)


def _internet_gateways(world: PolicyWorld) -> list[str]:
    found = world.topology.networks["office"].gateways.items()
    return sorted(node_id for node_id, g in found if "0.0.0.0/0" in g.ranges)


async def reloaded(world: World, tmp_path: Path) -> Topology:
    """`world`'s topology written whole to a read model and loaded back, as
    a restarted projection loads it."""
    from projections.sqlite import ReadModel

    model = await ReadModel.open(tmp_path / "read.db")
    try:
        everything = Touched(
            networks=frozenset(world.topology.networks),
            nodes=frozenset(world.topology.nodes) | {"gone"},
            hosts=frozenset(world.topology.hosts),
        )
        await model.commit(world.topology, everything, world.topology.last_seq)
        return await model.load_topology()
    finally:
        await model.close()


async def test_gateways_and_exits_survive_the_read_model(tmp_path: Path) -> None:
    """A restarted projection loads the topology from SQLite: every host's
    desired state is the same from it as from the events."""
    world = internet("a", "b", "g")
    world.run(AddEgress(node="b", ranges=(LAN,), nat=False, metric=7), ROOT)
    world.run(SetExit(node="a", via="g"), ROOT)
    world.run(AddEgress(node="a", ranges=("172.16.0.0/16",)), ROOT)
    world.run(RemoveNode(node="office/a"), ROOT)  # a departed gateway goes too
    loaded = await reloaded(world, tmp_path)
    assert loaded.networks["office"].gateways == world.topology.networks["office"].gateways
    for host_id in world.topology.hosts:
        assert desired_for(loaded, host_id) == desired_for(world.topology, host_id)


def test_a_gateway_tagged_into_sight_is_used_by_those_who_now_see_it() -> None:
    """Visibility follows the gateway's tags too: tagging the gateway (not
    the member) gives the member its range and its clients' addresses."""
    world = PolicyWorld({"m": ("a",), "g": (), "x": ()})
    pending = [
        *world.world.run(AddEgress(node="office/g", ranges=(LAN,)))[1],
        *world.world.run(AddIngress(node="office/g"))[1],
        *world.world.run(
            CreateClient(network="office", name="c0", via="office/g", public_key=public_key(700))
        )[1],
    ]
    client = world.topology.networks["office"].clients["c0"].address + "/32"
    pending += world.set_policy(
        f'{{rules: [{{from: ["tag:a"], to: ["tag:b", "{LAN}", "{client}"]}}]}}'
    )
    world.flush(pending)
    state = desired_for(world.topology, world.host["m"])
    assert state is not None and state.sections.egress == {}  # g is not in sight
    world.flush(world.tag("g", "b"))  # converged: every host's deltas add up
    state = desired_for(world.topology, world.host["m"])
    assert state is not None and set(state.sections.egress) == {LAN, client}
