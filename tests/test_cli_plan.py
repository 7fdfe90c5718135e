"""`--plan` from the command line, against a real control plane (a real
nats-server): what a command would change is printed, host by host, and
nothing is written; a plan is refused as its command would be (one line,
exit 1); a plan's signature cannot be sent as the command's."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import msgspec
import nats

from events.commands import Reply
from events.signing import command_headers, load_or_create
from tests.test_cli import ADMIN_KEY, NETMESH, netmesh, netmesh_no_key, one_line_error
from tests.test_cli import server as server  # the fixture
from tests.test_cli_policy import last_seq, office, ok


async def test_a_planned_mtu_change_prints_each_host_and_writes_nothing(server: str) -> None:
    await office(server, ("web1", ()), ("db1", ()))
    before = await last_seq(server)
    out = await ok(server, "network", "update", "office", "--mtu", "1300", "--plan")
    lines = out.splitlines()
    assert lines[0] == "network.update would append 1 event(s):"
    assert lines[1].startswith("  network.updated on netmesh.ev.network.office ")
    assert lines[2] == "2 host(s) would change:"
    assert [line.split(" (")[0] for line in lines[3::2]] == ["db1", "web1"]
    assert lines[4::2] == ["  ~ interface wireguard: mtu 1420 -> 1300"] * 2
    plan = json.loads(
        await ok(server, "network", "update", "office", "--mtu", "1300", "--plan", "--json")
    )
    assert [e["type"] for e in plan["events"]] == ["network.updated"]
    assert plan["seq"] == before
    change = plan["hosts"][0]["sections"]["interface"]["changed"]["wireguard"]
    assert (change[0]["mtu"], change[1]["mtu"]) == (1420, 1300)
    out = await ok(server, "node", "remove", "office/db1", "--plan")
    assert "- peers " in out and "- addresses 10.10.0.2/24" in out
    out = await ok(server, "network", "update", "office", "--mtu", "1420", "--plan")
    assert out.strip() == "network.update would change nothing: no event"
    assert await last_seq(server) == before  # planned, not applied
    # The command itself, sent after its plan, is taken afresh.
    out = await ok(server, "network", "update", "office", "--mtu", "1300")
    assert out.startswith("updated network office: mtu 1300")
    assert await last_seq(server) == before + 1


async def test_a_refused_plan_is_one_line_and_writes_nothing(server: str, tmp_path: Path) -> None:
    await office(server, ("web1", ()))
    before = await last_seq(server)
    rc, out, err = await netmesh(server, "network", "update", "ghost", "--mtu", "1300", "--plan")
    one_line_error(rc, err, "no network named 'ghost'")
    assert (rc, out) == (1, "")
    rc, out, err = await netmesh_no_key(server, "network", "delete", "office", "--plan")
    one_line_error(rc, err, "admin")
    # An auditor may not change anything, so may not plan it either.
    key_path = tmp_path / "auditor.key"
    public = (await ok(server, "admin", "keygen", str(key_path))).split()[-1]
    await ok(server, "admin", "add", "aud", "--key", public, "--role", "auditor")
    before = await last_seq(server)
    proc = await asyncio.create_subprocess_exec(
        NETMESH,
        "--server",
        server,
        "--admin-key",
        str(key_path),
        "network",
        "delete",
        "office",
        "--force",
        "--plan",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err_b = await asyncio.wait_for(proc.communicate(), 60)
    one_line_error(proc.returncode or 0, err_b.decode(), "read-only")
    assert await last_seq(server) == before


async def test_a_plans_signature_does_not_apply_the_command(server: str, tmp_path: Path) -> None:
    await office(server, ("web1", ()))
    before = await last_seq(server)
    admin = load_or_create(Path(ADMIN_KEY[server]))
    payload = msgspec.json.encode(
        {"name": "office", "mtu": 1300, "command_id": uuid.uuid4().hex, "signed_at": time.time()}
    )
    headers = command_headers(admin, "network.update", payload, plan=True)
    nc = await nats.connect(server)
    try:
        planned = await nc.request(
            "netmesh.query.plan.network.update", payload, headers=headers, timeout=10
        )
        assert msgspec.json.decode(planned.data, type=Reply).ok
        sent = await nc.request("netmesh.cmd.network.update", payload, headers=headers, timeout=10)
        reply = msgspec.json.decode(sent.data, type=Reply)
        assert (reply.ok, reply.code) == (False, "unauthorized"), reply
        assert await last_seq(server) == before
        # Its id is not remembered: the command under the same id is applied.
        headers = command_headers(admin, "network.update", payload)
        sent = await nc.request("netmesh.cmd.network.update", payload, headers=headers, timeout=10)
        reply = msgspec.json.decode(sent.data, type=Reply)
        assert reply.ok and not reply.repeated, reply
    finally:
        await nc.close()
    assert await last_seq(server) == before + 1
