"""Tags and access policy, the commands: what each appends, its refusals and
its no-ops (decided against `tests.factories.World`, no NATS), what the log
proves of them, and the read side (show, explain, plan) on the topology."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from controlplane.audit import verify_log
from controlplane.policyviews import explain_access, plan_policy_change, show_policy
from controlplane.rules.base import Rejected
from events.commands import (
    ClearPolicy,
    CreateEnrollmentKey,
    CreateNetwork,
    Join,
    SetPolicy,
    TagNode,
    UntagNode,
)
from events.model import NodeJoined, NodeTagged, NodeUntagged, PolicyCleared, PolicySet
from events.signing import public_text
from events.tokens import make_token
from tests.factories import World, public_key

ROOT = SigningKey.generate()

POLICY = """
// web serves, db stores, ops reaches everything
{
  rules: [
    {from: ["tag:web"], to: ["tag:db"], ports: ["5432/tcp"]},
    {from: ["tag:ops"], to: ["*"]},
    {from: ["*"], to: ["tag:web"], ports: ["443/tcp", "80/tcp", "icmp"]},
  ],
  tests: [{from: "web1", to: "db1", accept: ["5432/tcp"], deny: ["22/tcp"]}],
}
"""


def office(*members: tuple[str, tuple[str, ...]]) -> World:
    """Network office (10.10.0.0/24) with one key per member's tags, each
    member joined with its key; every command signed by the root admin."""
    world = World()
    world.add_root_admin(ROOT)
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24"), ROOT)
    for n, (name, tags) in enumerate(members, 1):
        decision, _ = world.run(CreateEnrollmentKey(network="office", tags=tags), ROOT)
        key_id = decision.result["key_id"]
        token = make_token("nats://cp:4222", key_id, f"s{key_id.removeprefix('k')}")
        world.run(Join(token=token, public_key=public_key(n), name=name))
    return world


def standard() -> World:
    return office(("web1", ("web",)), ("db1", ("db",)), ("ops1", ("ops",)))


def appended(world: World, command: object) -> list[object]:
    before = len(world.log)
    world.run(command, ROOT)  # type: ignore[arg-type]
    return [r.event for r in world.log[before:]]


def refused(world: World, command: object) -> Rejected:
    before = len(world.log)
    with pytest.raises(Rejected) as info:
        world.run(command, ROOT)  # type: ignore[arg-type]
    assert len(world.log) == before, "a refusal writes nothing"
    assert "\n" not in info.value.message
    return info.value


# -- tags ---------------------------------------------------------------------------


def test_a_key_s_tags_go_on_the_nodes_joining_with_it() -> None:
    world = office(("web1", ("web", "edge", "web")))
    (key,) = world.topology.keys.values()
    assert key.tags == ("edge", "web")  # once each, sorted
    joined = [r.event for r in world.log if isinstance(r.event, NodeJoined)]
    assert joined[0].tags == ("edge", "web")
    (node,) = world.topology.nodes.values()
    assert node.tags == frozenset({"edge", "web"})


def test_tagging_records_only_the_tags_that_change() -> None:
    world = office(("web1", ("web",)))
    (event,) = appended(world, TagNode(node="office/web1", tags=("web", "prod", "eu")))
    assert isinstance(event, NodeTagged) and event.tags == ("eu", "prod")
    (node,) = world.topology.nodes.values()
    assert node.tags == frozenset({"web", "prod", "eu"})
    (event,) = appended(world, UntagNode(node="web1", tags=("eu", "nope")))
    assert isinstance(event, NodeUntagged) and event.tags == ("eu",)
    assert node.tags == frozenset({"web", "prod"})


@pytest.mark.parametrize(
    "command",
    [
        TagNode(node="web1", tags=("web",)),
        UntagNode(node="web1", tags=("db",)),
    ],
    ids=["tag it already carries", "untag one it does not carry"],
)
def test_a_tag_change_that_changes_nothing_writes_nothing(command: object) -> None:
    world = office(("web1", ("web",)))
    before = len(world.log)
    decision, _ = world.run(command, ROOT)  # type: ignore[arg-type]
    assert len(world.log) == before
    assert decision.result["changed"] == [] and decision.result["tags"] == ["web"]


@pytest.mark.parametrize(
    ("command", "code", "needle"),
    [
        (TagNode(node="web1", tags=("Web",)), "invalid", "invalid tag 'Web'"),
        (TagNode(node="web1", tags=("a" * 33,)), "invalid", "tags are 1-32"),
        (TagNode(node="web1", tags=("-x",)), "invalid", "invalid tag '-x'"),
        (TagNode(node="web1", tags=("ok", "tag:x")), "invalid", "invalid tag 'tag:x'"),
        (TagNode(node="web1", tags=()), "invalid", "at least one tag"),
        (TagNode(node="web1", tags=tuple(f"t{n}" for n in range(65))), "invalid", "at most 64"),
        (UntagNode(node="web1", tags=("b@d",)), "invalid", "invalid tag"),
        (TagNode(node="ghost", tags=("web",)), "not_found", "no node 'ghost'"),
        (CreateEnrollmentKey(network="office", tags=("UPPER",)), "invalid", "invalid tag"),
    ],
)
def test_tag_refusals(command: object, code: str, needle: str) -> None:
    error = refused(office(("web1", ())), command)
    assert error.code == code and needle in error.message, error.message


# -- policy ---------------------------------------------------------------------------


def test_setting_a_policy_records_it_as_written() -> None:
    world = standard()
    decision, _ = world.run(SetPolicy(network="office", document=POLICY), ROOT)
    assert decision.result == {"network": "office", "warnings": [], "changed": True}
    event = world.log[-1].event
    assert isinstance(event, PolicySet) and event.document == POLICY  # comments kept
    network = world.topology.networks["office"]
    assert network.policy is not None and network.policy_seq == world.log[-1].seq
    assert show_policy(world.topology, "office") == {
        "network": "office",
        "policy": True,
        "document": POLICY,
        "revision": world.log[-1].seq,
        "error": None,
    }


def test_setting_the_same_text_again_is_a_no_op() -> None:
    world = standard()
    world.run(SetPolicy(network="office", document=POLICY), ROOT)
    revision = world.log[-1].seq
    before = len(world.log)
    decision, _ = world.run(SetPolicy(network="office", document=POLICY), ROOT)
    assert len(world.log) == before
    assert decision.result["changed"] is False and decision.result["revision"] == revision
    # Other text (a comment more) is another document: recorded.
    assert appended(world, SetPolicy(network="office", document=POLICY + "// again\n"))


def test_clearing_returns_to_allow_all_and_clearing_nothing_is_a_no_op() -> None:
    world = standard()
    before = len(world.log)
    decision, _ = world.run(ClearPolicy(network="office"), ROOT)
    assert len(world.log) == before and decision.result["changed"] is False
    world.run(SetPolicy(network="office", document=POLICY), ROOT)
    (event,) = appended(world, ClearPolicy(network="office"))
    assert isinstance(event, PolicyCleared)
    assert world.topology.networks["office"].policy is None
    assert show_policy(world.topology, "office")["policy"] is False


def test_unknown_tags_and_names_are_warnings_and_the_policy_is_set() -> None:
    world = standard()
    document = '{rules: [{from: ["tag:nobody"], to: ["db9"]}]}'
    decision, _ = world.run(SetPolicy(network="office", document=document), ROOT)
    assert decision.result["changed"] is True
    assert decision.result["warnings"] == [
        "rule 1: no node has tag 'nobody' yet",
        "rule 1: no node named 'db9' yet",
    ]


# Every malformed policy: refused in one line, nothing written.
BAD_POLICIES = [
    pytest.param("{rules: [", "invalid policy: not JSON5", id="not JSON5"),
    pytest.param("{rules: [], acls: []}", "unknown field `acls`", id="unknown top-level key"),
    pytest.param('{rules: [{to: ["*"]}]}', "missing required field `from`", id="rule without from"),
    pytest.param('{rules: [{from: ["*"]}]}', "missing required field `to`", id="rule without to"),
    pytest.param('{rules: [{from: [], to: ["*"]}]}', "at least one selector", id="empty from"),
    pytest.param(
        '{rules: [{from: ["*"], to: ["*"], ports: []}]}', "'ports' is empty", id="empty ports"
    ),
    pytest.param(
        '{rules: [{from: ["group:x"], to: ["*"]}]}',
        "unknown selector 'group:x'",
        id="unknown selector kind",
    ),
    pytest.param('{rules: [{from: ["tag:Web"], to: ["*"]}]}', "bad tag 'Web'", id="bad tag"),
    pytest.param('{rules: [{from: ["10.0.0.300/24"], to: ["*"]}]}', "bad CIDR", id="bad CIDR"),
    pytest.param(
        '{rules: [{from: ["*"], to: ["*"], ports: ["70000/tcp"]}]}',
        "bad port '70000/tcp'",
        id="port out of range",
    ),
    pytest.param(
        '{rules: [{from: ["*"], to: ["*"], ports: ["22/sctp"]}]}',
        "bad port '22/sctp'",
        id="unknown protocol",
    ),
    pytest.param(
        '{rules: [{from: ["*"], to: ["*"]}], tests: [{from: "web1", to: "db1", accept: ["x"]}]}',
        "test 1: bad port 'x'",
        id="bad port in a test",
    ),
    pytest.param(
        '{rules: [{from: ["tag:web"], to: ["tag:db"], ports: ["5432/tcp"]}],'
        ' tests: [{from: "web1", to: "db1", accept: ["22/tcp"]}]}',
        "policy tests fail: test 1: web1 -> db1 22/tcp is denied",
        id="failing test: accept",
    ),
    pytest.param(
        '{rules: [{from: ["*"], to: ["*"]}], tests: [{from: "web1", to: "db1", deny: ["22/tcp"]}]}',
        "test 1: web1 -> db1 22/tcp is allowed by rule 1: from * to *",
        id="failing test: deny",
    ),
    pytest.param(
        '{rules: [], tests: [{from: "web1", to: "db9", deny: ["22/tcp"]}]}',
        "test 1: no node named 'db9'",
        id="failing test: unknown node",
    ),
    pytest.param("[1, 2]", "not a policy", id="not an object"),
]


@pytest.mark.parametrize(("document", "needle"), BAD_POLICIES)
def test_a_bad_policy_is_refused_in_one_line(document: str, needle: str) -> None:
    world = standard()
    error = refused(world, SetPolicy(network="office", document=document))
    assert error.code == "invalid" and needle in error.message, error.message
    with pytest.raises(Rejected) as plan:
        plan_policy_change(world.topology, "office", document)
    assert plan.value.message == error.message  # --plan refuses what set would


def test_policy_commands_on_a_network_that_is_not_there() -> None:
    world = standard()
    for command in (SetPolicy(network="nope", document=POLICY), ClearPolicy(network="nope")):
        assert refused(world, command).code == "not_found"


def test_a_huge_document_is_refused() -> None:
    world = standard()
    document = "{rules: []}" + " " * 300_000
    assert "at most" in refused(world, SetPolicy(network="office", document=document)).message


# -- the log proves them ------------------------------------------------------------


def test_tag_and_policy_events_verify_as_signed_admin_commands() -> None:
    world = standard()
    world.run(TagNode(node="web1", tags=("prod",)), ROOT)
    world.run(UntagNode(node="web1", tags=("prod",)), ROOT)
    world.run(SetPolicy(network="office", document=POLICY), ROOT)
    world.run(ClearPolicy(network="office"), ROOT)
    report = verify_log(world.log, root=public_text(ROOT))
    assert report.problems == []
    # network, 3 keys, tag, untag, set, clear (the joins are unsigned hosts')
    assert report.signed_commands == 8


def test_a_signed_tag_command_cannot_be_pinned_on_other_tags() -> None:
    import msgspec

    world = standard()
    world.run(TagNode(node="web1", tags=("prod",)), ROOT)
    last = world.log[-1]
    assert isinstance(last.event, NodeTagged)
    forged = msgspec.structs.replace(last.event, tags=("admin",))
    world.log[-1] = msgspec.structs.replace(
        last, envelope=msgspec.structs.replace(last.envelope, data=forged)
    )
    problems = [why for _, why in verify_log(world.log, root=public_text(ROOT)).problems]
    assert problems[0] == "the event's tags are not among the signed ones", problems


# -- explain and plan -----------------------------------------------------------------


def test_explain_names_the_rule_or_says_denied() -> None:
    world = standard()
    assert explain_access(world.topology, "office", "web1", "db1", "5432/tcp")["reason"] == (
        "no policy: everyone reaches everyone"
    )
    world.run(SetPolicy(network="office", document=POLICY), ROOT)
    answer = explain_access(world.topology, "office", "web1", "db1", "5432/tcp")
    assert answer["allowed"] is True
    assert answer["rules"] == [
        {"index": 1, "rule": "rule 1: from tag:web to tag:db ports 5432/tcp"}
    ]
    answer = explain_access(world.topology, "office", "web1", "db1", "22/tcp")
    assert (answer["allowed"], answer["rules"]) == (False, [])
    answer = explain_access(world.topology, "office", "ops1", "web1", None)
    assert answer["allowed"] == ["any"]
    assert [r["index"] for r in answer["rules"]] == [2, 3]
    answer = explain_access(world.topology, "office", "db1", "ops1", None)
    assert (answer["allowed"], answer["rules"], answer["peers"]) == ([], [], True)
    with pytest.raises(Rejected, match="no node named 'ghost' in network 'office'"):
        explain_access(world.topology, "office", "ghost", "db1", None)
    # An address stands for what is not a node (a client, a LAN host): only
    # `*` and CIDR selectors match it.
    outside = explain_access(world.topology, "office", "192.0.2.9", "web1", "icmp")
    assert outside["allowed"] is True and [r["index"] for r in outside["rules"]] == [3]
    assert (
        explain_access(world.topology, "office", "192.0.2.9", "db1", "5432/tcp")["allowed"] is False
    )
    with pytest.raises(Rejected, match="bad port '99999/tcp'"):
        explain_access(world.topology, "office", "web1", "db1", "99999/tcp")


def test_the_plan_of_a_first_policy_per_host() -> None:
    world = standard()
    plan = plan_policy_change(world.topology, "office", POLICY)
    assert plan["changed"] is True and plan["warnings"] == []
    # web1 10.10.0.1, db1 .2, ops1 .3; before: all see all, the /24 may send anything.
    assert plan["text"] == [
        "db1:\n"
        "  - allow from 10.10.0.0/24: any\n"
        "  + allow from 10.10.0.1/32 (web1): 5432/tcp\n"
        "  + allow from 10.10.0.3/32 (ops1): any",
        # ops1 may open anything; nothing may open towards it (replies pass).
        "ops1:\n  - allow from 10.10.0.0/24: any",
        "web1:\n"
        "  - allow from 10.10.0.0/24: any\n"
        "  + allow from 10.10.0.2/32 (db1): icmp, 80/tcp, 443/tcp\n"
        "  + allow from 10.10.0.3/32 (ops1): any",
    ]
    assert len(world.log) == len(standard().log)  # planning writes nothing


def test_the_plan_between_two_policies_and_of_the_same_one() -> None:
    world = standard()
    world.run(SetPolicy(network="office", document=POLICY), ROOT)
    assert plan_policy_change(world.topology, "office", POLICY)["hosts"] == []
    narrower = '{rules: [{from: ["tag:web"], to: ["tag:db"], ports: ["5432/tcp", "22/tcp"]}]}'
    plan = plan_policy_change(world.topology, "office", narrower)
    assert plan["text"] == [
        "db1:\n"
        "  - peer ops1\n"
        "  ~ allow from 10.10.0.1/32 (web1): 5432/tcp -> 22/tcp, 5432/tcp\n"
        "  - allow from 10.10.0.3/32 (ops1): any",
        "ops1:\n  - peer db1\n  - peer web1",
        "web1:\n"
        "  - peer ops1\n"
        "  - allow from 10.10.0.2/32 (db1): icmp, 80/tcp, 443/tcp\n"
        "  - allow from 10.10.0.3/32 (ops1): any",
    ]


def test_the_plan_s_after_view_is_what_the_firewall_section_derives() -> None:
    from projections.policy_plan import view_of
    from projections.sections.firewall import FirewallSection

    world = standard()
    for document in (None, POLICY, '{rules: [{from: ["10.10.0.0/31"], to: ["tag:db"]}]}'):
        if document is not None:
            world.run(SetPolicy(network="office", document=document), ROOT)
        network = world.topology.networks["office"]
        members = {n.node_id: n.member() for n in world.topology.nodes_of_network("office")}
        section = FirewallSection(world.topology)
        for node in world.topology.nodes_of_network("office"):
            derived = {k: e.allow for k, e in section.entries(node.host_id).items()}
            assert derived == view_of(node.node_id, members, network.cidr, network.access).firewall
