"""JSON Schema of the events on the wire, generated from the msgspec types (so
it cannot drift from what the control plane writes): `netmesh events schema`.

The whole log's schema is the envelope's, its `data` one of the event types
(told apart by `type`); one type's schema is its payload's. Events are
open-world: the schemas allow fields they do not name (a newer control plane
may add some), as the decoders do. Each event's definition carries its current
schema version as `x-netmesh-schema` (the envelope's `schema` field).
"""

from __future__ import annotations

import difflib
from typing import Any

import msgspec

from events.envelope import SCHEMA_VERSIONS, Envelope
from events.model import EVENT_TYPES, Event

DIALECT = "https://json-schema.org/draft/2020-12/schema"
REF_TEMPLATE = "#/$defs/{name}"


class UnknownType(LookupError):
    """No event has this type (tag)."""


def event_tags() -> list[str]:
    return sorted(str(cls.__struct_config__.tag) for cls in EVENT_TYPES)


def _document(title: str, ref: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    for cls in EVENT_TYPES:
        definition = defs.get(cls.__name__)
        if definition is not None:
            definition["x-netmesh-schema"] = SCHEMA_VERSIONS[str(cls.__struct_config__.tag)]
    return {"$schema": DIALECT, "title": title, **ref, "$defs": defs}


def log_schema() -> dict[str, Any]:
    """The schema of every message in NETMESH_EVENTS: an envelope."""
    (ref,), defs = msgspec.json.schema_components([Envelope], ref_template=REF_TEMPLATE)
    return _document("netmesh event envelope", ref, defs)


def event_schema(tag: str) -> dict[str, Any]:
    """The schema of one event type's payload (the envelope's `data`).
    Raises UnknownType."""
    cls = _type_of(tag)
    (ref,), defs = msgspec.json.schema_components([cls], ref_template=REF_TEMPLATE)
    return _document(f"netmesh event {tag}", ref, defs)


def _type_of(tag: str) -> type[Event]:
    for cls in EVENT_TYPES:
        if cls.__struct_config__.tag == tag:
            return cls
    raise UnknownType(unknown_type(tag))


def unknown_type(text: str) -> str:
    """One line for an event type (or pattern) this version does not know:
    the nearest types, not all of them (the list outgrew a line)."""
    near = difflib.get_close_matches(text, event_tags(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    return f"unknown event type {text!r} ({hint}`netmesh events schema` lists them)"
