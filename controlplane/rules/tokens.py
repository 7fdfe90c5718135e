"""Admin bearer tokens (an aggregate per token name): what the read API and
the dashboard (`netmesh server --http`) take instead of a signature.

A token only reads: what its role may read is what an admin of that role may
query (a network-admin token sees only its networks). Writes stay signed
commands. The token is made from a fresh secret derived from the creating
command's id (`Need.FRESH_KEY`), shown once, and recorded only as the SHA-256
of the token; revoking it or its expiry ends it at once.
"""

from __future__ import annotations

import hmac

from controlplane.rules.base import (
    Context,
    Decision,
    Rejected,
    check_role,
    guard,
    one_event,
)
from controlplane.rules.networks import NETWORK_NAME
from controlplane.rules.spec import ByAdmin, CommandSpec, Need, Produces
from events.commands import CreateAdminToken, ErrorCode, RevokeAdminToken, Role
from events.model import AdminTokenCreated, AdminTokenRevoked, AdminTokenUsed
from events.subjects import aggregate_subject
from events.tokens import secret_digest
from projections.topology import AdminToken, Topology

BEARER_PREFIX = "nma1."

# A token's use is recorded on its first request, then at most once per this
# many seconds (per token, whichever replica answers): the audit log says who
# read and when to the hour, without an event per HTTP request.
TOKEN_USE_INTERVAL = 3600.0


def bearer_token(secret: str) -> str:
    """The token an admin hands to the dashboard or a script."""
    return BEARER_PREFIX + secret


def token_subject(name: str) -> str:
    return aggregate_subject("token", name)


def token_live(token: AdminToken, now: float) -> bool:
    return not token.revoked and (token.expires_at is None or now < token.expires_at)


def create_token(topology: Topology, cmd: CreateAdminToken, ctx: Context) -> Decision:
    if not NETWORK_NAME.match(cmd.name):
        raise Rejected(
            ErrorCode.INVALID, f"invalid token name {cmd.name!r}: use 1-32 of a-z, 0-9 and '-'"
        )
    check_role(topology, cmd.role, cmd.networks, "a network-admin token")
    existing = topology.tokens.get(cmd.name)
    if existing is not None and token_live(existing, ctx.now):
        raise Rejected(
            ErrorCode.CONFLICT, f"token {cmd.name!r} exists: revoke it first, or pick another name"
        )
    expires_at = ctx.now + cmd.expires_in if cmd.expires_in is not None else None
    networks = tuple(sorted(set(cmd.networks)))
    event = AdminTokenCreated(
        name=cmd.name,
        secret_sha256=secret_digest(bearer_token(ctx.new_secret)),
        role=cmd.role,
        networks=networks,
        expires_at=expires_at,
    )
    return one_event(
        topology,
        token_subject(cmd.name),
        event,
        {"name": cmd.name, "role": cmd.role, "networks": list(networks), "expires_at": expires_at},
    )


CREATE = CommandSpec[CreateAdminToken](
    CreateAdminToken,
    create_token,
    ByAdmin(),  # no scope: only a full admin hands out read access
    Produces(
        (AdminTokenCreated,),
        about=("name", "name"),
        agree=(("role", "role"),),
        same_set=(("networks", "networks"),),
    ),
    needs=frozenset({Need.FRESH_KEY, Need.BEARER_TOKEN}),
)


def revoke_token(topology: Topology, cmd: RevokeAdminToken, _ctx: Context) -> Decision:
    token = topology.tokens.get(cmd.name)
    if token is None:
        raise Rejected(ErrorCode.NOT_FOUND, f"no token {cmd.name!r}")
    if token.revoked:
        return Decision(result={"name": cmd.name, "already_revoked": True})
    return one_event(
        topology, token_subject(cmd.name), AdminTokenRevoked(name=cmd.name), {"name": cmd.name}
    )


REVOKE = CommandSpec[RevokeAdminToken](
    RevokeAdminToken,
    revoke_token,
    ByAdmin(),
    Produces((AdminTokenRevoked,), about=("name", "name")),
)

SPECS = (CREATE, REVOKE)


def authenticate_token(topology: Topology, presented: str, now: float) -> AdminToken:
    """The live token `presented` is. Raises Rejected (unauthorized), saying
    why in one line: no token, not one we made, revoked, or expired."""
    if not presented:
        raise Rejected(ErrorCode.UNAUTHORIZED, "a bearer token is needed (Authorization: Bearer)")
    digest = secret_digest(presented)
    name = topology.tokens_by_digest.get(digest)
    token = topology.tokens.get(name) if name is not None else None
    if token is None or not hmac.compare_digest(token.secret_sha256, digest):
        raise Rejected(ErrorCode.UNAUTHORIZED, "the token is not recognised")
    if token.revoked:
        raise Rejected(ErrorCode.UNAUTHORIZED, f"token {token.name!r} has been revoked")
    if token.expires_at is not None and now >= token.expires_at:
        raise Rejected(ErrorCode.UNAUTHORIZED, f"token {token.name!r} has expired")
    return token


def may_read(token: AdminToken, network: object) -> bool:
    """Whether `token` may read what is about `network` (None: about no
    network, such as a host or an admin: only a token of every network may)."""
    if token.role != Role.NETWORK_ADMIN:
        return True
    return isinstance(network, str) and network in token.networks


def record_use(topology: Topology, name: str, remote: str, now: float) -> Decision:
    """The token's use, to record if its last recorded use is older than
    TOKEN_USE_INTERVAL (or there is none); else nothing. Guarded by the
    token's version: of two replicas recording the same hour, one wins."""
    token = topology.tokens.get(name)
    if token is None:
        return Decision()
    if token.last_used_at is not None and now - token.last_used_at < TOKEN_USE_INTERVAL:
        return Decision()
    subject = token_subject(name)
    event = AdminTokenUsed(name=name, remote=remote)
    return Decision(events=((subject, event),), expect=(guard(topology, subject),))
