"""NATS names, in one place. See README "Names"."""

from __future__ import annotations

EVENTS_STREAM = "NETMESH_EVENTS"
EVENTS_PREFIX = "netmesh.ev"
DESIRED_STREAM = "NETMESH_DESIRED"
DESIRED_PREFIX = "netmesh.desired"
REPORTS_STREAM = "NETMESH_REPORTS"
REPORTS_PREFIX = "netmesh.report"
COMMAND_PREFIX = "netmesh.cmd"
QUERY_PREFIX = "netmesh.query"
# An agent whose subject does not chain asks here for a fresh snapshot.
RESYNC_PREFIX = "netmesh.resync"
# An agent asks here for a consumer of its desired subject, delivering to its
# inbox: agents never create consumers themselves (a consumer's deliver subject
# is not checked against the creator's permissions, so a host allowed to create
# one could have JetStream deliver to any subject).
CONSUME_PREFIX = "netmesh.consume"
# The same for readers of the event stream (admins, auditors, integrations):
# `netmesh.readevents.<their nkey>`.
READ_EVENTS_PREFIX = "netmesh.readevents"

NETWORK_EVENTS_WILDCARD = f"{EVENTS_PREFIX}.network.*"
ADMIN_EVENTS_WILDCARD = f"{EVENTS_PREFIX}.admin.*"


def aggregate_subject(kind: str, aggregate_id: str) -> str:
    """`netmesh.ev.<kind>.<id>`: one subject per aggregate."""
    return f"{EVENTS_PREFIX}.{kind}.{aggregate_id}"


def desired_subject(host_id: str) -> str:
    return f"{DESIRED_PREFIX}.{host_id}"


def report_subject(host_id: str, kind: str) -> str:
    return f"{REPORTS_PREFIX}.{host_id}.{kind}"


def resync_subject(host_id: str) -> str:
    return f"{RESYNC_PREFIX}.{host_id}"


def consume_subject(host_id: str) -> str:
    return f"{CONSUME_PREFIX}.{host_id}"


def read_events_subject(nkey: str) -> str:
    return f"{READ_EVENTS_PREFIX}.{nkey}"


def command_subject(verb: str) -> str:
    return f"{COMMAND_PREFIX}.{verb}"


def query_subject(what: str) -> str:
    return f"{QUERY_PREFIX}.{what}"
