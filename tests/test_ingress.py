"""Ingress gateways and external clients, the pure parts: the commands (what
they append, their refusals, what the log proves), the sections each host
gets (the gateway's `clients` and `forward`, the members' `egress`), what one
change sends, the configuration the CLI prints, the agent's peers, and the
gateway's forward chain."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import msgspec
import pytest

from agent.firewall import ruleset_for
from agent.ingress import with_clients
from cli.clients import client_config
from controlplane.audit import verify_log
from events.commands import (
    AddEgress,
    AddIngress,
    CreateClient,
    CreateEnrollmentKey,
    CreateNetwork,
    Join,
    RemoveClient,
    RemoveIngress,
    RemoveNode,
    SetPolicy,
    TagNode,
)
from events.desired import (
    ClientEntry,
    DesiredDelta,
    EgressEntry,
    EgressVia,
    ForwardEntry,
    ForwardRule,
    PeerEntry,
)
from events.model import ClientCreated, ClientRemoved, IngressAdded
from events.signing import public_text
from events.tokens import make_token
from projections.desired import desired_for
from tests.desired_states import desired_state
from tests.factories import World, public_key
from tests.test_gateway import LAN, host, office, reloaded, sent_by
from tests.test_policy_commands import ROOT, appended, refused

PHONE = public_key(900)
LAPTOP = public_key(901)


def ingress(*names: str) -> World:
    """office with `names`, and "g" (the last of them) an ingress gateway."""
    world = office(*names)
    world.run(AddIngress(node="g"), ROOT)
    return world


def address_of(world: World, name: str) -> str:
    return next(n.address for n in world.topology.nodes.values() if n.name == name)


def state(world: World, name: str):  # type: ignore[no-untyped-def]
    found = desired_for(world.topology, host(world, name))
    assert found is not None
    return found.sections


# -- commands ---------------------------------------------------------------------


def test_ingress_add_is_recorded_once() -> None:
    world = office("a", "g")
    (event,) = appended(world, AddIngress(node="g"))
    assert isinstance(event, IngressAdded)
    assert appended(world, AddIngress(node="office/g")) == []
    assert world.topology.networks["office"].ingress == {event.node_id}


def test_a_client_takes_an_address_from_the_pool_that_later_joins_skip() -> None:
    world = ingress("a", "g")
    (event,) = appended(
        world, CreateClient(network="office", name="phone", via="g", public_key=PHONE)
    )
    assert isinstance(event, ClientCreated)
    assert event.address == "10.10.0.3" and event.public_key == PHONE  # a=.1, g=.2
    taken = {address_of(world, "a"), address_of(world, "g"), event.address}
    assert len(taken) == 3
    # The next node does not get the client's address, and a freed one comes back.
    world.run(Join(token=_token(world), public_key=public_key(3), name="b"), None)
    assert address_of(world, "b") == "10.10.0.4"
    (removed,) = appended(world, RemoveClient(network="office", name="phone"))
    assert isinstance(removed, ClientRemoved)
    (again,) = appended(
        world, CreateClient(network="office", name="tab", via="g", public_key=LAPTOP)
    )
    assert isinstance(again, ClientCreated) and again.address == "10.10.0.3"


def _token(world: World) -> str:
    (key,) = world.topology.keys.values()
    return make_token("nats://cp:4222", key.key_id, f"s{key.key_id.removeprefix('k')}")


@pytest.mark.parametrize(
    ("command", "code", "needle"),
    [
        (CreateClient(network="nope", name="p", via="g", public_key=PHONE), "not_found", "nope"),
        (CreateClient(network="office", name="P!", via="g", public_key=PHONE), "invalid", "name"),
        (CreateClient(network="office", name="p", via="a", public_key=PHONE), "invalid", "ingress"),
        (CreateClient(network="office", name="p", via="x", public_key=PHONE), "not_found", "x"),
        (CreateClient(network="office", name="p", via="l1", public_key=PHONE), "invalid", "lab"),
        (CreateClient(network="office", name="p", via="g", public_key="abc"), "invalid", "key"),
        (
            CreateClient(network="office", name="p", via="g", public_key=public_key(1)),
            "conflict",
            "host",
        ),
        (CreateClient(network="office", name="a", via="g", public_key=PHONE), "conflict", "node"),
        (
            CreateClient(network="office", name="p", via="g", public_key=PHONE, full_tunnel=True),
            "invalid",
            "internet gateway",
        ),
        (RemoveClient(network="office", name="nobody"), "not_found", "nobody"),
        (RemoveIngress(node="a"), "not_found", "not an ingress gateway"),
        (AddIngress(node="nobody"), "not_found", "nobody"),
    ],
)
def test_refusals(command: object, code: str, needle: str) -> None:
    world = ingress("a", "g")
    world.run(CreateNetwork(name="lab", cidr="10.20.0.0/24"), ROOT)
    decision, _ = world.run(CreateEnrollmentKey(network="lab", uses=None), ROOT)
    key_id = decision.result["key_id"]
    lab = make_token("nats://cp:4222", key_id, f"s{key_id.removeprefix('k')}")
    world.run(Join(token=lab, public_key=public_key(50), name="l1"), None)
    error = refused(world, command)
    assert (error.code, needle in error.message) == (code, True), error.message


def test_a_name_or_key_is_one_client_s_only() -> None:
    world = ingress("a", "g")
    world.run(CreateClient(network="office", name="phone", via="g", public_key=PHONE), ROOT)
    error = refused(world, CreateClient(network="office", name="phone", via="g", public_key=LAPTOP))
    assert error.code == "conflict" and "already exists" in error.message
    error = refused(world, CreateClient(network="office", name="tab", via="g", public_key=PHONE))
    assert error.code == "conflict" and "office/phone" in error.message


def test_a_full_tunnel_client_needs_an_internet_gateway() -> None:
    world = ingress("a", "g")
    world.run(AddEgress(node="g", ranges=("0.0.0.0/0",)), ROOT)
    (event,) = appended(
        world,
        CreateClient(network="office", name="p", via="g", public_key=PHONE, full_tunnel=True),
    )
    assert isinstance(event, ClientCreated) and event.full_tunnel


def test_removing_the_gateway_or_its_node_takes_its_clients() -> None:
    world = ingress("a", "g")
    world.run(CreateClient(network="office", name="phone", via="g", public_key=PHONE), ROOT)
    decision, _ = world.run(RemoveIngress(node="g"), ROOT)
    assert decision.result["clients_removed"] == ["phone"]
    network = world.topology.networks["office"]
    assert network.clients == {} and network.ingress == set()
    world.run(AddIngress(node="g"), ROOT)
    world.run(CreateClient(network="office", name="phone", via="g", public_key=PHONE), ROOT)
    world.run(RemoveNode(node="office/g"), ROOT)
    assert network.clients == {} and network.ingress == set()
    assert int(ipaddress.ip_address("10.10.0.3")) not in world.topology.addresses["office"]


def test_client_events_verify_and_cannot_carry_another_key() -> None:
    world = ingress("a", "g")
    world.run(CreateClient(network="office", name="phone", via="g", public_key=PHONE), ROOT)
    world.run(RemoveClient(network="office", name="phone"), ROOT)
    world.run(RemoveIngress(node="g"), ROOT)
    assert verify_log(world.log, root=public_text(ROOT)).problems == []
    created = next(i for i, r in enumerate(world.log) if isinstance(r.event, ClientCreated))
    record = world.log[created]
    forged = msgspec.structs.replace(record.event, public_key=LAPTOP)
    world.log[created] = msgspec.structs.replace(
        record, envelope=msgspec.structs.replace(record.envelope, data=forged)
    )
    problems = [why for _, why in verify_log(world.log, root=public_text(ROOT)).problems]
    assert problems and "public_key" in problems[0], problems


def test_the_answer_holds_what_the_configuration_needs() -> None:
    world = ingress("a", "b", "g")
    world.run(AddEgress(node="b", ranges=(LAN,)), ROOT)
    decision, _ = world.run(
        CreateClient(network="office", name="phone", via="g", public_key=PHONE), ROOT
    )
    result = decision.result
    assert (result["address"], result["network_cidr"], result["mtu"]) == (
        "10.10.0.4",
        "10.10.0.0/24",
        1420,
    )
    assert result["ranges"] == [LAN]  # the gateway reaches it through b
    assert result["gateway"] == {
        "name": "g",
        "public_key": public_key(3),
        "endpoint": None,  # the test hosts joined without endpoints
        "address": address_of(world, "g"),
    }
    assert result["dns_domain"] == "office.internal"


# -- sections ---------------------------------------------------------------------


def test_the_gateway_takes_the_client_in_and_members_reach_it_through_the_gateway() -> None:
    world = ingress("a", "b", "g")
    world.run(CreateClient(network="office", name="phone", via="g", public_key=PHONE), ROOT)
    client = "10.10.0.4/32"
    g = state(world, "g")
    assert g.clients == {PHONE: ClientEntry(address=client, name="phone")}
    assert client not in g.egress
    assert g.forward == {
        client: ForwardEntry(
            nat=False,
            rules=(ForwardRule(sources=("10.10.0.0/24",), destination=client, allow=("any",)),),
        ),
        "10.10.0.0/24": ForwardEntry(
            nat=False,
            rules=(ForwardRule(sources=(client,), destination="10.10.0.0/24", allow=("any",)),),
        ),
    }
    for member in ("a", "b"):
        s = state(world, member)
        assert s.egress == {client: EgressEntry(via=(EgressVia(metric=0, peer=public_key(3)),))}
        assert s.routes == {} and s.clients == {} and s.forward == {}


def test_the_gateway_forwards_its_clients_to_ranges_it_reaches_and_masquerades_only_its_own() -> (
    None
):
    world = ingress("a", "b", "g")
    world.run(AddEgress(node="b", ranges=(LAN,)), ROOT)
    world.run(AddEgress(node="g", ranges=("172.16.0.0/16",)), ROOT)
    world.run(CreateClient(network="office", name="phone", via="g", public_key=PHONE), ROOT)
    forward = state(world, "g").forward
    assert forward[LAN] == ForwardEntry(
        nat=False,
        rules=(ForwardRule(sources=("10.10.0.4/32",), destination=LAN, allow=("any",)),),
    )
    # Its own range: masqueraded, from the network's CIDR (the client's address is in it).
    assert forward["172.16.0.0/16"].nat is True
    assert forward["172.16.0.0/16"].rules == (
        ForwardRule(sources=("10.10.0.0/24",), destination="172.16.0.0/16", allow=("any",)),
    )


def test_creating_a_client_sends_each_member_one_small_delta() -> None:
    world = ingress(*(f"h{n}" for n in range(19)), "g")
    sent = sent_by(world, CreateClient(network="office", name="phone", via="g", public_key=PHONE))
    assert len(sent) == 20
    for message in sent:
        assert isinstance(message, DesiredDelta)
        upsert = message.upsert
        counts = {name: len(getattr(upsert, name)) for name in ("egress", "forward", "clients")}
        gateway = message.host_id == host(world, "g")
        assert counts == (
            {"egress": 0, "forward": 2, "clients": 1}
            if gateway
            else {"egress": 1, "forward": 0, "clients": 0}
        )
        assert not upsert.peers and not upsert.firewall and len(msgspec.json.encode(message)) < 600


def test_removing_the_client_or_the_gateway_withdraws_it_everywhere() -> None:
    for removal in (
        RemoveClient(network="office", name="phone"),
        RemoveIngress(node="g"),
        RemoveNode(node="office/g"),
    ):
        world = ingress("a", "g")
        world.run(CreateClient(network="office", name="phone", via="g", public_key=PHONE), ROOT)
        world.run(removal, ROOT)
        assert state(world, "a").egress == {}
        if not isinstance(removal, RemoveNode):
            g = state(world, "g")
            assert g.clients == {} and g.forward == {}


POLICY = """{rules: [
  {from: ["tag:ops"], to: ["10.10.0.0/28"], ports: ["22/tcp"]},
  {from: ["tag:ops"], to: ["g"]},
  {from: ["b"], to: ["g"]},
]}"""


def test_under_a_policy_only_members_whose_rules_reach_the_client_s_address_reach_it() -> None:
    world = ingress("a", "b", "g")
    world.run(TagNode(node="a", tags=("ops",)), ROOT)
    world.run(CreateClient(network="office", name="phone", via="g", public_key=PHONE), ROOT)
    world.run(SetPolicy(network="office", document=POLICY), ROOT)
    client = "10.10.0.4/32"
    assert set(state(world, "a").egress) == {client}
    assert state(world, "b").egress == {}  # b sees g, but no rule of b's reaches the client
    forward = state(world, "g").forward
    assert forward[client] == ForwardEntry(
        nat=False,
        rules=(
            ForwardRule(
                sources=(f"{address_of(world, 'a')}/32",), destination=client, allow=("22/tcp",)
            ),
        ),
        exclusive=True,
    )


# -- the agent, the CLI --------------------------------------------------------------


def test_clients_become_peers_with_their_address_and_no_endpoint() -> None:
    desired = desired_state(peers=[("M", PeerEntry(allowed_ips=("10.10.0.1/32",)))])
    sections = msgspec.structs.replace(
        desired.sections, clients={PHONE: ClientEntry(address="10.10.0.9/32", name="phone")}
    )
    after = with_clients(msgspec.structs.replace(desired, sections=sections))
    assert after.peers[PHONE] == PeerEntry(allowed_ips=("10.10.0.9/32",), name="phone")
    assert after.peers["M"] == desired.peers["M"]
    assert with_clients(desired) is desired


VIEW = {
    "name": "phone",
    "network": "office",
    "address": "10.10.0.9",
    "network_cidr": "10.10.0.0/24",
    "mtu": 1380,
    "dns_domain": "office.internal",
    "ranges": [LAN],
    "full_tunnel": False,
    "endpoint": "203.0.113.5:51820",
    "gateway": {"name": "g", "public_key": "GKEY=", "address": "10.10.0.2", "endpoint": None},
}


def test_the_configuration_is_what_wg_quick_reads() -> None:
    assert client_config(VIEW, "PRIV=") == (
        "[Interface]\n"
        "# netmesh client phone in network office, via g\n"
        "PrivateKey = PRIV=\n"
        "Address = 10.10.0.9/32\n"
        "MTU = 1380\n"
        "DNS = 10.10.0.2, office.internal\n"
        "\n"
        "[Peer]\n"
        "# g (ingress gateway)\n"
        "PublicKey = GKEY=\n"
        "Endpoint = 203.0.113.5:51820\n"
        f"AllowedIPs = 10.10.0.0/24, {LAN}\n"
        "PersistentKeepalive = 25\n"
    )
    full = client_config({**VIEW, "full_tunnel": True}, None, dns=False)
    assert "AllowedIPs = 0.0.0.0/0, ::/0\n" in full and "DNS" not in full
    assert not any(line.startswith("PrivateKey") for line in full.splitlines())
    assert "# PrivateKey = (the device's own" in full


def test_an_exclusive_entry_drops_what_it_does_not_allow_before_broader_entries_accept() -> None:
    forward = {
        "10.10.0.0/24": ForwardEntry(
            nat=False,
            rules=(
                ForwardRule(sources=("10.10.0.9/32",), destination="10.10.0.0/24", allow=("any",)),
            ),
        ),
        "10.10.0.9/32": ForwardEntry(
            nat=False,
            rules=(
                ForwardRule(
                    sources=("10.10.0.1/32",), destination="10.10.0.9/32", allow=("22/tcp",)
                ),
            ),
            exclusive=True,
        ),
    }
    ruleset = ruleset_for({}, "nm0", forward, ("10.10.0.0/24",))
    egress = [
        msgspec.json.encode(c["add"]["rule"]["expr"]).decode()
        for c in ruleset.commands
        if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == "egress"
    ]
    to_client = next(i for i, r in enumerate(egress) if '"10.10.0.1"' in r and "accept" in r)
    dropped = next(
        i
        for i, r in enumerate(egress)
        if '"daddr"' in r and r.endswith('{"drop":null}]') and "saddr" not in r and "10.10.0.9" in r
    )
    from_client = next(
        i for i, r in enumerate(egress) if '"saddr"' in r and '"10.10.0.9"' in r.split("daddr")[0]
    )
    assert to_client < dropped < from_client, egress
    assert not any("masquerade" in msgspec.json.encode(c).decode() for c in ruleset.commands)


async def test_clients_survive_the_read_model(tmp_path: Path) -> None:
    """A restarted projection loads the topology from SQLite: every host's
    desired state is the same from it as from the events."""
    world = ingress("a", "b", "g")
    world.run(AddIngress(node="a"), ROOT)
    world.run(CreateClient(network="office", name="phone", via="g", public_key=PHONE), ROOT)
    world.run(CreateClient(network="office", name="tab", via="a", public_key=LAPTOP), ROOT)
    world.run(RemoveNode(node="office/a"), ROOT)  # its client goes too
    loaded = await reloaded(world, tmp_path)
    office_net = world.topology.networks["office"]
    assert loaded.networks["office"].clients == office_net.clients and len(office_net.clients) == 1
    assert loaded.networks["office"].ingress == office_net.ingress
    assert loaded.addresses == world.topology.addresses
    for host_id in world.topology.hosts:
        assert desired_for(loaded, host_id) == desired_for(world.topology, host_id)


def test_a_client_has_a_name_in_the_network_s_domain_while_it_exists() -> None:
    from events.commands import AddDnsRecord
    from events.desired import DnsEntry

    world = ingress("a", "g")
    world.run(CreateClient(network="office", name="phone", via="g", public_key=PHONE), ROOT)
    for member in ("a", "g"):
        assert state(world, member).dns["phone.office.internal"] == DnsEntry(a=("10.10.0.3",))
    error = refused(world, AddDnsRecord(network="office", name="phone", a=("10.10.0.99",)))
    assert error.code == "conflict" and "client office/phone" in error.message
    world.run(RemoveIngress(node="g"), ROOT)
    assert "phone.office.internal" not in state(world, "a").dns


def test_a_client_reaches_only_what_its_own_network_offers_its_gateway() -> None:
    """The gateway's host is in a second network with a range of its own:
    that range is not the client's (its gateway there would not take it)."""
    world = ingress("a", "b", "g")
    world.run(AddEgress(node="office/b", ranges=(LAN,)), ROOT)
    world.run(CreateNetwork(name="lab", cidr="10.20.0.0/24"), ROOT)
    decision, _ = world.run(CreateEnrollmentKey(network="lab", uses=None), ROOT)
    key_id = decision.result["key_id"]
    lab = make_token("nats://cp:4222", key_id, f"s{key_id.removeprefix('k')}")
    world.run(Join(token=lab, public_key=public_key(3), name="g"), None)  # g's host joins lab
    world.run(Join(token=lab, public_key=public_key(60), name="l1"), None)
    world.run(AddEgress(node="lab/l1", ranges=("172.20.0.0/16",)), ROOT)
    decision, _ = world.run(
        CreateClient(network="office", name="phone", via="office/g", public_key=PHONE), ROOT
    )
    assert decision.result["ranges"] == [LAN]
    forward = state(world, "g").forward
    assert "172.20.0.0/16" not in forward and LAN in forward
    assert state(world, "g").routes.keys() == {LAN, "172.20.0.0/16"}  # g itself reaches both
