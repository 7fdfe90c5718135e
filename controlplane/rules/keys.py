"""Enrollment keys (part of their network's aggregate): creating, revoking,
and what makes a key usable for a join."""

from __future__ import annotations

import hmac

from controlplane.rules.base import (
    Context,
    Decision,
    Rejected,
    network_subject,
    one_event,
    parse_tags,
    require_network,
)
from controlplane.rules.spec import ByAdmin, CommandSpec, Need, Produces, Scope
from events.commands import CreateEnrollmentKey, ErrorCode, RevokeEnrollmentKey
from events.model import EnrollmentKeyCreated, EnrollmentKeyRevoked
from events.tokens import secret_digest
from projections.topology import EnrollmentKey, Topology

# Refusals of a join that count against its enrollment key (someone is guessing).
GUESSING = frozenset(
    {ErrorCode.INVALID_TOKEN, ErrorCode.REVOKED, ErrorCode.EXPIRED, ErrorCode.EXHAUSTED}
)


def create_key(topology: Topology, cmd: CreateEnrollmentKey, ctx: Context) -> Decision:
    require_network(topology, cmd.network)
    tags = parse_tags(cmd.tags)
    if ctx.new_key_id in topology.keys or ctx.new_key_id in topology.retired_keys:
        # Key ids come from command ids: this one's command id has been used
        # before (long enough ago to be forgotten). Never make a key again.
        raise Rejected(
            ErrorCode.CONFLICT,
            f"enrollment key {ctx.new_key_id} exists already; send the command with a new id",
        )
    expires_at = ctx.now + cmd.expires_in if cmd.expires_in is not None else None
    subject = network_subject(cmd.network)
    event = EnrollmentKeyCreated(
        network=cmd.network,
        key_id=ctx.new_key_id,
        secret_sha256=secret_digest(ctx.new_secret),
        uses=cmd.uses,
        expires_at=expires_at,
        tags=tags,
    )
    return one_event(
        topology,
        subject,
        event,
        {
            "key_id": ctx.new_key_id,
            "network": cmd.network,
            "uses": cmd.uses,
            "expires_at": expires_at,
            "tags": list(tags),
        },
    )


CREATE = CommandSpec[CreateEnrollmentKey](
    CreateEnrollmentKey,
    create_key,
    ByAdmin(Scope(lambda _topology, cmd: cmd.network)),
    Produces((EnrollmentKeyCreated,), about=("network", "network"), same_set=(("tags", "tags"),)),
    needs=frozenset({Need.FRESH_KEY, Need.ENROLLMENT_TOKEN}),
)


def revoke_key(topology: Topology, cmd: RevokeEnrollmentKey, _ctx: Context) -> Decision:
    key = topology.keys.get(cmd.key_id)
    if key is None:
        raise Rejected(ErrorCode.NOT_FOUND, f"no enrollment key {cmd.key_id!r}")
    if key.revoked:
        return Decision(result={"key_id": key.key_id, "already_revoked": True})
    subject = network_subject(key.network)
    return one_event(
        topology,
        subject,
        EnrollmentKeyRevoked(network=key.network, key_id=key.key_id),
        {"key_id": key.key_id},
    )


def _network_of_key(topology: Topology, cmd: RevokeEnrollmentKey) -> str | None:
    key = topology.keys.get(cmd.key_id)
    return key.network if key is not None else None


REVOKE = CommandSpec[RevokeEnrollmentKey](
    RevokeEnrollmentKey,
    revoke_key,
    ByAdmin(Scope(_network_of_key)),
    Produces((EnrollmentKeyRevoked,), about=("key_id", "key_id")),
)

SPECS = (CREATE, REVOKE)


def authenticate_key(topology: Topology, key_id: str, secret: str) -> EnrollmentKey:
    """The key a token names, if its secret matches. Raises Rejected."""
    key = topology.keys.get(key_id)
    if key is None:
        retired_network = topology.retired_keys.get(key_id)
        if retired_network is not None:
            raise Rejected(
                ErrorCode.NOT_FOUND,
                f"enrollment key {key_id} was for network {retired_network!r}, "
                "which has been deleted",
            )
        raise Rejected(ErrorCode.INVALID_TOKEN, "enrollment token not recognised")
    if not hmac.compare_digest(key.secret_sha256, secret_digest(secret)):
        raise Rejected(ErrorCode.INVALID_TOKEN, "enrollment token not recognised")
    return key


def check_key_usable(key: EnrollmentKey, now: float) -> None:
    """Raises Rejected with the specific reason a key cannot be used now."""
    if key.revoked:
        raise Rejected(ErrorCode.REVOKED, f"enrollment key {key.key_id} has been revoked")
    if key.expires_at is not None and now >= key.expires_at:
        raise Rejected(ErrorCode.EXPIRED, f"enrollment key {key.key_id} has expired")
    if key.uses is not None and key.used >= key.uses:
        raise Rejected(
            ErrorCode.EXHAUSTED,
            f"enrollment key {key.key_id} is used up ({key.used} of {key.uses} uses)",
        )


def throttle_bucket(topology: Topology, key_id: str) -> str:
    """What failed enrollments are counted against, for connections and joins
    alike: the key id, or one shared bucket for ids this control plane never
    made (a flood of made-up ids neither grows the table nor pushes real keys'
    failures out of it)."""
    if key_id in topology.keys or key_id in topology.retired_keys:
        return f"key:{key_id}"
    return "unknown key"
