"""The admin aggregate: who may sign commands, with which role. Every admin
change is checked against all admins (one guard over `netmesh.ev.admin.*`)."""

from __future__ import annotations

import base64
import binascii

from controlplane.rules.base import Context, Decision, Rejected, check_role
from controlplane.rules.networks import NETWORK_NAME
from controlplane.rules.spec import ByAdmin, CommandSpec, Produces
from events.commands import AddAdmin, ErrorCode, RemoveAdmin, Role
from events.model import AdminAdded, AdminRemoved
from events.store import Expectation
from events.subjects import ADMIN_EVENTS_WILDCARD, aggregate_subject
from projections.topology import Topology


def add_admin(topology: Topology, cmd: AddAdmin, _ctx: Context) -> Decision:
    if not NETWORK_NAME.match(cmd.name):
        raise Rejected(ErrorCode.INVALID, f"invalid admin name {cmd.name!r}: use a-z, 0-9 and '-'")
    try:
        raw = base64.b64decode(cmd.public_key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise Rejected(ErrorCode.INVALID, "admin key must be an Ed25519 public key, base64")
    check_role(topology, cmd.role, cmd.networks, "a network-admin")
    names = {a.name for a in topology.admins.values()}
    if cmd.name in names:
        raise Rejected(ErrorCode.CONFLICT, f"admin {cmd.name!r} already exists")
    key = base64.b64encode(raw).decode()
    if key in topology.admins:
        raise Rejected(ErrorCode.CONFLICT, "that key already belongs to an admin")
    subject = aggregate_subject("admin", cmd.name)
    event = AdminAdded(name=cmd.name, public_key=key, role=cmd.role, networks=cmd.networks)
    return Decision(
        events=((subject, event),),
        # Across all admins: two replicas must not both pass the checks above.
        expect=(Expectation(ADMIN_EVENTS_WILDCARD, topology.last_admin_seq),),
        result={"name": cmd.name, "role": cmd.role, "networks": list(cmd.networks)},
    )


ADD = CommandSpec[AddAdmin](
    AddAdmin,
    add_admin,
    ByAdmin(),  # no scope: only a full admin
    Produces(
        (AdminAdded,),
        about=("name", "name"),
        agree=(("public_key", "public_key"), ("role", "role"), ("networks", "networks")),
    ),
)


def remove_admin(topology: Topology, cmd: RemoveAdmin, _ctx: Context) -> Decision:
    admin = next((a for a in topology.admins.values() if a.name == cmd.name), None)
    if admin is None:
        raise Rejected(ErrorCode.NOT_FOUND, f"no admin {cmd.name!r}")
    full = [a for a in topology.admins.values() if a.role == Role.ADMIN]
    if admin.role == Role.ADMIN and len(full) == 1:
        raise Rejected(ErrorCode.CONFLICT, f"{cmd.name!r} is the last admin: add another first")
    subject = aggregate_subject("admin", cmd.name)
    return Decision(
        events=((subject, AdminRemoved(name=cmd.name)),),
        # Across all admins: two concurrent removals must not both pass the
        # "last admin" check.
        expect=(Expectation(ADMIN_EVENTS_WILDCARD, topology.last_admin_seq),),
        result={"name": cmd.name},
    )


REMOVE = CommandSpec[RemoveAdmin](
    RemoveAdmin,
    remove_admin,
    ByAdmin(),  # no scope: only a full admin
    Produces((AdminRemoved,), about=("name", "name")),
)

SPECS = (ADD, REMOVE)
