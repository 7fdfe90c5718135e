"""Gateways from the command line, against a real control plane (a real
nats-server): what each command prints, `--json`, `--plan`, and its one-line
refusals (exit 1, the event stream unchanged)."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import netmesh, one_line_error
from tests.test_cli import server as server  # the fixture
from tests.test_cli_policy import last_seq, office, ok


async def test_egress_add_list_remove(server: str) -> None:
    await office(server, ("a", ()), ("g", ()))
    out = await ok(server, "gateway", "egress", "add", "g", "--range", "192.168.1.0/24")
    assert out.strip() == "node office/g forwards to 192.168.1.0/24 (masqueraded, metric 100)"
    before = await last_seq(server)
    out = await ok(server, "gateway", "egress", "add", "office/g", "--range", "192.168.1.0/24")
    assert "is already an egress gateway to 192.168.1.0/24" in out
    assert await last_seq(server) == before
    plan = json.loads(
        await ok(
            server, "gateway", "egress", "add", "g", "--range", "10.99.0.0/16", "--plan", "--json"
        )
    )
    assert [e["type"] for e in plan["events"]] == ["egress.added"]
    assert await last_seq(server) == before, "a plan writes nothing"
    (row,) = json.loads(await ok(server, "gateway", "list", "--json"))
    assert (row["name"], row["ranges"], row["nat"], row["metric"]) == (
        "g",
        ["192.168.1.0/24"],
        True,
        100,
    )
    header, line = (await ok(server, "gateway", "list")).splitlines()
    assert header.split() == [
        *("NETWORK", "NODE", "ADDRESS", "KIND", "RANGES", "NAT", "METRIC", "CLIENTS")
    ]
    assert line.split()[-4:] == ["192.168.1.0/24", "yes", "100", "-"]
    out = await ok(server, "gateway", "egress", "remove", "g")
    assert out.strip() == "node office/g no longer forwards to 192.168.1.0/24"
    assert json.loads(await ok(server, "gateway", "list", "--json")) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("gateway", "egress", "add", "g", "--range", "10.10.0.0/25"), "overlaps network"),
        (("gateway", "egress", "add", "g", "--range", "192.168.1.9/24"), "host bits"),
        (("gateway", "egress", "add", "g", "--range", "nonsense"), "invalid range"),
        (("gateway", "egress", "add", "nobody", "--range", "192.168.1.0/24"), "nobody"),
        (("gateway", "egress", "remove", "a"), "not an egress gateway"),
        (("node", "exit", "a", "--via", "g"), "not an internet gateway"),
        (("node", "exit", "a"), "--via GATEWAY or --off"),
    ],
)
async def test_gateway_refusals_are_one_line(
    server: str, args: tuple[str, ...], needle: str
) -> None:
    await office(server, ("a", ()), ("g", ()))
    before = await last_seq(server)
    rc, out, err = await netmesh(server, *args)
    assert out == ""
    one_line_error(rc, err, needle)
    assert await last_seq(server) == before
