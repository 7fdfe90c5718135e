"""Who may send a command: derived from its spec (`controlplane.rules`).

Pure: the caller brings the topology, the signature check's outcome and the
time. An admin command must be signed by an admin whose role covers it (the
role rule below is the one `events verify` applies to the log too); a host's
command by the key its host registered; a join by the host key it registers.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from controlplane.rules import spec_for
from controlplane.rules.base import Rejected
from controlplane.rules.spec import ByAdmin, ByEnrolling, ByHost, CommandSpec, Scope
from events.commands import Command, ErrorCode, Role
from projections.topology import Topology

# How far a command's `signed_at` may be from the control plane's clock.
SIGNATURE_WINDOW = 300.0


class RoleVerdict(Enum):
    ALLOWED = "allowed"
    READ_ONLY = "read-only"  # an auditor (or a role this version does not know)
    ADMINS_ONLY = "admins only"  # the command has no network scope
    OUT_OF_SCOPE = "out of scope"  # about a network the network admin does not administer


def role_verdict(
    role: str, networks: tuple[str, ...], scope: Scope[Any] | None, network: str | None
) -> RoleVerdict:
    """Whether an admin with `role` (and, for a network admin, `networks`) may
    sign a command with this scope, about `network` (what the scope found; None
    when the command names nothing that exists, which the rules refuse anyway)."""
    if role == Role.ADMIN:
        return RoleVerdict.ALLOWED
    if role != Role.NETWORK_ADMIN:
        return RoleVerdict.READ_ONLY
    if scope is None:
        return RoleVerdict.ADMINS_ONLY
    if network is not None and network not in networks:
        return RoleVerdict.OUT_OF_SCOPE
    return RoleVerdict.ALLOWED


def authorize(
    topology: Topology,
    command: Command,
    signer: str | None,
    signature_problem: str | None,
    now: float,
) -> str | None:
    """Who a signed command is from: "admin:<name>" or "host:<id>"; None for a
    command that needs no signature (from an agent that has no key). Raises
    Rejected ("unauthorized") otherwise. `signature_problem` is None when the
    signature checked out."""
    spec = spec_for(command)
    match spec.sender:
        case ByAdmin(scope=scope):
            return _authorize_admin(topology, spec, scope, command, signer, signature_problem, now)
        case ByHost(host_of=host_of):
            host_id = host_of(command)
            host = topology.hosts.get(host_id)
            required = host.signing_key if host is not None else ""
        case ByEnrolling(admit=admit):
            required, host_id = admit(topology, command)
    if not required:
        return None
    verb = spec.verb
    if signature_problem is not None or signer != required:
        why = signature_problem if signer == required else "signed by another key"
        raise Rejected(ErrorCode.UNAUTHORIZED, f"{verb}: must be signed by the host's key ({why})")
    if abs(now - command.signed_at) > SIGNATURE_WINDOW:
        raise Rejected(
            ErrorCode.UNAUTHORIZED, f"{verb}: signed more than {SIGNATURE_WINDOW:.0f} s from now"
        )
    return f"host:{host_id}" if host_id else "host"


def _authorize_admin(
    topology: Topology,
    spec: CommandSpec[Any],
    scope: Scope[Any] | None,
    command: Command,
    signer: str | None,
    signature_problem: str | None,
    now: float,
) -> str:
    verb = spec.verb
    if not signer or signature_problem == "unsigned":
        raise Rejected(
            ErrorCode.UNAUTHORIZED, f"{verb} must be signed by an admin key (--admin-key)"
        )
    if signature_problem is not None:
        raise Rejected(ErrorCode.UNAUTHORIZED, f"{verb}: {signature_problem}")
    admin = topology.admins.get(signer)
    if admin is None:
        raise Rejected(ErrorCode.UNAUTHORIZED, f"{verb}: signed by a key that is not an admin's")
    # Found only where it matters: resolving a node's name scans the nodes.
    network = None
    if scope is not None and admin.role == Role.NETWORK_ADMIN:
        network = scope.of_command(topology, command)
    match role_verdict(admin.role, admin.networks, scope, network):
        case RoleVerdict.READ_ONLY:
            raise Rejected(
                ErrorCode.UNAUTHORIZED, f"{verb}: {admin.name} is an {admin.role}: read-only"
            )
        case RoleVerdict.ADMINS_ONLY:
            raise Rejected(ErrorCode.UNAUTHORIZED, f"{verb}: only an admin may do that")
        case RoleVerdict.OUT_OF_SCOPE:
            raise Rejected(
                ErrorCode.UNAUTHORIZED,
                f"{verb}: {admin.name} administers {', '.join(admin.networks)}, not {network!r}",
            )
    if abs(now - command.signed_at) > SIGNATURE_WINDOW:
        raise Rejected(
            ErrorCode.UNAUTHORIZED,
            f"{verb}: signed at {command.signed_at:.0f}, more than {SIGNATURE_WINDOW:.0f} s "
            "from the server's clock (a replay, or a clock to fix)",
        )
    return f"admin:{admin.name}"
