"""Access policy in the desired state: who each host gets as peers and what
its firewall lets in (golden tables), what a change sends to whom (only the
hosts whose peers or rules move), and the protocol's promise under any
sequence of joins, departures, tag and policy changes (property)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from controlplane.decide import Rejected, host_id_for
from events.commands import (
    AddDnsRecord,
    AddEgress,
    ClearExit,
    CreateEnrollmentKey,
    CreateNetwork,
    Join,
    RemoveDnsRecord,
    RemoveEgress,
    RemoveNode,
    ReportEndpoint,
    RotateHostKey,
    SetExit,
    UpdateNetwork,
)
from events.desired import DesiredDelta, DesiredState, FirewallEntry
from events.envelope import make_envelope
from events.model import AnyEvent, NodeTagged, NodeUntagged, PolicyCleared, PolicySet
from events.subjects import aggregate_subject
from events.tokens import make_token
from projections.desired import desired_for
from projections.topology import Topology, Touched
from tests.factories import World, public_key
from tests.test_projections import Agents

POLICY = """
{rules: [
  {from: ["tag:web"], to: ["tag:db"], ports: ["5432/tcp"]},
  {from: ["tag:ops"], to: ["*"]},
  {from: ["*"], to: ["tag:web"], ports: ["443/tcp", "80/tcp", "icmp"]},
  {from: ["10.10.0.0/30"], to: ["backup"], ports: ["9000-9100/tcp"]},
  {from: ["web1"], to: ["tag:db"], ports: ["22/tcp"]},
]}
"""

# name -> tags; joined in this order, so addresses are 10.10.0.1, .2, ...
MEMBERS = {
    "web1": ("web",),  # .1
    "web2": ("web",),  # .2
    "db1": ("db",),  # .3
    "ops1": ("ops",),  # .4
    "backup": (),  # .5
    "lonely": (),  # .6
}


class PolicyWorld:
    """A network of MEMBERS, the events to change tags and policy, and agents
    that have applied everything published so far."""

    def __init__(self, members: dict[str, tuple[str, ...]] = MEMBERS) -> None:
        self.world = World()
        self.world.run(CreateNetwork(name="office", cidr="10.10.0.0/24"))
        key_id = self.world.run(CreateEnrollmentKey(network="office", uses=None))[0].result[
            "key_id"
        ]
        self.token = make_token("x", key_id, f"s{self.world._keys}")
        self.agents = Agents()
        self.host: dict[str, str] = {}
        self.number: dict[str, int] = {}
        joined: list[Touched] = []
        for name, tags in members.items():
            joined += self.join(name, tags)
        self.flush(joined)

    @property
    def topology(self) -> Topology:
        return self.world.topology

    def join(self, name: str, tags: tuple[str, ...] = ()) -> list[Touched]:
        number = self.number.setdefault(name, len(self.number) + 1)
        decision, touched = self.world.run(
            Join(token=self.token, public_key=public_key(number), name=name)
        )
        self.host[name] = decision.result["host_id"]
        if tags:
            touched += self.tag(name, *tags)
        return touched

    def node_id(self, name: str) -> str:
        return next(
            n.node_id for n in self.topology.nodes_of_host(self.host[name]) if n.name == name
        )

    def emit(self, event: AnyEvent) -> list[Touched]:
        envelope = make_envelope(
            event, event_id=str(len(self.world.log)), time=0, actor="test", command_id=""
        )
        return [self.world.record(aggregate_subject("network", "office"), envelope)]

    def tag(self, name: str, *tags: str) -> list[Touched]:
        node = self.topology.nodes[self.node_id(name)]
        return self.emit(
            NodeTagged(network="office", node_id=node.node_id, host_id=node.host_id, tags=tags)
        )

    def untag(self, name: str, *tags: str) -> list[Touched]:
        node = self.topology.nodes[self.node_id(name)]
        return self.emit(
            NodeUntagged(network="office", node_id=node.node_id, host_id=node.host_id, tags=tags)
        )

    def set_policy(self, text: str | None) -> list[Touched]:
        if text is None:
            return self.emit(PolicyCleared(network="office"))
        return self.emit(PolicySet(network="office", document=text))

    def flush(self, touched: list[Touched]) -> dict[str, DesiredState | DesiredDelta]:
        sent = self.agents.publish(self.topology, touched)
        self.agents.assert_converged(self.topology)
        return {m.host_id: m for m in sent}

    def names(self, host_ids: object) -> set[str]:
        by_host = {h: n for n, h in self.host.items()}
        return {by_host[h] for h in host_ids}  # type: ignore[attr-defined]

    def peers(self, name: str) -> set[str]:
        state = desired_for(self.topology, self.host[name])
        assert state is not None
        return {p.name for p in state.peers.values()}

    def firewall(self, name: str) -> dict[str, tuple[str, ...]]:
        state = desired_for(self.topology, self.host[name])
        assert state is not None
        return {cidr: entry.allow for cidr, entry in state.sections.firewall.items()}


@pytest.fixture
def office() -> PolicyWorld:
    return PolicyWorld()


def test_without_a_policy_everyone_sees_everyone_and_the_network_is_let_in(
    office: PolicyWorld,
) -> None:
    assert office.peers("lonely") == set(MEMBERS) - {"lonely"}
    assert office.firewall("lonely") == {"10.10.0.0/24": ("any",)}


@pytest.mark.parametrize(
    ("name", "peers", "firewall"),
    [
        pytest.param(
            "web1",
            {"web2", "db1", "ops1", "backup", "lonely"},
            {
                # everyone to web (the other web host and db1 included)
                "10.10.0.2/32": ("icmp", "80/tcp", "443/tcp"),
                "10.10.0.3/32": ("icmp", "80/tcp", "443/tcp"),
                "10.10.0.4/32": ("any",),  # ops to anything, overlapping rule 3
                "10.10.0.5/32": ("icmp", "80/tcp", "443/tcp"),
                "10.10.0.6/32": ("icmp", "80/tcp", "443/tcp"),
            },
            id="web: reached by everyone on its web ports",
        ),
        pytest.param(
            "db1",
            {"web1", "web2", "ops1", "backup"},  # db1 (.3) is in backup's range
            {
                # web1 by tag and by name: the union of both rules' ports
                "10.10.0.1/32": ("22/tcp", "5432/tcp"),
                "10.10.0.2/32": ("5432/tcp",),
                "10.10.0.4/32": ("any",),
            },
            id="db: web on 5432, web1 by name on 22 too, ops on everything",
        ),
        pytest.param(
            "backup",
            {"web1", "web2", "db1", "ops1"},
            {
                "10.10.0.0/30": ("9000-9100/tcp",),  # the range, a key of its own
                "10.10.0.1/32": ("9000-9100/tcp",),
                "10.10.0.2/32": ("9000-9100/tcp",),
                "10.10.0.3/32": ("9000-9100/tcp",),
                "10.10.0.4/32": ("any",),
            },
            id="backup: by name, from a CIDR (web1, web2, db1 are in it)",
        ),
        pytest.param(
            "lonely",
            {"web1", "web2", "ops1"},
            {"10.10.0.4/32": ("any",)},
            id="lonely: sees web (it may open it) and ops (which may open it)",
        ),
        pytest.param(
            "ops1",
            {"web1", "web2", "db1", "backup", "lonely"},
            {},
            id="ops: reaches everyone, and nothing may open towards it",
        ),
    ],
)
def test_golden_peers_and_firewall_under_the_policy(
    office: PolicyWorld, name: str, peers: set[str], firewall: dict[str, tuple[str, ...]]
) -> None:
    office.flush(office.set_policy(POLICY))
    assert office.peers(name) == peers
    assert office.firewall(name) == firewall


def test_the_first_policy_and_clearing_it_send_everyone_a_snapshot(office: PolicyWorld) -> None:
    sent = office.flush(office.set_policy(POLICY))
    assert set(sent) == set(office.host.values())
    assert all(isinstance(m, DesiredState) for m in sent.values())
    sent = office.flush(office.set_policy(None))
    assert all(isinstance(m, DesiredState) for m in sent.values())
    assert office.peers("lonely") == set(MEMBERS) - {"lonely"}
    assert office.firewall("db1") == {"10.10.0.0/24": ("any",)}


def test_a_rule_change_sends_deltas_only_to_the_hosts_it_concerns(office: PolicyWorld) -> None:
    office.flush(office.set_policy(POLICY))
    # Rule 5 goes (web1 -> db on 22): only db1's firewall entry for web1 moves,
    # and neither end loses the other as a peer (rule 1 still joins them).
    sent = office.flush(office.set_policy(POLICY.replace('{from: ["web1"]', '{from: ["nobody"]')))
    assert office.names(sent) == {"web1", "db1"}
    to_db = sent[office.host["db1"]]
    assert isinstance(to_db, DesiredDelta)
    assert to_db.upsert.firewall == {"10.10.0.1/32": FirewallEntry(allow=("5432/tcp",))}
    assert office.firewall("db1")["10.10.0.1/32"] == ("5432/tcp",)


def test_a_tag_change_moves_peers_and_firewall_of_the_hosts_its_rules_name(
    office: PolicyWorld,
) -> None:
    office.flush(office.set_policy(POLICY))
    # lonely becomes a database: web may open 5432 on it, web1 22, and it
    # and web see each other (they did already: everyone sees web).
    sent = office.flush(office.tag("lonely", "db"))
    assert office.names(sent) <= {"lonely", "web1", "web2", "ops1"}
    assert "lonely" in office.names(sent)
    assert office.firewall("lonely")["10.10.0.1/32"] == ("22/tcp", "5432/tcp")
    # web2 loses its tag: it no longer reaches the databases on 5432, and
    # nobody reaches it on the web ports any more.
    office.flush(office.untag("web2", "web"))
    assert "10.10.0.2/32" not in office.firewall("db1")
    assert "10.10.0.3/32" not in office.firewall("web2")
    # It still reaches web (everyone does) and backup (it is in the range).
    assert office.peers("web2") == {"ops1", "web1", "backup"}
    assert "web2" not in office.peers("db1")


def test_a_join_under_a_policy_tells_only_the_hosts_that_see_the_newcomer(
    office: PolicyWorld,
) -> None:
    office.flush(office.set_policy(POLICY))
    # A plain host (no tags) is seen by web (it may open web's ports) and ops.
    sent = office.flush(office.join("plain"))
    assert office.names(sent) == {"plain", "web1", "web2", "ops1"}
    assert isinstance(sent[office.host["plain"]], DesiredState)
    assert office.peers("plain") == {"web1", "web2", "ops1"}
    # And its departure is told to the same hosts, no others.
    sent = office.flush(office.world.run(RemoveNode(node="office/plain"))[1])
    assert office.names(sent) == {"plain", "web1", "web2", "ops1"}


def test_an_endpoint_move_under_a_policy_reaches_only_the_hosts_that_see_it(
    office: PolicyWorld,
) -> None:
    office.flush(office.set_policy(POLICY))
    _, touched = office.world.run(
        ReportEndpoint(host_id=office.host["lonely"], endpoints=("198.51.100.9",))
    )
    sent = office.flush(touched)
    # Itself (its own listen port is in its interface entry), and its viewers.
    assert office.names(sent) == {"lonely", "web1", "web2", "ops1"}


def test_a_policy_that_no_longer_parses_lets_nothing_in(office: PolicyWorld) -> None:
    office.flush(office.set_policy("{rules: [{from: ['*'], to: ['group:x']}]}"))
    network = office.topology.networks["office"]
    assert "unknown selector" in network.policy_error
    assert office.peers("web1") == set() and office.firewall("web1") == {}


# -- the property ---------------------------------------------------------------

POLICIES = [
    None,
    POLICY,
    '{rules: [{from: ["tag:a"], to: ["tag:b"], ports: ["22/tcp"]}]}',
    '{rules: [{from: ["tag:a"], to: ["tag:b"]}, {from: ["*"], to: ["tag:c"], ports: ["icmp"]}]}',
    '{rules: [{from: ["h1", "tag:c"], to: ["10.10.0.0/29"], ports: ["1-100/udp"]}]}',
    '{rules: [{from: ["*"], to: ["*"]}]}',
    "{rules: []}",
    # Egress ranges (EGRESS_RANGES): the LAN whole, a part of it, and a gateway
    # seen by the users of its range.
    '{rules: [{from: ["tag:a"], to: ["192.168.50.0/24", "tag:b"]},'
    ' {from: ["*"], to: ["192.168.50.128/25"], ports: ["443/tcp"]},'
    ' {from: ["tag:c"], to: ["*"], ports: ["icmp"]}]}',
]
EGRESS_RANGES = ("192.168.50.0/24", "172.16.0.0/16", "0.0.0.0/0")

POLICY_OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                *("join", "remove", "tag", "untag", "policy", "endpoint", "rotate"),
                *("join lab", "egress", "egress", "unegress", "exit", "exit", "exit off"),
                *("record", "unrecord", "domain"),
            ]
        ),
        st.integers(0, 6),
        st.sampled_from(["a", "b", "c", "db", "web", "ops"]),
        st.integers(0, len(POLICIES) - 1),
        st.booleans(),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(POLICY_OPS)
# Found by hypothesis: under a policy, a node joining with a custom record's
# name took it from every member, not only from those who see the node.
@example(
    [
        ("join", 0, "a", 0, False),
        ("policy", 0, "a", 1, False),
        ("record", 4, "a", 0, False),
        ("join", 0, "a", 0, True),
        ("join", 4, "a", 0, False),
    ]
)
def test_deltas_under_any_policy_changes_equal_the_derived_state(
    ops: list[tuple[str, int, str, int, bool]],
) -> None:
    office = PolicyWorld({f"h{n}": () for n in range(4)})
    # A second network without a policy, which some hosts are in too: they
    # see each other through it whatever the office's policy says.
    office.world.run(CreateNetwork(name="lab", cidr="10.20.0.0/24"))
    key_id = office.world.run(CreateEnrollmentKey(network="lab", uses=None))[0].result["key_id"]
    lab = make_token("x", key_id, f"s{office.world._keys}")
    pending: list[Touched] = []
    for op, host, tag, policy, flush in ops:
        name = f"h{host}"
        try:
            if op == "join":
                touched = office.join(name, (tag,) if policy % 2 else ())
            elif op == "join lab":
                number = office.number.setdefault(name, len(office.number) + 1)
                decision, touched = office.world.run(
                    Join(token=lab, public_key=public_key(number), name=name)
                )
                office.host[name] = decision.result["host_id"]
            elif op == "remove":
                network = "lab" if flush else "office"
                _, touched = office.world.run(RemoveNode(node=f"{network}/{name}"))
            elif op in ("tag", "untag"):
                if name not in office.host or not office.topology.nodes_of_host(office.host[name]):
                    continue
                touched = (office.tag if op == "tag" else office.untag)(name, tag)
            elif op == "policy":
                touched = office.set_policy(POLICIES[policy])
            elif op == "egress":
                # Two gateways of one range (different metrics) happen often.
                network = "lab" if policy == 0 else "office"
                _, touched = office.world.run(
                    AddEgress(
                        node=f"{network}/{name}",
                        ranges=(EGRESS_RANGES[policy % 3],),
                        nat=flush,
                        metric=policy,
                    )
                )
            elif op == "exit":
                internet = sorted(
                    node_id
                    for node_id, g in office.topology.networks["office"].gateways.items()
                    if "0.0.0.0/0" in g.ranges
                )
                via = internet[policy % len(internet)] if internet else f"h{policy}"
                _, touched = office.world.run(SetExit(node=f"office/{name}", via=via))
            elif op == "exit off":
                _, touched = office.world.run(ClearExit(node=f"office/{name}"))
            elif op == "unegress":
                _, touched = office.world.run(RemoveEgress(node=f"office/{name}"))
            elif op in ("record", "unrecord"):
                # Now and then a node's name: the node, joining later, takes it.
                network, record = ("lab" if flush else "office"), tag if policy % 2 else name
                command = (
                    AddDnsRecord(network=network, name=record, a=(f"10.99.0.{host + 1}",))
                    if op == "record"
                    else RemoveDnsRecord(network=network, name=record)
                )
                _, touched = office.world.run(command)
            elif op == "domain":
                domain = ("office.internal", "corp.example", "x.corp.example")[policy % 3]
                _, touched = office.world.run(UpdateNetwork(name="office", dns_domain=domain))
            elif op == "endpoint":
                _, touched = office.world.run(
                    ReportEndpoint(
                        host_id=office.host[name],
                        endpoints=(f"198.51.100.{len(office.world.log)}",),
                    )
                )
            else:
                _, touched = office.world.run(
                    RotateHostKey(
                        host_id=host_id_for(public_key(office.number[name])),
                        public_key=public_key(1000 + len(office.world.log)),
                    )
                )
        except (Rejected, KeyError, StopIteration):
            continue
        pending.extend(touched)
        if flush:
            office.flush(pending)
            pending = []
    office.flush(pending)


def test_a_keepalive_change_under_a_policy_names_no_key_a_host_may_not_see(
    office: PolicyWorld,
) -> None:
    office.flush(office.set_policy(POLICY))
    # lonely sees web1, web2 and ops1; not db1, not backup.
    hidden = {office.topology.hosts[office.host[n]].public_key for n in ("db1", "backup")}
    _, touched = office.world.run(UpdateNetwork(name="office", keepalive=15))
    sent = office.flush(touched)
    to_lonely = sent[office.host["lonely"]]
    assert isinstance(to_lonely, DesiredDelta)
    named = set(to_lonely.upsert.peers) | set(to_lonely.remove.get("peers", ()))
    assert named and not named & hidden
    assert all(p.persistent_keepalive == 15 for p in to_lonely.upsert.peers.values())


def test_no_message_ever_names_a_key_its_host_may_not_see(office: PolicyWorld) -> None:
    """Visibility holds for removals too: a host is told to drop only a peer
    (or a name) it had."""
    office.flush(office.set_policy(POLICY))
    held = {h: set(s.peers) for h, s in office.agents.states.items()}
    names = {h: set(s.sections.dns) for h, s in office.agents.states.items()}
    steps: list[Callable[[], list[Touched]]] = [
        lambda: office.tag("lonely", "db"),
        lambda: office.untag("web2", "web"),
        lambda: office.world.run(UpdateNetwork(name="office", keepalive=9))[1],
        lambda: office.join("plain"),
        lambda: office.world.run(RemoveNode(node="office/plain"))[1],
        lambda: office.set_policy(POLICY.replace('"80/tcp", ', "")),
    ]
    for step in steps:
        sent = office.flush(step())
        for host_id, message in sent.items():
            if isinstance(message, DesiredDelta):
                # (A host may be told to drop its own key, which it never
                # holds: a changed rule between overlapping sets names it.)
                own = office.topology.hosts[host_id].public_key
                removed = set(message.remove.get("peers", ())) - {own}
                assert removed <= held.get(host_id, set()), (step, host_id)
                gone = set(message.remove.get("dns", ()))
                assert gone <= names.get(host_id, set()), (step, host_id, gone)
        held = {h: set(s.peers) for h, s in office.agents.states.items()}
        names = {h: set(s.sections.dns) for h, s in office.agents.states.items()}
