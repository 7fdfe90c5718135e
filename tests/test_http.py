"""The read API (`netmesh server --http`) on a real control plane and a real
nats-server: bearer tokens made, revoked and expired with the CLI; answers
that match the CLI's and validate against the served OpenAPI document; the
live event stream; a token's use in the audit log, bounded."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import nats
import pytest
from openapi_spec_validator import validate as validate_openapi
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from controlplane.embedded import EmbeddedNats, free_port
from events.signing import load_or_create, open_sealed
from tests.netns import wait_until
from tests.readapi import Served, served
from tests.test_cli import ADMIN_KEY, netmesh, one_line_error
from tests.test_cli_policy import join
from tests.test_controlplane import send_raw, signed_request

POLICY = '{rules: [{from: ["tag:web"], to: ["*"], ports: ["443/tcp"]}]}  // web may open 443\n'


@pytest.fixture
async def api(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Served]:
    async with served(nats_server, tmp_path / "cp") as running:
        yield running


async def get(url: str, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, await response.json()


async def office(api: Served, tmp_path: Path) -> None:
    """Network office with web1 (tagged web) and db1, a policy; network lab with lab1."""
    await api.cli("network", "create", "office", "--cidr", "10.10.0.0/24")
    await api.cli("network", "create", "lab", "--cidr", "10.20.0.0/24")
    for n, (network, name, tags) in enumerate(
        [("office", "web1", ("web",)), ("office", "db1", ()), ("lab", "lab1", ())], 1
    ):
        flags = [arg for tag in tags for arg in ("--tag", tag)]
        token = await api.cli("key", "create", "--network", network, *flags)
        await join(api.nats_url, token.strip(), n, name)
    (tmp_path / "policy.json5").write_text(POLICY)
    await api.cli("policy", "set", "office", str(tmp_path / "policy.json5"))


def validator(document: dict[str, Any], path: str) -> jsonschema.Draft202012Validator:
    """The schema of a path's 200 answer, its $refs into the document's components."""
    schema = document["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
    return jsonschema.Draft202012Validator(
        {**schema["schema"], "components": document["components"]}
    )


async def test_answers_match_the_cli_and_validate_against_the_openapi_document(
    api: Served, tmp_path: Path
) -> None:
    await office(api, tmp_path)
    token = await api.token("ci", "--role", "auditor", "--expires", "30d")
    status, document = await get(f"{api.url}/api/openapi.json", None)  # public: no token
    assert status == 200 and document["openapi"] == "3.1.0"
    validate_openapi(document)  # against the OpenAPI 3.1 specification's own schema
    broken_document = {**document, "paths": {"/api/nodes": {"get": {"responses": 7}}}}
    with pytest.raises(OpenAPIValidationError):
        validate_openapi(broken_document)
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    paths = [p for p in document["paths"] if p != "/api/events/stream"]
    assert set(paths) == {
        "/api/whoami",
        "/api/networks",
        "/api/nodes",
        "/api/status",
        "/api/policies",
        "/api/events",
    }
    answers = {}
    for path in paths:
        status, answers[path] = await get(f"{api.url}{path}", token)
        assert status == 200, answers[path]
        validator(document, path).validate(answers[path])
        assert answers[path], path  # something real was validated
    # A wrong answer fails the validation (the check is not vacuous).
    broken = [{**answers["/api/nodes"][0], "address": 7}]
    with pytest.raises(jsonschema.ValidationError):
        validator(document, "/api/nodes").validate(broken)

    # The same as the CLI's answers.
    assert answers["/api/nodes"] == json.loads(await api.cli("node", "list", "--json"))
    assert answers["/api/networks"] == json.loads(await api.cli("network", "list", "--json"))
    assert answers["/api/whoami"] == {
        "name": "ci",
        "role": "auditor",
        "networks": [],
        "expires_at": pytest.approx(answers["/api/whoami"]["expires_at"]),
    }
    policies = {p["network"]: p for p in answers["/api/policies"]}
    assert policies["office"]["document"] == POLICY and policies["lab"]["policy"] is False
    cli_status = json.loads(await api.cli("status", "--json"))
    assert [(s["id"], s["state"]) for s in answers["/api/status"]] == [
        (s["id"], s["state"]) for s in cli_status
    ]
    assert all(s["online"] is False for s in answers["/api/status"])  # no agent runs here

    # Events: all, oldest first; after `since`, only the later ones.
    seqs = [e["seq"] for e in answers["/api/events"]]
    assert seqs == sorted(seqs) and seqs[0] == 1
    types = [e["type"] for e in answers["/api/events"]]
    assert "node.joined" in types and "admin_token.created" in types
    _, later = await get(f"{api.url}/api/events?since={seqs[-3]}", token)
    assert [e["seq"] for e in later] == [s for s in seqs if s > seqs[-3]] + [
        e["seq"] for e in later if e["seq"] > seqs[-1]
    ]
    status, refused = await get(f"{api.url}/api/events?since=-1", token)
    assert status == 400 and "since must be a whole number" in refused["error"]


async def test_a_network_admin_token_sees_only_its_networks(api: Served, tmp_path: Path) -> None:
    await office(api, tmp_path)
    token = await api.token("lab-ro", "--role", "network-admin", "--network", "lab")
    _, nodes = await get(f"{api.url}/api/nodes", token)
    assert [n["name"] for n in nodes] == ["lab1"]
    _, networks = await get(f"{api.url}/api/networks", token)
    assert [n["name"] for n in networks] == ["lab"]
    _, events = await get(f"{api.url}/api/events", token)
    assert events and {e["data"].get("network") for e in events} == {"lab"}


async def test_missing_wrong_revoked_and_expired_tokens_get_401(api: Served) -> None:
    token = await api.token("ci")
    short = await api.token("short", "--expires", "2s")
    assert (await get(f"{api.url}/api/nodes", token))[0] == 200
    assert (await get(f"{api.url}/api/nodes", short))[0] == 200
    revoked_by = (await api.cli("admin", "token", "revoke", "ci")).strip()
    assert revoked_by == "revoked token ci"

    async def refusal(given: str | None) -> str:
        status, body = await get(f"{api.url}/api/nodes", given)
        assert status == 401 and body["code"] == "unauthorized", body
        assert "\n" not in body["error"]
        return str(body["error"])

    assert "bearer token is needed" in await refusal(None)
    assert "not recognised" in await refusal("nma1.not-a-token-we-made")
    assert "'ci' has been revoked" in await refusal(token)
    expired = await wait_until(
        lambda: _status_is(f"{api.url}/api/nodes", short, 401), timeout=10, message="expiry"
    )
    assert "'short' has expired" in expired["error"]
    listed = {t["name"]: t for t in json.loads(await api.cli("admin", "token", "list", "--json"))}
    assert (listed["ci"]["state"], listed["short"]["state"]) == ("revoked", "expired")


async def _status_is(url: str, token: str, wanted: int) -> Any:
    status, body = await get(url, token)
    return body if status == wanted else None


async def test_a_tokens_use_is_recorded_once_not_per_request(api: Served) -> None:
    token = await api.token("grafana")

    async def uses() -> list[dict[str, Any]]:
        _, events = await get(f"{api.url}/api/events", token)
        return [e for e in events if e["type"] == "admin_token.used"]

    (first,) = await wait_until(uses, message="the token's first use recorded")
    assert first["data"] == {"name": "grafana", "remote": "127.0.0.1"}
    assert first["actor"] == "token:grafana"
    for _ in range(5):
        assert (await get(f"{api.url}/api/status", token))[0] == 200
    # An event after those requests: once it is in the log, any record they
    # had made would be too (a record is scheduled while the request is answered).
    await api.cli("network", "create", "after", "--cidr", "10.99.0.0/24")
    _, events = await get(f"{api.url}/api/events", token)
    assert events[-1]["type"] == "network.created"
    assert [e["type"] for e in events].count("admin_token.used") == 1
    listed = json.loads(await api.cli("admin", "token", "list", "--json"))
    assert listed[0]["last_used_at"] == pytest.approx(first["time"])
    rc, out, err = await netmesh(api.nats_url, "events", "verify")
    assert rc == 0, out + err


async def test_the_event_stream_is_live(api: Served) -> None:
    token = await api.token("ci")
    _, events = await get(f"{api.url}/api/events", token)
    head = events[-1]["seq"]
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{api.url}/api/events/stream?since={head}", headers=headers) as response,
    ):
        assert response.headers["Content-Type"] == "text/event-stream"
        creating = asyncio.create_task(
            api.cli("network", "create", "live", "--cidr", "10.50.0.0/24")
        )
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(20):
            async for line in response.content:
                if line.startswith(b"data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["type"] == "network.created":
                        break
        await creating
    assert all(e["seq"] > head for e in seen)
    assert seen[-1]["data"]["network"] == "live"


async def test_the_stream_needs_a_token_too(api: Served) -> None:
    status, body = await get(f"{api.url}/api/events/stream", "nma1.wrong")
    assert status == 401 and body == {
        "error": "the token is not recognised",
        "code": "unauthorized",
    }


@pytest.mark.parametrize(
    ("args", "needle", "exit_code"),
    [
        (("admin", "token", "create", "Bad!"), "invalid token name 'Bad!'", 1),
        (("admin", "token", "create", "x", "--role", "network-admin"), "needs --network", 1),
        (("admin", "token", "revoke", "nobody"), "no token 'nobody'", 1),
        # Malformed options are usage errors: exit 2, as everywhere in the CLI.
        (("admin", "token", "create", "x", "--role", "root"), "'root' is not one of", 2),
        (("admin", "token", "create", "x", "--expires", "soon"), "use e.g. 30m", 2),
    ],
)
async def test_bad_token_commands_are_one_line(
    api: Served, args: tuple[str, ...], needle: str, exit_code: int
) -> None:
    rc, _, err = await netmesh(api.nats_url, *args)
    one_line_error(rc, err, needle)
    assert rc == exit_code
    assert "admin_token" not in await api.cli("events", "log")


async def test_a_bad_http_address_is_refused_before_the_server_starts(tmp_path: Path) -> None:
    rc, _, err = await netmesh(None, "server", "--data-dir", str(tmp_path), "--http", "8080")
    one_line_error(rc, err, "invalid --http '8080': expected HOST:PORT")
    assert not (tmp_path / "signing.key").exists()


async def test_a_retried_token_create_gets_the_same_token_sealed_to_its_signer(
    api: Served,
) -> None:
    """The token is never in the log, yet a retry whose answer was lost gets
    it again: made again from the command id, sealed to the admin's key."""
    key = load_or_create(Path(ADMIN_KEY[api.nats_url]))
    nc = await nats.connect(api.nats_url)
    try:
        request = signed_request(key, "token.create", name="ci", role="auditor")
        first = await send_raw(nc, "token.create", request)
        again = await send_raw(nc, "token.create", request)
    finally:
        await nc.close()
    assert first.ok and not first.repeated, first
    assert (again.ok, again.repeated, again.seq) == (True, True, first.seq), again
    token = first.result["token"]
    assert open_sealed(key, again.result.pop("sealed_token")) == token
    assert "token" not in again.result
    assert (await get(f"{api.url}/api/whoami", token))[1]["name"] == "ci"
    log = await api.cli("events", "log", "--json")
    assert token not in log and token.removeprefix("nma1.") not in log


async def test_a_token_command_can_be_planned(api: Served) -> None:
    out = await api.cli("admin", "token", "create", "ci", "--plan")
    assert out.startswith("token.create would append 1 event(s):\n  admin_token.created on")
    assert "nma1." not in out
    assert json.loads(await api.cli("admin", "token", "list", "--json")) == []


async def test_the_server_stops_promptly_with_a_stream_open(api: Served) -> None:
    token = await api.token("ci")
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{api.url}/api/events/stream", headers=headers) as response,
    ):
        await response.content.readline()  # the stream is open and has answered
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(api.http.close(), 10)
        assert asyncio.get_running_loop().time() - started < 5
        assert await response.content.read() is not None  # ended, not hanging


async def test_an_http_address_in_use_is_one_line_and_stops_everything(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        rc, _, err = await netmesh(
            None,
            *("server", "--data-dir", str(tmp_path), "--listen", f"127.0.0.1:{free_port()}"),
            *("--http", f"127.0.0.1:{port}"),
        )
    finally:
        taken.close()
    last = err.strip().splitlines()[-1]  # after the server's own log lines
    assert rc == 1 and last.startswith(f"Error: cannot start: [Errno 98] --http 127.0.0.1:{port}")
    assert "embedded nats-server stopped" in err


async def test_the_stream_can_start_at_the_newest_events(api: Served) -> None:
    token = await api.token("ci")

    async def used() -> bool:  # the token's first use, recorded: no more events from it
        _, events = await get(f"{api.url}/api/events", token)
        return any(e["type"] == "admin_token.used" for e in events)

    await wait_until(used, message="the token's use recorded")
    await api.cli("network", "create", "office", "--cidr", "10.10.0.0/24")
    _, events = await get(f"{api.url}/api/events", token)
    head = events[-1]["seq"]
    assert events[-1]["type"] == "network.created"
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{api.url}/api/events/stream?tail=2", headers=headers) as response,
    ):
        seqs: list[int] = []
        async with asyncio.timeout(10):
            async for line in response.content:
                if line.startswith(b"id: "):
                    seqs.append(int(line[4:]))
                    if seqs[-1] == head:
                        break
    assert seqs == [head - 1, head]


async def test_an_open_stream_ends_when_its_token_is_revoked(api: Served) -> None:
    token = await api.token("ci")
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{api.url}/api/events/stream?tail=1", headers=headers) as response,
    ):
        await response.content.readline()  # open, and answering
        await api.cli("admin", "token", "revoke", "ci")
        # The next event (or keepalive) finds the token revoked: this one is not sent.
        await api.cli("network", "create", "after", "--cidr", "10.98.0.0/24")
        async with asyncio.timeout(20):
            rest = (await response.content.read()).decode()  # to the end: the server ends it
    assert "event: unauthorized\ndata: " in rest
    last = rest.strip().splitlines()[-1]
    assert json.loads(last.removeprefix("data: ")) == {
        "error": "token 'ci' has been revoked",
        "code": "unauthorized",
    }
    assert '"network.created"' not in rest
