"""The CLI as a user runs it (a subprocess) against a real control plane:
answers on stdout, refusals as one line on stderr with a non-zero exit."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from controlplane.embedded import EmbeddedNats, free_port
from controlplane.service import ControlPlane
from events.tokens import make_token

NETMESH = str(Path(sys.executable).parent / "netmesh")


ADMIN_KEY: dict[str, str] = {}  # server URL -> its admin key file


async def netmesh(server: str | None, *args: str) -> tuple[int, str, str]:
    """Run the CLI; with server=None, no --server (the token says where)."""
    key = ADMIN_KEY.get(server or "")
    proc = await asyncio.create_subprocess_exec(
        NETMESH,
        *(["--server", server] if server else []),
        *(["--admin-key", key] if key else []),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def server(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[str]:
    nc = await nats.connect(nats_server.url)
    plane = ControlPlane(nc, tmp_path / "cp", nats_server.url)
    await plane.start()
    ADMIN_KEY[nats_server.url] = str(tmp_path / "cp" / "admin.key")
    try:
        yield nats_server.url
    finally:
        await plane.stop()
        await nc.close()


def one_line_error(rc: int, err: str, needle: str) -> None:
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ")
    assert needle in lines[0], lines[0]


async def test_admin_session(server: str) -> None:
    rc, out, _ = await netmesh(server, "network", "create", "office", "--cidr", "10.10.0.0/24")
    assert (rc, out.strip()) == (0, "created network office (10.10.0.0/24)")
    rc, out, _ = await netmesh(server, "key", "create", "--network", "office", "--uses", "2")
    assert rc == 0 and out.startswith("nmt1.") and len(out.strip().splitlines()) == 1
    rc, out, _ = await netmesh(server, "network", "list", "--json")
    assert json.loads(out)[0]["cidr"] == "10.10.0.0/24"
    rc, out, _ = await netmesh(server, "key", "list", "--json")
    (key,) = json.loads(out)
    assert (key["state"], key["uses"], key["used"]) == ("active", 2, 0)
    assert "secret" not in json.dumps(key)
    rc, out, _ = await netmesh(server, "key", "revoke", key["key_id"])
    assert rc == 0
    rc, out, _ = await netmesh(server, "network", "show", "office", "--json")
    assert json.loads(out)["keys"][0]["state"] == "revoked"
    rc, out, _ = await netmesh(server, "node", "list", "--json")
    assert (rc, json.loads(out)) == (0, [])
    rc, out, _ = await netmesh(server, "status", "--json")
    assert (rc, json.loads(out)) == (0, [])
    rc, out, _ = await netmesh(server, "events", "log", "--json")
    types = [json.loads(line)["type"] for line in out.splitlines()]
    assert types == [
        "admin.added",  # the first admin, made by the server on its first start
        "network.created",
        "enrollment_key.created",
        "enrollment_key.revoked",
    ]
    rc, out, _ = await netmesh(server, "network", "delete", "office")
    assert rc == 0
    # The log is evidence: every admin change carries its signature.
    rc, out, err = await netmesh(server, "events", "verify", "--json")
    report = json.loads(out)
    assert (rc, report["signed_commands"], report["problems"]) == (0, 4, []), err


async def test_admin_commands_need_the_admin_key(server: str, tmp_path: Path) -> None:
    from nacl.signing import SigningKey

    from events.signing import public_text

    rc, _, err = await netmesh_no_key(server, "network", "create", "x", "--cidr", "10.9.0.0/24")
    one_line_error(rc, err, "admin commands are signed")
    stranger = tmp_path / "stranger.key"
    stranger.write_text(public_text(SigningKey.generate()))  # not even a private key file
    rc, _, err = await netmesh_no_key(
        server, "--admin-key", str(stranger), "network", "create", "x", "--cidr", "10.9.0.0/24"
    )
    assert rc != 0
    other = tmp_path / "other.key"
    from events.signing import load_or_create

    load_or_create(other)
    rc, _, err = await netmesh_no_key(
        server, "--admin-key", str(other), "network", "create", "x", "--cidr", "10.9.0.0/24"
    )
    one_line_error(rc, err, "not an admin")
    rc, out, _ = await netmesh(server, "network", "list", "--json")
    assert json.loads(out) == []  # nothing was created


async def netmesh_no_key(server: str, *args: str) -> tuple[int, str, str]:
    """The CLI without the test's admin key (run from a directory without one)."""
    proc = await asyncio.create_subprocess_exec(
        NETMESH,
        "--server",
        server,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        cwd="/",
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("network", "create", "x", "--cidr", "10.0.0.0/33"), "invalid CIDR"),
        (("network", "create", "x", "--cidr", "10.0.0.5/24"), "host bits set"),
        (("network", "create", "office", "--cidr", "10.20.0.0/24"), "already exists"),
        (("network", "create", "lab", "--cidr", "10.10.0.0/16"), "overlaps network 'office'"),
        (("network", "show", "nope"), "no network named 'nope'"),
        (("key", "create", "--network", "nope"), "no network named 'nope'"),
        (("key", "create", "--network", "office", "--expires", "soon"), "use e.g. 30m"),
        (("node", "remove", "ghost"), "no node 'ghost'"),
    ],
)
async def test_refusals_are_one_line(server: str, args: tuple[str, ...], needle: str) -> None:
    await netmesh(server, "network", "create", "office", "--cidr", "10.10.0.0/24")
    rc, out, err = await netmesh(server, *args)
    one_line_error(rc, err, needle)
    assert out == ""


async def test_no_server_is_a_clear_error() -> None:
    rc, _, err = await netmesh(f"nats://127.0.0.1:{free_port()}", "network", "list")
    one_line_error(rc, err, "cannot connect to nats://127.0.0.1:")


async def test_agent_refuses_bad_tokens_before_touching_anything(
    server: str, tmp_path: Path
) -> None:
    await netmesh(server, "network", "create", "office", "--cidr", "10.10.0.0/24")
    _, token, _ = await netmesh(server, "key", "create", "--network", "office")
    keys = json.loads((await netmesh(server, "key", "list", "--json"))[1])
    await netmesh(server, "key", "revoke", keys[0]["key_id"])
    state = tmp_path / "agent"
    base = ("agent", "up", "--state-dir", str(state), "--endpoint", "192.0.2.1", "--name", "a")
    rc, _, err = await netmesh(server, *base, "--token", "nmt1.garbage")
    one_line_error(rc, err, "enrollment token is damaged")
    rc, _, err = await netmesh(server, *base, "--token", token.strip())
    one_line_error(rc, err, "join refused: enrollment key")
    rc, _, err = await netmesh(server, *base)
    one_line_error(rc, err, "not enrolled yet")
    dead = make_token(f"nats://127.0.0.1:{free_port()}", "k1", "secret")
    rc, _, err = await netmesh(None, *base, "--token", dead)
    one_line_error(rc, err, "cannot reach the control plane at nats://127.0.0.1:")
    # The key was made, and is the agent's own: 0600 in a 0700 directory.
    assert (state / "private.key").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    events = (await netmesh(server, "events", "log", "--json"))[1]
    assert "join" not in events and "node.joined" not in events


async def test_admin_roles(server: str, tmp_path: Path) -> None:
    """An admin adds a network admin and an auditor: the network admin manages
    only their network, the auditor changes nothing, a removed admin nothing,
    and the log verifies throughout."""
    await netmesh(server, "network", "create", "office", "--cidr", "10.10.0.0/24")
    await netmesh(server, "network", "create", "lab", "--cidr", "10.20.0.0/24")
    keys = {}
    for who in ("olga", "aldo"):
        rc, out, err = await netmesh(server, "admin", "keygen", str(tmp_path / f"{who}.key"))
        assert rc == 0, err
        keys[who] = out.strip()
    rc, out, err = await netmesh(
        server, "admin", "add", "olga", "--key", keys["olga"], "--role", "network-admin",
        "--network", "office",
    )  # fmt: skip
    assert (rc, out.strip()) == (0, "added network-admin olga of office"), err
    rc, _, err = await netmesh(
        server, "admin", "add", "aldo", "--key", keys["aldo"], "--role", "auditor"
    )
    assert rc == 0, err
    rc, out, _ = await netmesh(server, "admin", "list", "--json")
    assert [(a["name"], a["role"]) for a in json.loads(out)] == [
        ("admin", "admin"),
        ("aldo", "auditor"),
        ("olga", "network-admin"),
    ]

    async def as_(who: str, *args: str) -> tuple[int, str, str]:
        return await netmesh_no_key(server, "--admin-key", str(tmp_path / f"{who}.key"), *args)

    rc, out, err = await as_("olga", "key", "create", "--network", "office")
    assert rc == 0 and out.startswith("nmt1."), err
    rc, _, err = await as_("olga", "key", "create", "--network", "lab")
    one_line_error(rc, err, "olga administers office, not 'lab'")
    rc, _, err = await as_("olga", "admin", "add", "eve", "--key", keys["aldo"])
    one_line_error(rc, err, "only an admin may do that")
    rc, _, err = await as_("aldo", "network", "delete", "lab")
    one_line_error(rc, err, "aldo is an auditor: read-only")
    rc, _, err = await netmesh(server, "admin", "remove", "admin")
    one_line_error(rc, err, "last admin")
    rc, _, err = await netmesh(server, "admin", "remove", "olga")
    assert rc == 0, err
    rc, _, err = await as_("olga", "key", "create", "--network", "office")
    one_line_error(rc, err, "not an admin's")
    rc, out, err = await netmesh(server, "events", "verify", "--json")
    report = json.loads(out)
    # network x2, admin.add x2, olga's key, admin.remove
    assert (rc, report["signed_commands"], report["problems"]) == (0, 6, []), err


def test_a_malformed_command_fails_before_it_is_sent() -> None:
    """The CLI checks a command against its spec: a misspelt field, a wrong
    type or an agent's verb never reaches the server."""
    from cli.client import CliError, checked_command

    with pytest.raises(CliError, match="unknown field `nmae`"):
        checked_command("network.create", {"nmae": "x", "cidr": "10.9.0.0/24"})
    with pytest.raises(CliError, match=r"invalid network\.create command: Expected `int` >= 576"):
        checked_command("network.create", {"name": "x", "cidr": "10.9.0.0/24", "mtu": 100})
    with pytest.raises(CliError, match=r"unknown command 'network\.frobnicate'"):
        checked_command("network.frobnicate", {})
    with pytest.raises(CliError, match="join is sent by agents"):
        checked_command("join", {"token": "t", "public_key": "k", "name": "n"})
    # What is sent is what was given: no defaults filled in.
    assert json.loads(checked_command("network.delete", {"name": "x"})) == {"name": "x"}
