"""plan_events(topology, events): what a command would change, per host,
computed without applying it; checked against applying it for real."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.decide import decide
from controlplane.rules.base import Rejected
from events.commands import (
    AnyCommand,
    ClearPolicy,
    CreateEnrollmentKey,
    CreateNetwork,
    DeleteNetwork,
    Join,
    RemoveNode,
    RequestKeyRotation,
    SetPolicy,
    TagNode,
    UntagNode,
    UpdateNetwork,
)
from events.desired import Sections
from events.tokens import make_token
from projections.desired import desired_for
from projections.plan import plan_events
from tests.factories import World, public_key

WEB_TO_DB = '{rules: [{from: ["tag:web"], to: ["tag:db"], ports: ["5432/tcp"]}]}'
ALL = '{rules: [{from: ["*"], to: ["*"]}]}'


def world_of(hosts: int = 3) -> World:
    """Two networks; h1..h<hosts> in office, h1 in lab too."""
    world = World()
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24", keepalive=10))
    world.run(CreateNetwork(name="lab", cidr="10.20.0.0/24"))
    tokens = {}
    for network in ("office", "lab"):
        key_id = world.run(CreateEnrollmentKey(network=network, uses=None))[0].result["key_id"]
        tokens[network] = make_token("x", key_id, f"s{world._keys}")
    for n in range(1, hosts + 1):
        world.run(
            Join(
                token=tokens["office"],
                public_key=public_key(n),
                name=f"h{n}",
                endpoints=(f"192.0.2.{n}",),
            )
        )
    world.run(Join(token=tokens["lab"], public_key=public_key(1), name="h1"))
    return world


def planned(world: World, command: AnyCommand) -> str:
    decision = decide(world.topology, command, world.context())
    return "\n".join(map(str, plan_events(world.topology, decision.events, now=world.now)))


def test_an_mtu_change_is_one_interface_change_per_member() -> None:
    world = world_of(2)
    hosts = {h.name: h.host_id for h in world.topology.hosts.values()}
    assert planned(world, UpdateNetwork(name="office", mtu=1300)) == (
        f"h1 ({hosts['h1']}):\n  ~ interface wireguard: mtu 1420 -> 1300\n"
        f"h2 ({hosts['h2']}):\n  ~ interface wireguard: mtu 1420 -> 1300"
    )


def test_a_removed_node_is_dropped_by_its_peers_and_lets_go() -> None:
    world = world_of(2)
    text = planned(world, RemoveNode(node="office/h2"))
    h2 = next(h for h in world.topology.hosts.values() if h.name == "h2")
    assert f"- peers {h2.public_key}" in text
    assert "h2 (" in text and "- addresses 10.10.0.2/24" in text


def test_a_command_that_changes_nothing_plans_nothing() -> None:
    world = world_of(2)
    assert planned(world, UpdateNetwork(name="office", mtu=1420)) == ""
    assert planned(world, CreateEnrollmentKey(network="office")) == ""


def test_planning_leaves_the_topology_as_it_was() -> None:
    world = world_of(3)
    before = copy.deepcopy(world.topology)
    planned(world, DeleteNetwork(name="office", force=True))
    assert world.topology.last_seq == before.last_seq
    for host_id in before.hosts:
        assert desired_for(world.topology, host_id) == desired_for(before, host_id)


# -- the property: planning agrees with applying ------------------------------


def sections(world: World, host_id: str) -> dict[str, dict[str, Any]]:
    state = desired_for(world.topology, host_id)
    found = as_json(state.sections) if state is not None else {}
    return {name: found.get(name, {}) for name in Sections.__struct_fields__}


def applied_difference(world: World, command: AnyCommand) -> dict[str, Any]:
    """Apply for real, then compare every host's whole state before and after."""
    hosts = set(world.topology.hosts)
    before = {h: sections(world, h) for h in hosts}
    world.run(command)
    hosts |= set(world.topology.hosts)
    out: dict[str, Any] = {}
    for host_id in hosts:
        old = before.get(host_id) or {name: {} for name in Sections.__struct_fields__}
        new = sections(world, host_id)
        diff = {}
        for name in Sections.__struct_fields__:
            a, b = old[name], new[name]
            found = {
                "added": {k: b[k] for k in b.keys() - a.keys()},
                "removed": sorted(a.keys() - b.keys()),
                "changed": {k: [a[k], b[k]] for k in a.keys() & b.keys() if a[k] != b[k]},
            }
            found = {k: v for k, v in found.items() if v}
            if found:
                diff[name] = found
        if diff:
            out[host_id] = diff
    return out


def planned_difference(world: World, command: AnyCommand) -> Any:
    decision = decide(world.topology, command, world.context())
    changes = plan_events(world.topology, decision.events, now=world.now)
    return as_json({c.host_id: c.sections for c in changes})


def as_json(value: object) -> Any:
    return msgspec.json.decode(msgspec.json.encode(value))


NODES = ["office/h1", "office/h2", "office/h3", "lab/h1", "office/h4"]
TAGS = st.lists(st.sampled_from(["web", "db", "ops"]), min_size=1, max_size=2, unique=True)
COMMANDS = st.one_of(
    st.builds(
        UpdateNetwork,
        name=st.sampled_from(["office", "lab"]),
        mtu=st.none() | st.sampled_from([1280, 1300, 1420]),
        keepalive=st.none() | st.sampled_from([0, 10, 25]),
    ),
    st.builds(RemoveNode, node=st.sampled_from(NODES)),
    st.builds(TagNode, node=st.sampled_from(NODES), tags=TAGS.map(tuple)),
    st.builds(UntagNode, node=st.sampled_from(NODES), tags=TAGS.map(tuple)),
    st.builds(
        SetPolicy,
        network=st.sampled_from(["office", "lab"]),
        document=st.sampled_from([WEB_TO_DB, ALL]),
    ),
    st.builds(ClearPolicy, network=st.sampled_from(["office", "lab"])),
    st.builds(DeleteNetwork, name=st.sampled_from(["office", "lab"]), force=st.booleans()),
    st.builds(RequestKeyRotation, node=st.sampled_from(NODES)),
    st.builds(CreateNetwork, name=st.just("new"), cidr=st.just("10.30.0.0/24")),
    st.builds(CreateEnrollmentKey, network=st.sampled_from(["office", "lab"])),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(COMMANDS, min_size=1, max_size=6))
def test_the_plan_is_what_applying_changes(commands: list[AnyCommand]) -> None:
    planning, applying = world_of(3), world_of(3)
    for command in commands:
        try:
            plan = planned_difference(planning, command)
        except Rejected as refused:
            try:
                applying.run(command)
            except Rejected as also:
                assert also.code == refused.code
                continue
            raise AssertionError(f"planned as refused, applied: {command}") from None
        assert plan == applied_difference(applying, command), command
        planning.run(command)  # the planning world follows (its plan wrote nothing)
        for host_id in applying.topology.hosts:
            assert sections(planning, host_id) == sections(applying, host_id)
