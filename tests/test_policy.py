"""Access policy, the pure core: parsing (JSON5, closed-world, one-line
refusals) and evaluation (who may reach whom, on which ports, and why)."""

from __future__ import annotations

import pytest

from events.policy import ALL_TRAFFIC, PolicyError, Ports, parse_policy, parse_ports
from projections.access import (
    Member,
    Verdict,
    allowed,
    explain,
    failing_tests,
    may_see,
    unknown_references,
    verdict,
)

DOCUMENT = """
// The example of the issue, with comments and trailing commas.
{
  rules: [
    {from: ["tag:web"], to: ["tag:db"], ports: ["5432/tcp"]},
    {from: ["tag:ops"], to: ["*"]},
    {from: ["*"], to: ["tag:web"], ports: ["443/tcp", "80/tcp", "icmp"],},
    {from: ["10.10.0.0/28"], to: ["backup"], ports: ["9000-9100/tcp"]},
  ],
  tests: [
    {from: "web1", to: "db1", accept: ["5432/tcp"], deny: ["22/tcp"]},
  ],
}
"""

WEB = Member("web1", "10.10.0.20", frozenset({"web"}))
DB = Member("db1", "10.10.0.30", frozenset({"db"}))
OPS = Member("ops1", "10.10.0.40", frozenset({"ops"}))
BACKUP = Member("backup", "10.10.0.50")
LOW = Member("low", "10.10.0.5")  # inside 10.10.0.0/28
MEMBERS = {m.name: m for m in (WEB, DB, OPS, BACKUP, LOW)}


def tcp(port: int) -> Ports:
    return Ports("tcp", port, port)


@pytest.mark.parametrize(
    ("source", "destination", "expected"),
    [
        pytest.param(WEB, DB, (tcp(5432),), id="web to db: the database port only"),
        pytest.param(DB, WEB, (Ports("icmp"), tcp(80), tcp(443)), id="anyone to web"),
        pytest.param(DB, OPS, (), id="db to ops: nothing"),
        pytest.param(OPS, DB, ALL_TRAFFIC, id="ops to anything: all traffic"),
        pytest.param(LOW, BACKUP, (Ports("tcp", 9000, 9100),), id="by CIDR and by name"),
        pytest.param(WEB, BACKUP, (), id="outside the CIDR"),
    ],
)
def test_what_a_member_may_open_towards_another(
    source: Member, destination: Member, expected: tuple[Ports, ...]
) -> None:
    assert allowed(parse_policy(DOCUMENT), source, destination) == expected


def test_peers_are_pairs_with_a_rule_either_way() -> None:
    policy = parse_policy(DOCUMENT)
    assert may_see(policy, DB, WEB) and may_see(policy, WEB, DB)
    assert may_see(policy, OPS, BACKUP)
    assert not may_see(policy, DB, BACKUP)  # no rule in either direction: strangers


def test_explain_names_the_rule_that_decided() -> None:
    policy = parse_policy(DOCUMENT)
    ok, rule = explain(policy, WEB, DB, tcp(5432))
    assert ok and rule is not None and rule.index == 1
    assert str(rule) == "rule 1: from tag:web to tag:db ports 5432/tcp"
    assert explain(policy, WEB, DB, tcp(22)) == (False, None)
    ok, rule = explain(policy, OPS, DB, Ports("udp", 53, 53))
    assert ok and rule is not None and rule.index == 2
    assert explain(policy, LOW, BACKUP, Ports("tcp", 9050, 9060))[0]
    assert not explain(policy, LOW, BACKUP, Ports("tcp", 9050, 9200))[0]


def test_tests_in_the_document_pass_or_say_which_fails() -> None:
    policy = parse_policy(DOCUMENT)
    assert failing_tests(policy, MEMBERS) == []
    broken = parse_policy(
        '{rules: [{from: ["*"], to: ["*"]}], tests: [{from: "web1", to: "db1", deny: ["22/tcp"]},'
        ' {from: "web1", to: "nobody", accept: ["icmp"]}]}'
    )
    assert failing_tests(broken, MEMBERS) == [
        "test 1: web1 -> db1 22/tcp is allowed by rule 1: from * to *",
        "test 2: no node named 'nobody'",
    ]


def test_unknown_tags_and_names_are_warnings() -> None:
    policy = parse_policy('{rules: [{from: ["tag:nope", "ghost"], to: ["tag:web"]}]}')
    assert unknown_references(policy, MEMBERS.values()) == [
        "rule 1: no node has tag 'nope' yet",
        "rule 1: no node named 'ghost' yet",
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{rules: [", "not JSON5"),
        ('{rules: [], allow: "all"}', "not a policy: Object contains unknown field `allow`"),
        ('{rules: [{from: ["*"], to: ["*"], port: ["22/tcp"]}]}', "unknown field `port`"),
        ('{rules: [{from: [], to: ["*"]}]}', "rule 1: 'from' and 'to' each need"),
        ('{rules: [{from: ["host:x"], to: ["*"]}]}', "rule 1: unknown selector 'host:x'"),
        ('{rules: [{from: ["tag:Web"], to: ["*"]}]}', "rule 1: bad tag 'Web'"),
        ('{rules: [{from: ["10.0.0.1/8"], to: ["*"]}]}', "rule 1: bad CIDR selector"),
        ('{rules: [{from: ["*"], to: ["*"], ports: ["22"]}]}', "rule 1: bad port '22'"),
        ('{rules: [{from: ["*"], to: ["*"], ports: ["90-80/tcp"]}]}', "1-65535, low to high"),
        ('{rules: [{from: ["*"], to: ["*"], ports: ["0/udp"]}]}', "bad port '0/udp'"),
        ('{rules: [{from: ["*"], to: ["*"], ports: []}]}', "'ports' is empty"),
        ('{tests: [{from: "a", to: "b"}]}', "test 1: give 'accept' or 'deny'"),
        ('{tests: [{from: "a", to: "b", accept: ["ssh"]}]}', "test 1: bad port 'ssh'"),
        ("[1, 2]", "not a policy: Expected `object`"),
    ],
)
def test_a_bad_policy_is_one_line_saying_what(text: str, error: str) -> None:
    with pytest.raises(PolicyError) as refused:
        parse_policy(text)
    message = str(refused.value)
    assert error in message and "\n" not in message


def test_ports_parse_and_print() -> None:
    assert str(parse_ports("443/tcp")) == "443/tcp"
    assert str(parse_ports("1000-2000/udp")) == "1000-2000/udp"
    assert parse_ports("any").covers(parse_ports("53/udp"))
    assert not parse_ports("53/tcp").covers(parse_ports("53/udp"))


def test_a_test_denying_a_range_fails_when_any_port_in_it_is_allowed() -> None:
    members = {
        "web1": Member("web1", "10.10.0.1", frozenset({"web"})),
        "db1": Member("db1", "10.10.0.3", frozenset({"db"})),
    }
    for deny in ("any", "1-1024/tcp", "22/tcp"):
        policy = parse_policy(
            '{"rules": [{"from": ["tag:web"], "to": ["tag:db"], "ports": ["22/tcp"]}],'
            ' "tests": [{"from": "web1", "to": "db1", "deny": ["' + deny + '"]}]}'
        )
        assert failing_tests(policy, members), f"deny {deny} passes though 22/tcp is allowed"
    # A range allowed in pieces by two rules is allowed whole; with a gap, partly.
    split = parse_policy(
        '{"rules": [{"from": ["*"], "to": ["*"], "ports": ["1-100/tcp"]},'
        ' {"from": ["tag:web"], "to": ["*"], "ports": ["101-200/tcp", "300/tcp"]}],'
        ' "tests": [{"from": "web1", "to": "db1",'
        ' "accept": ["1-200/tcp"], "deny": ["201-299/tcp"]}]}'
    )
    assert failing_tests(split, members) == []
    web, db = members["web1"], members["db1"]
    assert verdict(split, web, db, Ports("tcp", 50, 150)) == Verdict(True, False, split.rules)
    gap = verdict(split, web, db, Ports("tcp", 150, 300))
    assert (gap.allowed, gap.partly, gap.rules) == (False, True, split.rules[1:])
    assert verdict(split, db, web, Ports("tcp", 150, 300)).denied
    assert not verdict(split, web, db, Ports("any")).allowed
