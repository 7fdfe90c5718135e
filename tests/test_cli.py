"""The CLI as a user runs it (a subprocess) against a real control plane:
answers on stdout, refusals as one line on stderr with a non-zero exit."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from controlplane.brokerauth import BrokerKeys
from controlplane.embedded import EmbeddedNats, free_port
from controlplane.service import ControlPlane
from events import natsid
from events.commands import Reply
from events.connect import _abort as abort
from events.connect import connect_once
from events.signing import load_or_create
from events.subjects import EVENTS_STREAM
from events.tokens import make_token, parse_token
from tests.netns import wait_until

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
    assert (rc, out.strip()) == (
        0,
        "created network office (10.10.0.0/24, names *.office.internal)",
    )
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


async def test_a_command_whose_control_plane_dies_fails_fast_and_is_retried(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control plane applies a key.create and dies before answering (its
    connection cut; the broker lives on). The CLI notices nobody answers any
    more (not at its 15 s timeout), sends the command again with the same id
    once a control plane is back, and learns it had been applied: with the
    token, which works, and one key made."""
    data = tmp_path / "cp"
    ADMIN_KEY[nats_server.url] = str(data / "admin.key")
    nc = await connect_once(nats_server.url)  # no reconnecting: cut means dead
    plane = ControlPlane(nc, data, nats_server.url)
    await plane.start()
    url = nats_server.url
    await netmesh(url, "network", "create", "office", "--cidr", "10.10.0.0/24")
    lost: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

    async def answer_nothing(msg: Msg, reply: Reply) -> None:
        if not lost.done():
            lost.set_result(reply)

    monkeypatch.setattr(plane.commands._responder, "answer", answer_nothing)
    cli = await started(url, "key", "create", "--network", "office")
    original = await asyncio.wait_for(lost, 30)
    assert original.ok and original.seq is not None
    abort(nc)  # as a kill -9 leaves it: the socket closes, nothing more is said
    died = time.monotonic()
    assert cli.stderr is not None
    line = (await asyncio.wait_for(cli.stderr.readline(), 10)).decode()
    noticed = time.monotonic() - died
    assert "the control plane went away before answering" in line, line
    assert noticed < 5, noticed  # it was the 15 s timeout
    await plane.stop()

    nc = await nats.connect(url)
    plane = ControlPlane(nc, data, url)
    await plane.start()
    try:
        out, err = await asyncio.wait_for(cli.communicate(), 60)
        assert cli.returncode == 0, err
        assert out.decode().strip() == original.result["token"]
        assert f"retried with the same id: it had been applied (event #{original.seq})" in (
            err.decode()
        )
        _, keys, _ = await netmesh(url, "key", "list", "--json")
        assert len(json.loads(keys)) == 1
    finally:
        await plane.stop()
        await nc.close()


async def started(server: str, *args: str) -> asyncio.subprocess.Process:
    """The CLI, running (its output read by the test as it comes)."""
    key = ADMIN_KEY.get(server, "")
    return await asyncio.create_subprocess_exec(
        NETMESH,
        "--server",
        server,
        *(["--admin-key", key] if key else []),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )


class ServerProcess:
    """`netmesh server` as a user runs it (a process, with its embedded broker
    as its child), started and killed by the ids this test gave them."""

    def __init__(self, data: Path, port: int) -> None:
        self.data = data
        self.port = port
        self.url = f"nats://127.0.0.1:{port}"
        self.log = data.parent / "server.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.broker_pid = 0

    async def start(self) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                NETMESH, "server", "--data-dir", str(self.data),
                "--listen", f"127.0.0.1:{self.port}", "--log-format", "json",
                stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip

        def ready() -> bool:
            assert self.proc is not None and self.proc.returncode is None, self.log.read_text()
            lines = [json.loads(line) for line in self.log.read_bytes()[offset:].splitlines()]
            for line in lines:
                if line.get("event") == "embedded nats-server started":
                    self.broker_pid = int(line["pid"])
            return any(line.get("event") == "control plane ready" for line in lines)

        await wait_until(ready, timeout=60, message="netmesh server ready")
        ADMIN_KEY[self.url] = str(self.data / "admin.key")

    async def kill(self) -> None:
        """kill -9, the control plane and its broker (which would outlive it)."""
        assert self.proc is not None
        for pid in (self.proc.pid, self.broker_pid):
            os.kill(pid, signal.SIGKILL)
        await self.proc.wait()
        await wait_until(lambda: not Path(f"/proc/{self.broker_pid}").exists(), message="gone")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 30)


async def test_a_command_in_flight_when_the_server_is_killed_is_retried_after_its_restart(
    tmp_path: Path,
) -> None:
    """kill -9 of `netmesh server` and its broker while a command waits for
    its answer (applied; the answer waits for the read model, which the test
    holds locked): the CLI says so at once, sends it again with the same id
    while the server restarts (its broker up before its control plane admits
    anyone), and learns it had been applied."""
    server = ServerProcess(tmp_path / "data", free_port())
    await server.start()
    try:
        made = await netmesh(server.url, "network", "create", "office", "--cidr", "10.1.0.0/24")
        assert made[0] == 0, made
        keys = BrokerKeys.derive(load_or_create(server.data / "signing.key"))
        nc = await nats.connect(server.url, **natsid.client_options(keys.controlplane))
        js = nc.jetstream()
        before = (await js.stream_info(EVENTS_STREAM)).state.last_seq
        readmodel = sqlite3.connect(server.data / "readmodel.sqlite3", isolation_level=None)
        readmodel.execute("BEGIN IMMEDIATE")  # the answer waits for the read model
        cli = await started(server.url, "key", "create", "--network", "office")

        async def appended() -> bool:
            return (await js.stream_info(EVENTS_STREAM)).state.last_seq > before

        await wait_until(appended, timeout=10, message="the key appended")
        await nc.close()
        await server.kill()
        died = time.monotonic()
        readmodel.execute("ROLLBACK")
        readmodel.close()
        assert cli.stderr is not None
        line = (await asyncio.wait_for(cli.stderr.readline(), 10)).decode()
        assert "the control plane went away before answering" in line, line
        assert time.monotonic() - died < 5  # it was the 15 s timeout

        await server.start()
        out, err = await asyncio.wait_for(cli.communicate(), 60)
        assert cli.returncode == 0, err
        assert f"retried with the same id: it had been applied (event #{before + 1})" in (
            err.decode()
        )
        _, listed, _ = await netmesh(server.url, "key", "list", "--json")
        (key,) = json.loads(listed)
        assert key["key_id"] == parse_token(out.decode()).key_id
    finally:
        await server.stop()
