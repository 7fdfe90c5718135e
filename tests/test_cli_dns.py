"""Names from the command line, against a real control plane (a real
nats-server): `--dns-domain`, `dns add/remove/list [--json]`, `--plan`, and
every bad input one line with exit 1 and the event stream unchanged."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import netmesh, one_line_error
from tests.test_cli import server as server  # the fixture
from tests.test_cli_policy import join, last_seq, ok


async def office(url: str, *names: str) -> None:
    await ok(url, "network", "create", "office", "--cidr", "10.10.0.0/24")
    for n, name in enumerate(names, 1):
        token = await ok(url, "key", "create", "--network", "office")
        await join(url, token.strip(), n, name)


async def test_a_names_session(server: str) -> None:
    await office(server, "web1", "Db_1")
    out = await ok(
        server, "dns", "add", "office", "files", "--a", "10.10.0.50", "--a", "10.10.0.51"
    )
    assert out.strip() == "added files.office.internal -> 10.10.0.50, 10.10.0.51"
    out = await ok(
        server, "dns", "add", "office", "www.office.internal", "--cname", "web1.office.internal"
    )
    assert out.strip() == "added www.office.internal -> web1.office.internal"
    await ok(server, "dns", "add", "office", "v6", "--aaaa", "fd00::1")
    rows = json.loads(await ok(server, "dns", "list", "--json"))
    assert [(r["name"], r["type"], r["value"], r["source"]) for r in rows] == [
        ("db_1.office.internal", "A", "10.10.0.2", "node"),
        ("files.office.internal", "A", "10.10.0.50", "record"),
        ("files.office.internal", "A", "10.10.0.51", "record"),
        ("v6.office.internal", "AAAA", "fd00::1", "record"),
        ("web1.office.internal", "A", "10.10.0.1", "node"),
        ("www.office.internal", "CNAME", "web1.office.internal", "record"),
    ]
    out = await ok(server, "dns", "list", "office")
    assert out.splitlines()[0].split() == ["NAME", "TYPE", "VALUE", "FROM"]
    assert len(out.splitlines()) == 7

    # --plan: what it would do, nothing written.
    before = await last_seq(server)
    plan = json.loads(await ok(server, "dns", "remove", "office", "files", "--plan", "--json"))
    assert [e["type"] for e in plan["events"]] == ["dns.record_removed"]
    # Both members would lose the one name, nothing else.
    assert len(plan["hosts"]) == 2
    assert all("files.office.internal" in text for text in plan["text"])
    assert await last_seq(server) == before
    assert (await ok(server, "dns", "remove", "office", "files")).strip() == (
        "removed files.office.internal"
    )
    names = {r["name"] for r in json.loads(await ok(server, "dns", "list", "--json"))}
    assert "files.office.internal" not in names

    # A new domain: the nodes' names and the records follow.
    out = await ok(server, "network", "update", "office", "--dns-domain", "corp.example")
    assert out.strip().endswith("names *.corp.example")
    names = {r["name"] for r in json.loads(await ok(server, "dns", "list", "office", "--json"))}
    assert names == {
        "web1.corp.example",
        "db_1.corp.example",
        "www.corp.example",
        "v6.corp.example",
    }
    (network,) = json.loads(await ok(server, "network", "list", "--json"))
    assert network["dns_domain"] == "corp.example"
    out = await ok(
        server, "network", "create", "lab", "--cidr", "10.20.0.0/24", "--dns-domain", "lab.example"
    )
    assert out.strip() == "created network lab (10.20.0.0/24, names *.lab.example)"
    assert "DNS DOMAIN" in await ok(server, "network", "list")


BAD = [
    pytest.param(
        ("dns", "add", "nope", "db", "--a", "10.0.0.1"),
        "no network named 'nope'",
        id="unknown network",
    ),
    pytest.param(
        ("dns", "add", "office", "db.example.com", "--a", "10.0.0.1"),
        "outside the domain office.internal",
        id="outside",
    ),
    pytest.param(
        ("dns", "add", "office", "db", "--a", "10.0.0.256"),
        "invalid IP address '10.0.0.256' for --a",
        id="bad ip",
    ),
    pytest.param(("dns", "add", "office", "db", "--a", "fd00::1"), "--a takes IPv4", id="v6 as a"),
    pytest.param(
        ("dns", "add", "office", "db", "--aaaa", "10.0.0.1"), "--aaaa takes IPv6", id="v4 as aaaa"
    ),
    pytest.param(("dns", "add", "office", "db"), "give --a, --aaaa or --cname", id="nothing"),
    pytest.param(
        ("dns", "add", "office", "db", "--a", "10.0.0.1", "--cname", "x.example"),
        "cannot have addresses",
        id="cname and a",
    ),
    pytest.param(
        ("dns", "add", "office", "taken", "--a", "10.0.0.2"), "already exists", id="duplicate"
    ),
    pytest.param(
        ("dns", "add", "office", "WEB1", "--a", "10.0.0.2"),
        "node office/web1's name",
        id="a node's name",
    ),
    pytest.param(("dns", "add", "office", "x-", "--a", "10.0.0.2"), "label", id="bad label"),
    pytest.param(
        ("dns", "remove", "office", "nothing"),
        "has no record nothing.office.internal",
        id="remove unknown",
    ),
    pytest.param(
        ("network", "update", "office", "--dns-domain", "internal"), "one label", id="one label"
    ),
    pytest.param(
        ("network", "update", "office", "--dns-domain", "x.lab.internal"),
        "overlaps network 'lab'",
        id="nested",
    ),
    pytest.param(
        ("network", "create", "annex", "--cidr", "10.30.0.0/24", "--dns-domain", "lab.internal"),
        "overlaps",
        id="same domain",
    ),
]


async def test_every_bad_name_is_one_line_and_writes_nothing(server: str) -> None:
    await office(server, "web1")
    await ok(server, "network", "create", "lab", "--cidr", "10.20.0.0/24")
    await ok(server, "dns", "add", "office", "taken", "--a", "10.10.0.9")
    before = await last_seq(server)
    for param in BAD:
        args, needle = param.values
        for plan in ((), ("--plan",)):
            rc, out, err = await netmesh(server, *args, *plan)  # type: ignore[misc]
            assert rc == 1, (param.id, out, err)
            one_line_error(rc, err, needle)  # type: ignore[arg-type]
            assert out == "", param.id
    assert await last_seq(server) == before
