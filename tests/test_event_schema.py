"""`netmesh events schema`: the JSON Schema generated from the event types.
Every message of a real recorded log (commands run against a real control
plane on a real nats-server, read back raw from the stream) validates against
it; a payload that breaks the schema does not; the CLI prints it, and refuses
an unknown type in one line."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import msgspec
import pytest

from controlplane.service import ControlPlane
from events.schema import event_schema, event_tags, log_schema
from events.subjects import EVENTS_STREAM
from tests.eventlog_scenario import record
from tests.test_cli import NETMESH, one_line_error
from tests.test_controlplane import Admin
from tests.test_controlplane import cp as cp  # the fixture


async def raw_log(admin: Admin) -> list[dict[str, Any]]:
    js = admin.nc.jetstream()
    head = await admin.last_seq()
    messages = [await js.get_msg(EVENTS_STREAM, seq) for seq in range(1, head + 1)]
    return [json.loads(m.data or b"") for m in messages]


async def test_every_recorded_event_validates_against_the_schema(
    cp: tuple[ControlPlane, Admin],
) -> None:
    plane, admin = cp
    await record(plane, admin)
    log = await raw_log(admin)
    envelope = jsonschema.Draft202012Validator(log_schema())
    envelope.check_schema(log_schema())
    seen = set()
    for message in log:
        envelope.validate(message)
        jsonschema.validate(message["data"], event_schema(message["type"]))
        seen.add(message["type"])
    # The scenario is worth something only if it covers the log's vocabulary.
    # (admin_token.used is appended on a read API request: tests/test_http.py.)
    assert set(event_tags()) - seen == {"admin_token.used"}

    # The schema says no to what the decoders would refuse.
    joined = next(m for m in log if m["type"] == "node.joined")
    for broken in (
        {**joined, "data": {k: v for k, v in joined["data"].items() if k != "address"}},
        {**joined, "data": {**joined["data"], "tags": "web"}},
        {**joined, "data": {**joined["data"], "type": "node.teleported"}},
        {k: v for k, v in joined.items() if k != "event_id"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            envelope.validate(broken)
    # Open-world: a field a newer control plane adds is allowed.
    envelope.validate({**joined, "data": {**joined["data"], "zone": "eu"}})


def test_each_type_schema_is_its_payload() -> None:
    schema = event_schema("node.joined")
    definition = schema["$defs"]["NodeJoined"]
    assert definition["x-netmesh-schema"] == 1
    required = {"type", "network", "node_id", "host_id", "name", "address"}
    assert set(definition["required"]) == required
    assert definition["properties"]["type"] == {"enum": ["node.joined"]}
    assert set(schema["$defs"]) == {"NodeJoined"}


async def run_cli(*args: str) -> tuple[int, str, str]:
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        NETMESH, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_the_cli_prints_the_schema_and_refuses_an_unknown_type() -> None:
    rc, out, err = await run_cli("events", "schema")
    assert (rc, json.loads(out)) == (0, msgspec.json.decode(msgspec.json.encode(log_schema())))
    rc, out, _ = await run_cli("events", "schema", "policy.set")
    assert rc == 0 and json.loads(out)["$ref"] == "#/$defs/PolicySet"
    rc, out, err = await run_cli("events", "schema", "node.teleported")
    one_line_error(rc, err, "unknown event type 'node.teleported'")
    assert (rc, out) == (1, "")
