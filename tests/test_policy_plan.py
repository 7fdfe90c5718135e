"""`projections.policy_plan`, golden tables: members, the policy before and
the one after -> what each host would see change, as it prints."""

from __future__ import annotations

import pytest

from events.policy import parse_policy
from projections.access import AccessIndex, Member
from projections.policy_plan import FirewallChange, firewall_changes, plan_policy

CIDR = "10.10.0.0/24"
MEMBERS = {
    "n1": Member("web1", "10.10.0.1", frozenset({"web"})),
    "n2": Member("db1", "10.10.0.2", frozenset({"db"})),
    "n3": Member("ops1", "10.10.0.3", frozenset({"ops"})),
    "n4": Member("web2", "10.10.0.4", frozenset({"web", "db"})),
}

WEB_TO_DB = '{rules: [{from: ["tag:web"], to: ["tag:db"], ports: ["5432/tcp"]}]}'
ALL = '{rules: [{from: ["*"], to: ["*"]}]}'


def index(document: str | None) -> AccessIndex | None:
    return None if document is None else AccessIndex(parse_policy(document), MEMBERS.items())


def printed(before: str | None, after: str | None) -> str:
    return "\n".join(str(h) for h in plan_policy(MEMBERS, CIDR, index(before), index(after)))


@pytest.mark.parametrize(
    ("before", "after", "golden"),
    [
        pytest.param(None, None, "", id="allow-all to allow-all: nothing"),
        pytest.param(ALL, ALL, "", id="the same policy: nothing"),
        pytest.param(
            None,
            ALL,
            # Same peers; the /24 entry becomes one entry per member.
            """\
db1:
  - allow from 10.10.0.0/24: any
  + allow from 10.10.0.1/32 (web1): any
  + allow from 10.10.0.3/32 (ops1): any
  + allow from 10.10.0.4/32 (web2): any
ops1:
  - allow from 10.10.0.0/24: any
  + allow from 10.10.0.1/32 (web1): any
  + allow from 10.10.0.2/32 (db1): any
  + allow from 10.10.0.4/32 (web2): any
web1:
  - allow from 10.10.0.0/24: any
  + allow from 10.10.0.2/32 (db1): any
  + allow from 10.10.0.3/32 (ops1): any
  + allow from 10.10.0.4/32 (web2): any
web2:
  - allow from 10.10.0.0/24: any
  + allow from 10.10.0.1/32 (web1): any
  + allow from 10.10.0.2/32 (db1): any
  + allow from 10.10.0.3/32 (ops1): any""",
            id="allow-all to a rule allowing all",
        ),
        pytest.param(
            None,
            WEB_TO_DB,
            # web2 is web and db: it may reach itself (not an entry) and db1,
            # and web1 may reach it. ops1 matches nothing: it loses everyone.
            """\
db1:
  - peer ops1
  - allow from 10.10.0.0/24: any
  + allow from 10.10.0.1/32 (web1): 5432/tcp
  + allow from 10.10.0.4/32 (web2): 5432/tcp
ops1:
  - peer db1
  - peer web1
  - peer web2
  - allow from 10.10.0.0/24: any
web1:
  - peer ops1
  - allow from 10.10.0.0/24: any
web2:
  - peer ops1
  - allow from 10.10.0.0/24: any
  + allow from 10.10.0.1/32 (web1): 5432/tcp""",
            id="allow-all to web->db (overlapping tags)",
        ),
        pytest.param(
            WEB_TO_DB,
            None,
            """\
db1:
  + peer ops1
  + allow from 10.10.0.0/24: any
  - allow from 10.10.0.1/32 (web1): 5432/tcp
  - allow from 10.10.0.4/32 (web2): 5432/tcp
ops1:
  + peer db1
  + peer web1
  + peer web2
  + allow from 10.10.0.0/24: any
web1:
  + peer ops1
  + allow from 10.10.0.0/24: any
web2:
  + peer ops1
  + allow from 10.10.0.0/24: any
  - allow from 10.10.0.1/32 (web1): 5432/tcp""",
            id="clearing: the reverse",
        ),
        pytest.param(
            WEB_TO_DB,
            '{rules: [{from: ["tag:web"], to: ["tag:db"], ports: ["5432/tcp", "22/tcp"]},'
            ' {from: ["ops1"], to: ["db1"], ports: ["22/tcp"]}]}',
            """\
db1:
  + peer ops1
  ~ allow from 10.10.0.1/32 (web1): 5432/tcp -> 22/tcp, 5432/tcp
  + allow from 10.10.0.3/32 (ops1): 22/tcp
  ~ allow from 10.10.0.4/32 (web2): 5432/tcp -> 22/tcp, 5432/tcp
ops1:
  + peer db1
web2:
  ~ allow from 10.10.0.1/32 (web1): 5432/tcp -> 22/tcp, 5432/tcp""",
            id="ports widened, a node named",
        ),
        pytest.param(
            WEB_TO_DB,
            '{rules: [{from: ["10.10.0.0/30"], to: ["tag:db"], ports: ["5432/tcp"]}]}',
            # A CIDR source is an entry of its own, besides the members in it
            # (web1 .1, db1 .2, ops1 .3; not web2 .4), who see its destinations.
            """\
db1:
  + peer ops1
  + allow from 10.10.0.0/30: 5432/tcp
  + allow from 10.10.0.3/32 (ops1): 5432/tcp
  - allow from 10.10.0.4/32 (web2): 5432/tcp
ops1:
  + peer db1
  + peer web2
web2:
  + peer ops1
  + allow from 10.10.0.0/30: 5432/tcp
  + allow from 10.10.0.2/32 (db1): 5432/tcp
  + allow from 10.10.0.3/32 (ops1): 5432/tcp""",
            id="a CIDR selector",
        ),
    ],
)
def test_plans(before: str | None, after: str | None, golden: str) -> None:
    assert printed(before, after) == golden


def test_a_change_prints_and_serialises_the_same_way() -> None:
    (gained, changed, lost) = firewall_changes(
        {"10.0.0.2/32": ("any",), "10.0.0.3/32": ("22/tcp",)},
        {"10.0.0.1/32": ("icmp",), "10.0.0.2/32": ("22/tcp",)},
        {"10.0.0.1/32": "a"},
    )
    assert [c.kind for c in (gained, changed, lost)] == ["gained", "changed", "lost"]
    assert str(gained) == "+ allow from 10.0.0.1/32 (a): icmp"
    assert changed == FirewallChange("10.0.0.2/32", ("any",), ("22/tcp",))
    assert lost.to_json() == {
        "source": "10.0.0.3/32",
        "member": None,
        "change": "lost",
        "before": ["22/tcp"],
        "after": [],
    }
