"""Tags and access policy from the command line, against a real control plane
(a real nats-server): what each command prints, its no-ops, its one-line
refusals (exit 1, the event stream unchanged), and who may do what."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import nats
import pytest

from events.commands import Reply
from events.subjects import EVENTS_STREAM
from tests.factories import public_key
from tests.test_cli import netmesh, netmesh_no_key, one_line_error
from tests.test_cli import server as server  # the fixture
from tests.test_policy_commands import BAD_POLICIES, POLICY


async def last_seq(url: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(EVENTS_STREAM)
        return int(info.state.last_seq)
    finally:
        await nc.close()


async def join(url: str, token: str, n: int, name: str) -> None:
    """A host joins as an agent would (agents of this branch are refused at
    their first desired state, not at their join)."""
    nc = await nats.connect(url)
    try:
        fields = {"token": token, "public_key": public_key(n), "name": name}
        msg = await nc.request("netmesh.cmd.join", msgspec.json.encode(fields), timeout=10)
        reply = msgspec.json.decode(msg.data, type=Reply)
        assert reply.ok, reply.error
    finally:
        await nc.close()


async def ok(url: str, *args: str) -> str:
    rc, out, err = await netmesh(url, *args)
    assert rc == 0, err
    return out


async def office(url: str, *members: tuple[str, tuple[str, ...]]) -> None:
    await ok(url, "network", "create", "office", "--cidr", "10.10.0.0/24")
    for n, (name, tags) in enumerate(members, 1):
        flags = [arg for tag in tags for arg in ("--tag", tag)]
        token = await ok(url, "key", "create", "--network", "office", *flags)
        await join(url, token.strip(), n, name)


async def test_tags_on_keys_and_nodes(server: str) -> None:
    await office(server, ("web1", ("web", "edge")))
    out = await ok(server, "key", "list")
    assert out.splitlines()[0].split()[-1] == "TAGS" and "edge,web" in out
    (key,) = json.loads(await ok(server, "key", "list", "--json"))
    assert key["tags"] == ["edge", "web"]
    (node,) = json.loads(await ok(server, "node", "list", "--json"))
    assert node["tags"] == ["edge", "web"]  # from its key

    out = await ok(server, "node", "tag", "web1", "db", "web")
    assert out.strip() == "tagged node office/web1: db (tags now: db, edge, web)"
    before = await last_seq(server)
    out = await ok(server, "node", "tag", "office/web1", "db")
    assert out.strip() == "node office/web1 already carries db: nothing changed"
    out = await ok(server, "node", "untag", "web1", "nope")
    assert out.strip() == "node office/web1 does not carry nope: nothing changed"
    assert await last_seq(server) == before  # the no-ops wrote nothing
    result = json.loads(await ok(server, "node", "untag", "web1", "edge", "--json"))
    assert (result["changed"], result["tags"]) == (["edge"], ["db", "web"])

    out = await ok(server, "node", "list")
    header, row = out.splitlines()
    assert "TAGS" in header.split() and "db,web" in row.split()
    out = await ok(server, "node", "show", "web1")
    assert "tags       db, web" in out.splitlines()
    assert json.loads(await ok(server, "node", "show", "web1", "--json"))["tags"] == ["db", "web"]

    before = await last_seq(server)
    for args, needle in [
        (("node", "tag", "web1", "Bad"), "invalid tag 'Bad'"),
        (("node", "untag", "web1", "x" * 33), "tags are 1-32"),
        (("node", "tag", "ghost", "web"), "no node 'ghost'"),
        (("key", "create", "--network", "office", "--tag", "no_underscores"), "invalid tag"),
    ]:
        rc, out, err = await netmesh(server, *args)
        one_line_error(rc, err, needle)
        assert (rc, out) == (1, "")
    assert await last_seq(server) == before

    rc, out, err = await netmesh(server, "events", "verify", "--json")
    report = json.loads(out)
    # network, key, tag, untag (the no-ops signed nothing into the log)
    assert (rc, report["signed_commands"], report["problems"]) == (0, 4, []), err


async def test_a_policy_session(server: str, tmp_path: Path) -> None:
    await office(server, ("web1", ("web",)), ("db1", ("db",)), ("ops1", ("ops",)))
    out = await ok(server, "policy", "show", "office")
    assert out.strip() == "no policy: everyone reaches everyone"
    assert json.loads(await ok(server, "policy", "show", "office", "--json"))["policy"] is False
    path = tmp_path / "office.json5"
    path.write_text(POLICY)

    before = await last_seq(server)
    out = await ok(server, "policy", "set", "office", str(path), "--plan")
    assert out.splitlines() == [
        "db1:",
        "  - allow from 10.10.0.0/24: any",
        "  + allow from 10.10.0.1/32 (web1): 5432/tcp",
        "  + allow from 10.10.0.3/32 (ops1): any",
        "ops1:",
        "  - allow from 10.10.0.0/24: any",
        "web1:",
        "  - allow from 10.10.0.0/24: any",
        "  + allow from 10.10.0.2/32 (db1): icmp, 80/tcp, 443/tcp",
        "  + allow from 10.10.0.3/32 (ops1): any",
    ]
    plan = json.loads(await ok(server, "policy", "set", "office", str(path), "--plan", "--json"))
    assert [h["host"] for h in plan["hosts"]] == ["db1", "ops1", "web1"]
    assert plan["hosts"][0]["firewall"][1] == {
        "source": "10.10.0.1/32",
        "member": "web1",
        "change": "gained",
        "before": [],
        "after": ["5432/tcp"],
    }
    assert await last_seq(server) == before  # a plan writes nothing

    out = await ok(server, "policy", "set", "office", str(path))
    revision = await last_seq(server)
    assert out.strip() == f"set the policy of network office (revision {revision})"
    out = await ok(server, "policy", "show", "office")
    assert out == f"// policy of network office, revision {revision}\n{POLICY.rstrip()}\n"
    shown = json.loads(await ok(server, "policy", "show", "office", "--json"))
    assert (shown["document"], shown["revision"]) == (POLICY, revision)  # as written
    out = await ok(server, "policy", "set", "office", str(path))
    assert "has this policy already" in out and await last_seq(server) == revision

    out = await ok(server, "policy", "explain", "office", "web1", "db1", "--port", "5432/tcp")
    assert out.strip() == (
        "web1 -> db1 5432/tcp: allowed by rule 1: from tag:web to tag:db ports 5432/tcp"
    )
    out = await ok(server, "policy", "explain", "office", "web1", "db1", "--port", "22/tcp")
    assert out.strip() == "web1 -> db1 22/tcp: denied (no rule allows it)"
    out = await ok(server, "policy", "explain", "office", "ops1", "web1")
    assert out.splitlines() == [
        "ops1 -> web1: allowed any",
        "  rule 2: from tag:ops to *",
        "  rule 3: from * to tag:web ports 443/tcp,80/tcp,icmp",
    ]
    answer = json.loads(
        await ok(server, "policy", "explain", "office", "db1", "ops1", "--port", "icmp", "--json")
    )
    assert (answer["allowed"], answer["rules"]) == (False, [])
    rc, _, err = await netmesh(server, "policy", "explain", "office", "web1", "ghost")
    one_line_error(rc, err, "no node named 'ghost' in network 'office'")

    # Unknown tags and names: warned about, and set.
    path.write_text('{rules: [{from: ["tag:nobody"], to: ["db1"]}]}')
    rc, out, err = await netmesh(server, "policy", "set", "office", str(path))
    assert rc == 0 and out.startswith("set the policy of network office"), err
    assert err.splitlines() == ["warning: rule 1: no node has tag 'nobody' yet"]

    out = await ok(server, "policy", "clear", "office")
    assert out.strip() == "cleared the policy of network office: everyone reaches everyone"
    out = await ok(server, "policy", "clear", "office")
    assert out.strip() == "network office has no policy: nothing changed"
    assert (await ok(server, "policy", "show", "office")).strip().startswith("no policy")

    rc, out, err = await netmesh(server, "events", "verify", "--json")
    report = json.loads(out)
    # network, 3 keys, 2 policies set, 1 cleared
    assert (rc, report["signed_commands"], report["problems"]) == (0, 7, []), err
    rc, out, _ = await netmesh(server, "events", "log", "--json")
    types = [json.loads(line)["type"] for line in out.splitlines()]
    assert types.count("policy.set") == 2 and types.count("policy.cleared") == 1


@pytest.mark.parametrize("via", ["file", "stdin"])
async def test_every_bad_policy_is_one_line_and_writes_nothing(
    server: str, tmp_path: Path, via: str
) -> None:
    await office(server, ("web1", ("web",)), ("db1", ("db",)))
    before = await last_seq(server)
    for param in BAD_POLICIES:
        document, needle = param.values
        assert isinstance(document, str) and isinstance(needle, str)
        path = tmp_path / "bad.json5"
        path.write_text(document)
        for plan in ((), ("--plan",)):
            if via == "file":
                rc, out, err = await netmesh(server, "policy", "set", "office", str(path), *plan)
            else:
                rc, out, err = await netmesh_stdin(server, document, "office", *plan)
            assert rc == 1, (param.id, out, err)
            one_line_error(rc, err, needle)
            assert out == "", param.id
    assert await last_seq(server) == before


async def netmesh_stdin(server: str, document: str, *args: str) -> tuple[int, str, str]:
    import asyncio

    from tests.test_cli import ADMIN_KEY, NETMESH

    proc = await asyncio.create_subprocess_exec(
        NETMESH,
        "--server",
        server,
        "--admin-key",
        ADMIN_KEY[server],
        "policy",
        "set",
        args[0],
        "-",
        *args[1:],
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(document.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_who_may_set_and_who_may_only_read(server: str, tmp_path: Path) -> None:
    await office(server, ("web1", ("web",)), ("db1", ("db",)))
    await ok(server, "network", "create", "lab", "--cidr", "10.20.0.0/24")
    keys = {}
    for who in ("olga", "larry", "aldo"):
        keys[who] = (await ok(server, "admin", "keygen", str(tmp_path / f"{who}.key"))).strip()
    await ok(
        server, "admin", "add", "olga", "--key", keys["olga"], "--role", "network-admin",
        "--network", "office",
    )  # fmt: skip
    await ok(
        server, "admin", "add", "larry", "--key", keys["larry"], "--role", "network-admin",
        "--network", "lab",
    )  # fmt: skip
    await ok(server, "admin", "add", "aldo", "--key", keys["aldo"], "--role", "auditor")
    path = tmp_path / "p.json5"
    path.write_text(POLICY)

    async def as_(who: str, *args: str) -> tuple[int, str, str]:
        return await netmesh_no_key(server, "--admin-key", str(tmp_path / f"{who}.key"), *args)

    before = await last_seq(server)
    rc, _, err = await as_("aldo", "policy", "set", "office", str(path))
    one_line_error(rc, err, "aldo is an auditor: read-only")
    rc, _, err = await as_("aldo", "node", "tag", "web1", "prod")
    one_line_error(rc, err, "aldo is an auditor: read-only")
    rc, _, err = await as_("larry", "policy", "set", "office", str(path))
    one_line_error(rc, err, "larry administers lab, not 'office'")
    rc, _, err = await as_("larry", "node", "tag", "office/web1", "prod")
    one_line_error(rc, err, "larry administers lab, not 'office'")
    assert await last_seq(server) == before
    # The auditor reads: a plan, the policy, an explanation.
    rc, out, err = await as_("aldo", "policy", "set", "office", str(path), "--plan")
    assert rc == 0 and out.startswith("db1:"), err
    rc, out, err = await as_("olga", "policy", "set", "office", str(path))
    assert rc == 0 and out.startswith("set the policy of network office"), err
    rc, out, err = await as_("olga", "node", "tag", "web1", "prod")
    assert rc == 0, err
    rc, out, err = await as_("aldo", "policy", "show", "office")
    assert rc == 0 and "tag:web" in out, err
    rc, out, err = await as_("aldo", "policy", "explain", "office", "web1", "db1")
    assert rc == 0 and out.startswith("web1 -> db1: allowed 5432/tcp"), err
    rc, out, err = await as_("olga", "policy", "clear", "office")
    assert rc == 0, err
    rc, out, err = await netmesh(server, "events", "verify", "--json")
    assert (rc, json.loads(out)["problems"]) == (0, []), err
