"""Relays from the command line, against a real control plane (a real
nats-server): what `relay add/list/remove` print, `--json`, `--plan`, and
their one-line refusals (exit 1, the event stream unchanged)."""

from __future__ import annotations

import json

import msgspec
import nats
import pytest

from events.commands import Reply
from tests.factories import public_key
from tests.test_cli import netmesh, one_line_error
from tests.test_cli import server as server  # the fixture
from tests.test_cli_policy import last_seq, ok


async def lab(url: str) -> None:
    """office: rl and p announce public addresses, nat announces none."""
    await ok(url, "network", "create", "office", "--cidr", "10.10.0.0/24")
    token = (await ok(url, "key", "create", "--network", "office", "--unlimited")).strip()
    nc = await nats.connect(url)
    try:
        for n, (name, endpoints) in enumerate(
            [("rl", ["203.0.113.1"]), ("p", ["203.0.113.2"]), ("nat", [])], 1
        ):
            fields = {"token": token, "public_key": public_key(n), "name": name}
            fields["endpoints"] = endpoints  # type: ignore[assignment]
            msg = await nc.request("netmesh.cmd.join", msgspec.json.encode(fields), timeout=10)
            reply = msgspec.json.decode(msg.data, type=Reply)
            assert reply.ok, reply.error
    finally:
        await nc.close()


async def test_relay_add_list_remove(server: str) -> None:
    await lab(server)
    before = await last_seq(server)
    plan = json.loads(await ok(server, "relay", "add", "rl", "--plan", "--json"))
    assert [e["type"] for e in plan["events"]] == ["relay.added"]
    assert await last_seq(server) == before, "a plan writes nothing"
    out = await ok(server, "relay", "add", "rl", "--ports", "53000-53099")
    assert out.strip() == "node office/rl is now a relay (ports 53000-53099)"
    out = await ok(server, "relay", "add", "office/rl")
    assert out.strip() == "node office/rl is already a relay (ports 53000-53099)"
    (row,) = json.loads(await ok(server, "relay", "list", "--json"))
    assert (row["name"], row["endpoint"], row["ports"], row["pairs"]) == (
        "rl",
        "203.0.113.1:51820",
        "53000-53099",
        [],
    )
    header, line = (await ok(server, "relay", "list")).splitlines()
    assert header.split() == ["NETWORK", "NODE", "ENDPOINT", "PORTS", "PAIRS"]
    assert line.split() == ["office", "rl", "203.0.113.1:51820", "53000-53099", "-"]
    removed = json.loads(await ok(server, "relay", "remove", "rl", "--json"))
    assert removed["pairs_closed"] == 0
    assert json.loads(await ok(server, "relay", "list", "--json")) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("relay", "add", "nat"), "announces no endpoint"),
        (("relay", "add", "nobody"), "nobody"),
        (("relay", "add", "rl", "--ports", "51000-52000"), "WireGuard port"),
        (("relay", "add", "rl", "--ports", "9-x"), "invalid ports"),
        (("relay", "add", "rl", "--network", "lab"), "no network"),
        (("relay", "remove", "p"), "not a relay"),
    ],
)
async def test_relay_refusals_are_one_line(server: str, args: tuple[str, ...], needle: str) -> None:
    await lab(server)
    before = await last_seq(server)
    rc, out, err = await netmesh(server, *args)
    assert out == ""
    one_line_error(rc, err, needle)
    assert await last_seq(server) == before
