"""Names in the desired state: the `dns` and `dns_zones` sections, their
deltas, the access policy's say on who learns which names, the rules of
`dns add/remove` and `--dns-domain`, and the SQLite read model."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.rules.base import Rejected
from events.commands import (
    AddDnsRecord,
    CreateEnrollmentKey,
    CreateNetwork,
    Join,
    RemoveDnsRecord,
    RemoveNode,
    SetPolicy,
    TagNode,
    UpdateNetwork,
)
from events.desired import DesiredDelta, DesiredState, DnsEntry, DnsZoneEntry
from events.tokens import make_token
from projections.desired import desired_for
from projections.sqlite import ReadModel
from projections.topology import Touched
from tests.factories import World, public_key
from tests.test_projections import Agents, mesh


def names(world: World, host_id: str) -> dict[str, DnsEntry]:
    state = desired_for(world.topology, host_id)
    assert state is not None
    return state.sections.dns


def joined(world: World, network: str, n: int, name: str) -> tuple[str, list[Touched]]:
    key_id = world.run(CreateEnrollmentKey(network=network))[0].result["key_id"]
    token = make_token("x", key_id, f"s{world._keys}")
    decision, touched = world.run(Join(token=token, public_key=public_key(n), name=name))
    return decision.result["host_id"], touched


def published(world: World, agents: Agents, touched: list[Touched]) -> dict[str, object]:
    return {m.host_id: m for m in agents.publish(world.topology, touched)}


def started(world: World, ids: list[str]) -> Agents:
    agents = Agents()
    agents.published = {h: world.topology.revision_of(h) for h in ids}
    agents.states = {h: desired_for(world.topology, h) for h in ids}  # type: ignore[misc]
    return agents


def test_every_node_is_named_in_its_networks_domain_and_the_zone_is_sent() -> None:
    world, ids = mesh(3)
    state = desired_for(world.topology, ids[0])
    assert state is not None
    assert state.sections.dns == {
        "h1.office.internal": DnsEntry(a=("10.10.0.1",)),
        "h2.office.internal": DnsEntry(a=("10.10.0.2",)),
        "h3.office.internal": DnsEntry(a=("10.10.0.3",)),
    }
    assert state.sections.dns_zones == {"office.internal": DnsZoneEntry(network="office")}


def test_a_join_sends_every_other_member_one_name_and_one_peer() -> None:
    world, ids = mesh(20)
    agents = started(world, ids)
    new_host, touched = joined(world, "office", 99, "New-Host")
    sent = published(world, agents, touched)
    assert isinstance(sent[new_host], DesiredState)
    assert len(sent[new_host].sections.dns) == 21  # type: ignore[attr-defined]
    for host_id in ids:
        delta = sent[host_id]
        assert isinstance(delta, DesiredDelta)
        # One entry of the zone, not the zone: lowercase, in the domain.
        assert delta.upsert.dns == {"new-host.office.internal": DnsEntry(a=("10.10.0.21",))}
        assert len(delta.upsert.peers) == 1 and delta.upsert.dns_zones == {}
        assert delta.remove == {}
    agents.assert_converged(world.topology)


def test_records_resolve_beside_nodes_and_go_when_removed() -> None:
    world, ids = mesh(3)
    agents = started(world, ids)
    _, touched = world.run(AddDnsRecord(network="office", name="db", a=("10.10.0.50",)))
    _, more = world.run(
        AddDnsRecord(network="office", name="www.office.internal", cname="h2.office.internal")
    )
    _, six = world.run(AddDnsRecord(network="office", name="v6", aaaa=("fd00::0001",)))
    sent = published(world, agents, touched + more + six)
    for host_id in ids:
        delta = sent[host_id]
        assert isinstance(delta, DesiredDelta)
        assert delta.upsert.dns == {
            "db.office.internal": DnsEntry(a=("10.10.0.50",)),
            "www.office.internal": DnsEntry(cname="h2.office.internal"),
            "v6.office.internal": DnsEntry(aaaa=("fd00::1",)),  # canonical
        }
    _, gone = world.run(RemoveDnsRecord(network="office", name="db.office.internal"))
    sent = published(world, agents, gone)
    assert all(m.remove == {"dns": ("db.office.internal",)} for m in sent.values())  # type: ignore[attr-defined]
    agents.assert_converged(world.topology)


def test_a_removed_node_loses_its_name_everywhere() -> None:
    world, ids = mesh(3)
    agents = started(world, ids)
    _, touched = world.run(RemoveNode(node="office/h2"))
    published(world, agents, touched)
    assert "h2.office.internal" not in names(world, ids[0])
    agents.assert_converged(world.topology)


def test_a_new_domain_renames_every_member_by_snapshot() -> None:
    world, ids = mesh(2)
    world.run(AddDnsRecord(network="office", name="db", a=("10.10.0.50",)))
    agents = started(world, ids)
    _, touched = world.run(UpdateNetwork(name="office", dns_domain="Corp.Example."))
    sent = published(world, agents, touched)
    assert all(isinstance(m, DesiredState) for m in sent.values())
    assert set(names(world, ids[0])) == {
        "h1.corp.example",
        "h2.corp.example",
        "db.corp.example",  # records are relative: they follow the domain
    }
    assert desired_for(world.topology, ids[0]).sections.dns_zones == {  # type: ignore[union-attr]
        "corp.example": DnsZoneEntry(network="office")
    }
    agents.assert_converged(world.topology)


POLICY = '{rules: [{from: ["tag:web"], to: ["tag:db"], ports: ["5432/tcp"]}]}'


def test_under_a_policy_a_host_learns_only_the_names_it_sees() -> None:
    world, ids = mesh(3)  # h1 web, h2 db, h3 neither
    world.run(TagNode(node="office/h1", tags=("web",)))
    world.run(TagNode(node="office/h2", tags=("db",)))
    world.run(AddDnsRecord(network="office", name="db", a=("10.10.0.50",)))
    world.run(SetPolicy(network="office", document=POLICY))
    assert set(names(world, ids[0])) == {
        "h1.office.internal",
        "h2.office.internal",
        "db.office.internal",
    }
    assert set(names(world, ids[2])) == {"h3.office.internal", "db.office.internal"}
    agents = started(world, ids)
    # A new db node: h1 (web) learns its name; h2 (db) and h3 learn nothing.
    key_id = world.run(CreateEnrollmentKey(network="office", tags=("db",)))[0].result["key_id"]
    token = make_token("x", key_id, f"s{world._keys}")
    _, touched = world.run(Join(token=token, public_key=public_key(4), name="h4"))
    sent = published(world, agents, touched)
    assert sent[ids[0]].upsert.dns == {"h4.office.internal": DnsEntry(a=("10.10.0.4",))}  # type: ignore[attr-defined]
    for host_id in ids[1:]:
        message = sent.get(host_id)
        assert message is None or "h4.office.internal" not in repr(message)
    # Untagged web -> db: h1 no longer sees h2 or h4, and is told so.
    _, touched = world.run(TagNode(node="office/h3", tags=("web",)))
    sent = published(world, agents, touched)
    assert set(sent[ids[2]].upsert.dns) == {"h2.office.internal", "h4.office.internal"}  # type: ignore[attr-defined]
    agents.assert_converged(world.topology)


def test_a_node_joining_with_a_records_name_takes_it() -> None:
    world, ids = mesh(1)
    world.run(AddDnsRecord(network="office", name="printer", a=("10.10.0.99",)))
    joined(world, "office", 7, "printer")
    assert names(world, ids[0])["printer.office.internal"] == DnsEntry(a=("10.10.0.2",))


@pytest.mark.parametrize(
    ("command", "code", "message"),
    [
        (AddDnsRecord(network="nope", name="db", a=("10.0.0.1",)), "not_found", "no network"),
        (
            AddDnsRecord(network="office", name="db.example.com", a=("10.0.0.1",)),
            "invalid",
            "'db.example.com' is outside the domain office.internal of network 'office'",
        ),
        (
            AddDnsRecord(network="office", name="office.internal", a=("10.0.0.1",)),
            "invalid",
            "the domain itself",
        ),
        (AddDnsRecord(network="office", name="db", a=("10.0.0.300",)), "invalid", "'10.0.0.300'"),
        (AddDnsRecord(network="office", name="db", a=("fd00::1",)), "invalid", "takes IPv4"),
        (AddDnsRecord(network="office", name="db", aaaa=("10.0.0.1",)), "invalid", "IPv6"),
        (AddDnsRecord(network="office", name="db"), "invalid", "give --a, --aaaa or --cname"),
        (
            AddDnsRecord(network="office", name="db", a=("10.0.0.1",), cname="x.example"),
            "invalid",
            "cannot have addresses",
        ),
        (AddDnsRecord(network="office", name="bad name", a=("10.0.0.1",)), "invalid", "label"),
        (AddDnsRecord(network="office", name="h1", a=("10.0.0.1",)), "conflict", "office/h1"),
        (AddDnsRecord(network="office", name="taken", a=("10.0.0.1",)), "conflict", "exists"),
        (RemoveDnsRecord(network="office", name="nothing"), "not_found", "no record"),
        (UpdateNetwork(name="office", dns_domain="internal"), "invalid", "one label"),
        (UpdateNetwork(name="office", dns_domain="lab.internal"), "conflict", "overlaps"),
        (UpdateNetwork(name="office", dns_domain="x.lab.internal"), "conflict", "overlaps"),
        (UpdateNetwork(name="office", dns_domain="10.0.0.1"), "invalid", "IP address"),
        (
            CreateNetwork(name="lab2", cidr="10.30.0.0/24", dns_domain="lab.internal"),
            "conflict",
            "",
        ),
    ],
)
def test_bad_names_are_refused_in_one_line(command: object, code: str, message: str) -> None:
    world, _ = mesh(1)
    world.run(CreateNetwork(name="lab", cidr="10.20.0.0/24"))
    world.run(AddDnsRecord(network="office", name="taken", a=("10.10.0.9",)))
    before = len(world.log)
    with pytest.raises(Rejected) as info:
        world.run(command)  # type: ignore[arg-type]
    assert info.value.code == code and message in info.value.message
    assert "\n" not in info.value.message
    assert len(world.log) == before


def test_the_same_domain_again_is_no_change() -> None:
    world, _ = mesh(1)
    decision, touched = world.run(UpdateNetwork(name="office", dns_domain="OFFICE.internal"))
    assert decision.result["changed"] is False and touched == []


async def test_domains_and_records_survive_the_read_model(tmp_path: Path) -> None:
    world, _ = mesh(2)
    world.run(UpdateNetwork(name="office", dns_domain="corp.example"))
    world.run(AddDnsRecord(network="office", name="db", a=("10.10.0.50", "10.10.0.51")))
    world.run(AddDnsRecord(network="office", name="www", cname="db.corp.example"))
    model = await ReadModel.open(tmp_path / "read.db")
    try:
        everything = Touched(networks=frozenset(world.topology.networks))
        await model.commit(world.topology, everything, world.topology.last_seq)
        loaded = await model.load_topology()
    finally:
        await model.close()
    office = loaded.networks["office"]
    assert office.dns_domain == "corp.example"
    assert office.records == world.topology.networks["office"].records
    assert office.records["db"].a == ("10.10.0.50", "10.10.0.51")
