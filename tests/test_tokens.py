"""Admin bearer tokens, as pure rules: made, refused, authenticated, revoked,
expired, and their use recorded at most once an hour."""

from __future__ import annotations

import pytest
from nacl.signing import SigningKey

from controlplane.decide import Rejected
from controlplane.rules.tokens import (
    TOKEN_USE_INTERVAL,
    authenticate_token,
    bearer_token,
    may_read,
    record_use,
)
from events.commands import CreateAdminToken, CreateNetwork, RevokeAdminToken
from events.envelope import make_envelope
from events.model import AdminTokenCreated, AdminTokenUsed
from events.tokens import secret_digest
from tests.factories import World

ROOT = SigningKey.generate()


def world_with_token(**fields: object) -> tuple[World, str]:
    """A world with network office and a token `ci`; the token's text."""
    world = World()
    world.add_root_admin(ROOT)
    world.run(CreateNetwork(name="office", cidr="10.10.0.0/24"), ROOT)
    decision, _ = world.run(CreateAdminToken(name="ci", **fields), ROOT)  # type: ignore[arg-type]
    (_, event) = decision.events[0]
    assert isinstance(event, AdminTokenCreated)
    # The World's fresh secret of its last context ("s<n>", `World.context`).
    token = bearer_token(f"s{world._keys}")
    assert secret_digest(token) == event.secret_sha256
    return world, token


def test_a_token_is_recorded_as_its_digest_only() -> None:
    world, token = world_with_token(expires_in=3600.0)
    (recorded,) = [r for r in world.log if isinstance(r.event, AdminTokenCreated)]
    assert token.startswith("nma1.")
    assert token not in repr(recorded) and token.removeprefix("nma1.") not in repr(recorded)
    found = authenticate_token(world.topology, token, world.now)
    assert (found.name, found.role, found.expires_at) == ("ci", "auditor", world.now + 3600)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"name": "CI!"}, "invalid token name"),
        ({"name": "x", "role": "root"}, "role must be one of"),
        ({"name": "x", "role": "network-admin"}, "needs --network"),
        ({"name": "x", "networks": ("office",)}, "needs --network"),
        ({"name": "x", "role": "network-admin", "networks": ("lab",)}, "no network named 'lab'"),
        ({"name": "ci"}, "token 'ci' exists"),
    ],
)
def test_bad_tokens_are_refused_in_one_line(fields: dict[str, object], needle: str) -> None:
    world, _ = world_with_token()
    with pytest.raises(Rejected) as refused:
        world.run(CreateAdminToken(**fields), ROOT)  # type: ignore[arg-type]
    assert needle in refused.value.message and "\n" not in refused.value.message


def test_a_revoked_token_stops_working_and_its_name_can_be_used_again() -> None:
    world, token = world_with_token()
    world.run(RevokeAdminToken(name="ci"), ROOT)
    with pytest.raises(Rejected, match="'ci' has been revoked"):
        authenticate_token(world.topology, token, world.now)
    again, _ = world.run(RevokeAdminToken(name="ci"), ROOT)
    assert again.events == () and again.result["already_revoked"]
    world.run(CreateAdminToken(name="ci"), ROOT)
    with pytest.raises(Rejected, match="not recognised"):  # the old one is gone for good
        authenticate_token(world.topology, token, world.now)


def test_an_expired_token_is_refused_and_says_so() -> None:
    world, token = world_with_token(expires_in=60.0)
    authenticate_token(world.topology, token, world.now + 59)
    with pytest.raises(Rejected, match="'ci' has expired"):
        authenticate_token(world.topology, token, world.now + 60)


@pytest.mark.parametrize("presented", ["", "nma1.wrong", "Bearer x"])
def test_a_missing_or_wrong_token_is_unauthorized(presented: str) -> None:
    world, _ = world_with_token()
    with pytest.raises(Rejected) as refused:
        authenticate_token(world.topology, presented, world.now)
    assert refused.value.code == "unauthorized"


def test_use_is_recorded_first_then_at_most_once_an_hour() -> None:
    world, _ = world_with_token()
    first = record_use(world.topology, "ci", "127.0.0.1", world.now)
    ((subject, event),) = first.events
    assert event == AdminTokenUsed(name="ci", remote="127.0.0.1")
    assert first.expect[0].subject_filter == subject == "netmesh.ev.token.ci"
    world.record(
        subject, make_envelope(event, event_id="u", time=world.now, actor="http", command_id="")
    )
    assert record_use(world.topology, "ci", "x", world.now + TOKEN_USE_INTERVAL - 1).events == ()
    later = world.now + TOKEN_USE_INTERVAL
    world.now = later
    assert record_use(world.topology, "ci", "x", later).events
    assert record_use(world.topology, "nobody", "x", later).events == ()


@pytest.mark.parametrize(
    ("fields", "readable"),
    [
        ({}, {"office", "lab", None}),
        ({"role": "admin"}, {"office", "lab", None}),
        ({"role": "network-admin", "networks": ("office",)}, {"office"}),
    ],
)
def test_what_a_token_may_read(fields: dict[str, object], readable: set[str | None]) -> None:
    world, token = world_with_token(**fields)
    found = authenticate_token(world.topology, token, world.now)
    assert {n for n in ("office", "lab", None) if may_read(found, n)} == readable
