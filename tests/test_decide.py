"""The rules, table-driven: what each command appends, and why it is refused."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.decide import Context, decide
from controlplane.rules.base import Rejected
from controlplane.rules.networks import parse_cidr
from controlplane.rules.nodes import allocate_address
from events.commands import (
    CreateEnrollmentKey,
    CreateNetwork,
    DeleteNetwork,
    Join,
    LeaveNetworks,
    RemoveNode,
    ReportEndpoint,
    RevokeEnrollmentKey,
)
from events.model import (
    EnrollmentKeyUsed,
    HostEndpointObserved,
    HostRegistered,
    NetworkCreated,
    NodeJoined,
    NodeRemoved,
)
from events.tokens import make_token
from projections.topology import host_range
from tests.factories import World, public_key


def world_with_network(uses: int | None = 5, expires_in: float | None = None) -> tuple[World, str]:
    world = World()
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24"))
    decision, _ = world.run(CreateEnrollmentKey(network="office", uses=uses, expires_in=expires_in))
    key_id = decision.result["key_id"]
    token = make_token("nats://cp:4222", key_id, f"s{world._keys}")
    return world, token


def join(token: str, n: int, name: str | None = None, endpoints: tuple[str, ...] = ()) -> Join:
    return Join(token=token, public_key=public_key(n), name=name or f"host{n}", endpoints=endpoints)


@pytest.mark.parametrize(
    ("cidr", "message"),
    [
        ("10.0.0.0", "missing prefix length"),
        ("10.0.0.1/24", "host bits set (did you mean 10.0.0.0/24?)"),
        ("300.0.0.0/24", "expected e.g."),
        ("banana/24", "expected e.g."),
        ("10.0.0.0/31", "too small"),
        ("10.0.0.0/33", "expected e.g."),
    ],
)
def test_malformed_cidr_is_refused(cidr: str, message: str) -> None:
    with pytest.raises(Rejected) as info:
        parse_cidr(cidr)
    assert info.value.code == "invalid"
    assert message in info.value.message


@pytest.mark.parametrize(
    ("name", "cidr", "code"),
    [
        ("office", "10.20.0.0/24", "conflict"),  # duplicate name
        ("lab", "10.10.0.128/25", "conflict"),  # inside office
        ("lab", "10.0.0.0/8", "conflict"),  # contains office
        ("Lab", "10.30.0.0/24", "invalid"),
        ("-lab", "10.30.0.0/24", "invalid"),
        ("a" * 33, "10.30.0.0/24", "invalid"),
        ("lab.x", "10.30.0.0/24", "invalid"),  # would break the subject
    ],
)
def test_create_network_refusals(name: str, cidr: str, code: str) -> None:
    world, _ = world_with_network()
    before = len(world.log)
    with pytest.raises(Rejected) as info:
        world.run(CreateNetwork(name=name, cidr=cidr))
    assert info.value.code == code
    assert len(world.log) == before


def test_create_network_defaults_and_guard() -> None:
    world = World()
    decision, _ = world.run(CreateNetwork(name="office", cidr="10.10.0.0/24"))
    ((subject, event),) = decision.events
    assert subject == "netmesh.ev.network.office"
    assert event == NetworkCreated(
        network="office", cidr="10.10.0.0/24", listen_port=51820, mtu=1420, keepalive=25
    )
    # Overlap is checked against every network, so the guard covers them all.
    assert decision.expect[0].subject_filter == "netmesh.ev.network.*"
    assert decision.expect[0].last_seq == 0


def test_join_registers_host_and_allocates_lowest_free_address() -> None:
    world, token = world_with_network()
    decision, _ = world.run(join(token, 1, endpoints=("192.0.2.1",)))
    kinds = [type(e) for _, e in decision.events]
    assert kinds == [EnrollmentKeyUsed, NodeJoined, HostRegistered]
    assert decision.result["address"] == "10.10.0.1"
    assert decision.result["interface_address"] == "10.10.0.1/24"
    # The network's guard comes first: it owns the address pool.
    assert [e.subject_filter for e in decision.expect] == [
        "netmesh.ev.network.office",
        f"netmesh.ev.host.{decision.result['host_id']}",
    ]
    assert world.run(join(token, 2))[0].result["address"] == "10.10.0.2"
    world.run(RemoveNode(node="office/host1"))
    # The freed address is reused.
    assert world.run(join(token, 3))[0].result["address"] == "10.10.0.1"


def test_second_join_of_a_host_duplicates_nothing_and_uses_no_key() -> None:
    world, token = world_with_network(uses=1)
    first, _ = world.run(join(token, 1))
    before = len(world.log)
    again, _ = world.run(join(token, 1))  # key now used up: still answered
    assert again.events == ()
    assert again.result == first.result
    assert len(world.log) == before


def test_host_joining_a_second_network_is_not_registered_twice() -> None:
    world, token = world_with_network()
    world.run(join(token, 1))
    world.run(CreateNetwork(name="lab", cidr="10.20.0.0/24"))
    key = world.run(CreateEnrollmentKey(network="lab"))[0].result["key_id"]
    lab_token = make_token("x", key, f"s{world._keys}")
    decision, _ = world.run(join(lab_token, 1, endpoints=("192.0.2.1",)))
    kinds = [type(e) for _, e in decision.events]
    assert kinds == [EnrollmentKeyUsed, NodeJoined, HostEndpointObserved]
    assert len(world.topology.hosts) == 1


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        ("exhausted", "exhausted", "used up (1 of 1 uses)"),
        ("expired", "expired", "has expired"),
        ("revoked", "revoked", "has been revoked"),
        ("garbage", "invalid_token", "not a netmesh enrollment token"),
        ("truncated", "invalid_token", "damaged"),
        ("wrong-secret", "invalid_token", "not recognised"),
        ("network-deleted", "not_found", "which has been deleted"),
    ],
)
def test_join_refusals(setup: str, code: str, message: str) -> None:
    world, token = world_with_network(uses=1, expires_in=60)
    key_id = next(iter(world.topology.keys))
    if setup == "exhausted":
        world.run(join(token, 1))
    elif setup == "expired":
        world.now += 61
    elif setup == "revoked":
        world.run(RevokeEnrollmentKey(key_id=key_id))
    elif setup == "garbage":
        token = "hello"
    elif setup == "truncated":
        token = token[:-7]
    elif setup == "wrong-secret":
        token = make_token("nats://cp:4222", key_id, "guess")
    elif setup == "network-deleted":
        world.run(DeleteNetwork(name="office"))
    before = len(world.log)
    with pytest.raises(Rejected) as info:
        world.run(join(token, 9))
    assert (info.value.code, message in info.value.message) == (code, True), info.value.message
    assert len(world.log) == before


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("public_key", "short", "32 bytes"),
        ("name", "bad name!", "invalid host name"),
        ("endpoints", ("192.0.2.1:99999",), "port must be"),
        ("endpoints", ("example.com",), "expected IP"),
        ("endpoints", ("[fe80::1%eth0]:51820",), "scoped addresses"),
    ],
)
def test_join_input_validation(field: str, value: object, message: str) -> None:
    world, token = world_with_network()
    fields: dict[str, object] = {"token": token, "public_key": public_key(1), "name": "a"}
    fields[field] = value
    with pytest.raises(Rejected) as info:
        world.run(Join(**fields))  # type: ignore[arg-type]
    assert message in info.value.message


def test_names_are_unique_within_a_network() -> None:
    world, token = world_with_network()
    world.run(join(token, 1, name="alpha"))
    with pytest.raises(Rejected) as info:
        world.run(join(token, 2, name="alpha"))
    assert info.value.code == "conflict"


def test_remove_node_by_id_or_name() -> None:
    world, token = world_with_network()
    node_id = world.run(join(token, 1))[0].result["node_id"]
    decision, _ = world.run(RemoveNode(node=node_id))
    assert isinstance(decision.events[0][1], NodeRemoved)
    with pytest.raises(Rejected) as info:
        world.run(RemoveNode(node=node_id))
    assert info.value.code == "not_found"


def test_endpoint_report_appends_only_on_change() -> None:
    world, token = world_with_network()
    host_id = world.run(join(token, 1, endpoints=("192.0.2.1",)))[0].result["host_id"]
    same = world.run(ReportEndpoint(host_id=host_id, endpoints=("192.0.2.1",)))[0]
    assert same.events == ()
    moved = world.run(ReportEndpoint(host_id=host_id, endpoints=("192.0.2.7",)))[0]
    assert moved.events[0][1] == HostEndpointObserved(
        host_id=host_id, endpoints=("192.0.2.7",), listen_port=51820
    )


def test_allocation_skips_network_and_broadcast_and_fills_up() -> None:
    used: set[int] = set()
    for _ in range(2):
        used.add(int(ipaddress.ip_address(allocate_address("10.0.0.0/30", used))))
    assert used == {int(ipaddress.ip_address(a)) for a in ("10.0.0.1", "10.0.0.2")}
    with pytest.raises(Rejected) as info:
        allocate_address("10.0.0.0/30", used)
    assert info.value.code == "exhausted"


@pytest.mark.parametrize(
    "cidr",
    [
        "10.0.0.0/24",
        "10.0.0.0/30",
        "10.0.0.0/31",
        "10.0.0.0/32",
        "fd00::/120",
        "fd00::/127",
        "fd00::/128",
    ],
)
def test_the_host_range_is_what_hosts_gives(cidr: str) -> None:
    network = ipaddress.ip_network(cidr)
    hosts = [int(ip) for ip in network.hosts()]
    assert host_range(network) == (hosts[0], hosts[-1])


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["10.0.0.0/29", "10.0.0.0/30", "fd00::/125", "fd00::/126"]),
    st.lists(st.tuples(st.booleans(), st.integers(0, 7)), max_size=30),
)
def test_the_topologys_allocation_is_the_lowest_free_host_address(
    cidr: str, ops: list[tuple[bool, int]]
) -> None:
    """Joins and removals in any order: the address a join gets is always the
    lowest of `hosts()` that no node has (what a scan of every address gave)."""
    world = World()
    world.run(CreateNetwork(name="n", cidr=cidr))
    key_id = world.run(CreateEnrollmentKey(network="n", uses=None))[0].result["key_id"]
    token = make_token("x", key_id, f"s{world._keys}")
    hosts = [str(ip) for ip in ipaddress.ip_network(cidr).hosts()]
    for join, n in ops:
        taken = {node.address for node in world.topology.nodes.values()}
        if join:
            free = [a for a in hosts if a not in taken]
            try:
                decision, _ = world.run(Join(token=token, public_key=public_key(n), name=f"h{n}"))
            except Rejected as refused:
                assert refused.code in ("exhausted", "conflict"), refused
                assert refused.code != "exhausted" or not free
                continue
            if decision.events:  # a new node (not a host joining again)
                assert decision.result["address"] == free[0]
        elif any(node.name == f"h{n}" for node in world.topology.nodes.values()):
            world.run(RemoveNode(node=f"n/h{n}"))


def test_host_gets_the_networks_listen_port_unless_it_asks_for_one() -> None:
    world = World()
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24", listen_port=51999))
    key_id = world.run(CreateEnrollmentKey(network="office", uses=None))[0].result["key_id"]
    token = make_token("x", key_id, f"s{world._keys}")
    world.run(join(token, 1))
    world.run(Join(token=token, public_key=public_key(2), name="b", listen_port=40000))
    ports = sorted(h.listen_port for h in world.topology.hosts.values())
    assert ports == [40000, 51999]


def test_a_host_leaves_all_its_networks_in_one_batch() -> None:
    world, token = world_with_network()
    host_id = world.run(join(token, 1))[0].result["host_id"]
    world.run(CreateNetwork(name="lab", cidr="10.20.0.0/24"))
    key = world.run(CreateEnrollmentKey(network="lab"))[0].result["key_id"]
    world.run(join(make_token("x", key, f"s{world._keys}"), 1))
    decision, _ = world.run(LeaveNetworks(host_id=host_id))
    assert sorted(e.network for _, e in decision.events) == ["lab", "office"]  # type: ignore[union-attr]
    assert len(decision.expect) == 2
    assert world.topology.nodes_of_host(host_id) == []
    with pytest.raises(Rejected):
        world.run(LeaveNetworks(host_id=host_id, network="office"))


def test_deleting_a_network_with_nodes_needs_force() -> None:
    world, token = world_with_network()
    world.run(join(token, 1))
    with pytest.raises(Rejected) as info:
        world.run(DeleteNetwork(name="office"))
    assert info.value.code == "conflict" and "--force" in info.value.message
    assert "office" in world.topology.networks
    world.run(DeleteNetwork(name="office", force=True))
    assert "office" not in world.topology.networks and world.topology.nodes == {}


def test_ipv6_networks_need_an_mtu_of_at_least_1280() -> None:
    world = World()
    with pytest.raises(Rejected) as info:
        world.run(CreateNetwork(name="v6", cidr="fd00:1::/64", mtu=1200))
    assert "1280" in info.value.message
    world.run(CreateNetwork(name="v6", cidr="fd00:1::/64", mtu=1280))
    world.run(CreateNetwork(name="v4", cidr="10.1.0.0/24", mtu=1200))


def test_a_key_id_is_never_made_twice() -> None:
    """Key ids are derived from command ids: a command id used again long after
    (forgotten by the dedupe) must not make its key again, which would reset
    the old key's uses, with the old token's secret."""
    world, _ = world_with_network(uses=1)
    (key_id,) = world.topology.keys
    again = Context(now=world.now, actor="test", new_key_id=key_id, new_secret="s1")
    with pytest.raises(Rejected) as info:
        decide(world.topology, CreateEnrollmentKey(network="office"), again)
    assert info.value.code == "conflict" and "new id" in info.value.message
    world.run(DeleteNetwork(name="office"))
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24"))
    with pytest.raises(Rejected):  # retired with its network: still never again
        decide(world.topology, CreateEnrollmentKey(network="office"), again)
