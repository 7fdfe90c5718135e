"""The envelope every event travels in, and its codec (JSON on the wire).

Wire shape (any NATS client in any language can read it):

    {"event_id": "...", "type": "node.joined", "schema": 1, "time": 1764000000.0,
     "actor": "admin", "command_id": "...", "data": {"type": "node.joined", ...},
     "answer": {"request": "<sha256>", "result": {...}}}

(`answer` on the last event of each command; `signed`, `signer`, `signature`
on the first event of a signed one.)

Old payloads are upcast on the raw dict, one function per schema step, before
typed decoding (see `UPCASTERS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import msgspec

from events.model import EVENT_TYPES, AnyEvent, Event, event_type

# Current schema version of each event type. Bump it when a payload's shape
# changes in a way defaults cannot absorb, and add an upcaster from the old one.
_TYPES_BY_TAG: dict[str, type[Event]] = {str(cls.__struct_config__.tag): cls for cls in EVENT_TYPES}

SCHEMA_VERSIONS: dict[str, int] = dict.fromkeys(_TYPES_BY_TAG, 1)

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
# (type, from_schema) -> function producing the payload of schema from_schema + 1.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """What the command that appended an event was answered, on its last event:
    a retry of the command (its answer lost to a crash) gets it again, from the
    log, on any replica and after any restart. Never a secret: an enrollment
    key's token is derived again from the command id instead."""

    # sha256 of the request (verb, signer, exact payload): a retry is the same
    # request, anything else sent with the same command id is not answered this.
    request: str
    result: msgspec.Raw  # the reply's result (JSON), as the command got it


class Envelope(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    event_id: str
    type: str
    schema: int
    time: float
    actor: str
    command_id: str
    data: AnyEvent
    # The proof, on the first event of a signed command: the exact bytes the
    # admin signed (verb and payload), their public key and the signature.
    # `netmesh events verify` checks them offline.
    signed: str = ""
    signer: str = ""
    signature: str = ""
    answer: Answer | None = None


# What a store that checks event MACs hands over for a message in the event
# stream that is not an event and carries no valid MAC (garbage written by
# someone else): seen, so that the subject's version still moves, and never
# believed (its `signature` is "invalid", so `evolve` stops before the data,
# which is absent). An undecodable message *with* a valid MAC is ours, from
# another version: that stops the reader, loudly.
NOT_AN_EVENT = Envelope(
    event_id="",
    type="(not an event)",
    schema=0,
    time=0.0,
    actor="",
    command_id="",
    data=cast("AnyEvent", None),
)


class _RawEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    type: str
    schema: int
    time: float
    actor: str
    command_id: str
    data: msgspec.Raw
    signed: str = ""
    signer: str = ""
    signature: str = ""
    answer: Answer | None = None


class RecordedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event as stored: its stream sequence and subject come from the store."""

    seq: int
    subject: str
    envelope: Envelope
    # Whether the control plane's signature on it checked out: "valid",
    # "unsigned", "invalid", or "unchecked" (a store that does not verify).
    signature: str = "unchecked"

    @property
    def event(self) -> AnyEvent:
        return self.envelope.data


class UnknownEventType(Exception):
    """A stored event whose type this version does not know (written by a newer one)."""


def make_envelope(
    event: AnyEvent, *, event_id: str, time: float, actor: str, command_id: str
) -> Envelope:
    tag = event_type(event)
    return Envelope(
        event_id=event_id,
        type=tag,
        schema=SCHEMA_VERSIONS[tag],
        time=time,
        actor=actor,
        command_id=command_id,
        data=event,
    )


_encoder = msgspec.json.Encoder()
_raw_decoder = msgspec.json.Decoder(_RawEnvelope)
_typed_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    tag: msgspec.json.Decoder(cls) for tag, cls in _TYPES_BY_TAG.items()
}


def encode_envelope(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def upcast(event_type_tag: str, schema: int, payload: dict[str, Any]) -> dict[str, Any]:
    """Bring a raw payload from `schema` up to the current schema of its type."""
    current = SCHEMA_VERSIONS[event_type_tag]
    while schema < current:
        payload = UPCASTERS[(event_type_tag, schema)](payload)
        schema += 1
    return payload


def decode_envelope(raw: bytes) -> Envelope:
    """Decode a stored envelope. Raises msgspec.ValidationError, UnknownEventType."""
    env = _raw_decoder.decode(raw)
    cls = _TYPES_BY_TAG.get(env.type)
    if cls is None:
        raise UnknownEventType(env.type)
    if env.schema == SCHEMA_VERSIONS[env.type]:
        data: AnyEvent = _typed_decoders[env.type].decode(env.data)
    else:
        payload = upcast(env.type, env.schema, msgspec.json.decode(env.data))
        payload["type"] = env.type
        data = msgspec.convert(payload, cls)  # type: ignore[assignment]
    return Envelope(
        event_id=env.event_id,
        type=env.type,
        schema=SCHEMA_VERSIONS[env.type],
        time=env.time,
        actor=env.actor,
        command_id=env.command_id,
        data=data,
        signed=env.signed,
        signer=env.signer,
        signature=env.signature,
        answer=env.answer,
    )
