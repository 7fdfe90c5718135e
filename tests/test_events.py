"""Event and command codecs: stable tags, open-world events, closed-world
commands, upcasting of old payloads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from events import envelope as envelope_module
from events.commands import CreateNetwork, Join
from events.envelope import (
    UnknownEventType,
    decode_envelope,
    encode_envelope,
    make_envelope,
)
from events.model import EVENT_TYPES, HostRegistered, NodeJoined


def test_tags_are_stable_and_past_tense() -> None:
    assert [cls.__struct_config__.tag for cls in EVENT_TYPES] == [
        "admin.added",
        "admin.removed",
        "network.created",
        "network.updated",
        "network.deleted",
        "enrollment_key.created",
        "enrollment_key.used",
        "enrollment_key.revoked",
        "host.registered",
        "host.endpoint_observed",
        "host.key_rotated",
        "host.key_rotation_requested",
        "node.joined",
        "node.removed",
        "node.tagged",
        "node.untagged",
        "policy.set",
        "policy.cleared",
        "egress.added",
        "egress.removed",
        "exit.set",
        "exit.cleared",
        "ingress.added",
        "ingress.removed",
        "client.created",
        "client.removed",
        "dns.record_added",
        "dns.record_removed",
        "hook.added",
        "hook.removed",
        "admin_token.created",
        "admin_token.revoked",
        "admin_token.used",
        "host.endpoint_seen",
        "relay.added",
        "relay.removed",
        "relay.pair_opened",
    ]


def test_envelope_round_trip_is_plain_json() -> None:
    event = NodeJoined(network="a", node_id="n1", host_id="h1", name="x", address="10.0.0.1")
    env = make_envelope(event, event_id="e", time=1.5, actor="admin", command_id="c")
    raw = encode_envelope(env)
    wire = msgspec.json.decode(raw)
    assert wire["type"] == "node.joined" and wire["schema"] == 1
    assert wire["data"]["address"] == "10.0.0.1"
    assert decode_envelope(raw) == env


def test_events_ignore_fields_they_do_not_know() -> None:
    event = NodeJoined(network="a", node_id="n1", host_id="h1", name="x", address="10.0.0.1")
    wire = msgspec.json.decode(
        encode_envelope(make_envelope(event, event_id="e", time=1, actor="a", command_id="c"))
    )
    wire["data"]["added_by_a_newer_version"] = {"x": 1}
    wire["also_new_in_the_envelope"] = True
    assert decode_envelope(msgspec.json.encode(wire)).data == event


def test_an_event_type_from_the_future_is_reported_not_guessed() -> None:
    raw = msgspec.json.encode(
        {
            "event_id": "e",
            "type": "acl.granted",
            "schema": 1,
            "time": 1.0,
            "actor": "a",
            "command_id": "c",
            "data": {"type": "acl.granted"},
        }
    )
    with pytest.raises(UnknownEventType):
        decode_envelope(raw)


@pytest.fixture
def schema_bump() -> Iterator[None]:
    """Pretend host.registered went to schema 2 (endpoints became objects)."""

    def v1_to_v2(payload: dict[str, Any]) -> dict[str, Any]:
        payload = dict(payload)
        payload["endpoints"] = [e["ip"] for e in payload.pop("endpoint_objects", [])]
        return payload

    envelope_module.UPCASTERS[("host.registered", 1)] = v1_to_v2
    envelope_module.SCHEMA_VERSIONS["host.registered"] = 2
    try:
        yield
    finally:
        del envelope_module.UPCASTERS[("host.registered", 1)]
        envelope_module.SCHEMA_VERSIONS["host.registered"] = 1


def test_old_payload_is_upcast_before_decoding(schema_bump: None) -> None:
    stored_v1 = msgspec.json.encode(
        {
            "event_id": "e",
            "type": "host.registered",
            "schema": 1,
            "time": 1.0,
            "actor": "a",
            "command_id": "c",
            "data": {
                "type": "host.registered",
                "host_id": "h1",
                "name": "x",
                "public_key": "k",
                "endpoint_objects": [{"ip": "192.0.2.1"}],
            },
        }
    )
    env = decode_envelope(stored_v1)
    assert env.schema == 2
    assert env.data == HostRegistered(
        host_id="h1", name="x", public_key="k", endpoints=("192.0.2.1",)
    )


@pytest.mark.parametrize(
    ("cls", "payload", "message"),
    [
        (CreateNetwork, {"name": "a", "cidr": "10.0.0.0/24", "mut": 1}, "unknown field `mut`"),
        (CreateNetwork, {"name": "a", "cidr": "10.0.0.0/24", "listen_port": 0}, ">= 1"),
        (CreateNetwork, {"name": "a", "cidr": "10.0.0.0/24", "keepalive": -1}, ">= 0"),
        (Join, {"token": "t", "public_key": "k", "name": ""}, "length >= 1"),
    ],
)
def test_commands_are_closed_world(cls: type, payload: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message.replace("`", ".")):
        msgspec.json.decode(msgspec.json.encode(payload), type=cls)
