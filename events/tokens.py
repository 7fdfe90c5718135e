"""Enrollment tokens: one string carrying what a new host needs to join.

    nmt1.<base64url(JSON {"server": url, "key_id": id, "secret": secret})>

The control plane stores only sha256(secret); the token is shown once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

import msgspec

TOKEN_PREFIX = "nmt1."


class InvalidToken(ValueError):
    """The token is not one netmesh made (garbled, truncated or of another format)."""


class TokenParts(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    server: str
    key_id: str
    secret: str


def make_token(server: str, key_id: str, secret: str) -> str:
    body = msgspec.json.encode(TokenParts(server=server, key_id=key_id, secret=secret))
    return TOKEN_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")


def parse_token(token: str) -> TokenParts:
    """Raises InvalidToken."""
    token = token.strip()
    if not token.startswith(TOKEN_PREFIX):
        raise InvalidToken("not a netmesh enrollment token (expected it to start with nmt1.)")
    body = token[len(TOKEN_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        parts = msgspec.json.decode(raw, type=TokenParts)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise InvalidToken("enrollment token is damaged (copy it again, whole)") from exc
    if not parts.key_id or not parts.secret:
        raise InvalidToken("enrollment token is damaged (copy it again, whole)")
    return parts


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
