"""Enrollment tokens: one string carrying what a new host needs to join.

    nmt1.<base64url(JSON {"server": url, "key_id": id, "secret": secret,
                          "server_key": base64 Ed25519 public key,
                          "ca": base64 DER of the broker's CA, for tls:// URLs})>

The control plane stores only sha256(secret); the token is shown once.
`server_key` is the key the control plane signs desired states with: the agent
pins it at enrollment, so the token is all it needs to trust (no public CA).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

import msgspec

from events.signing import verify_key_of

TOKEN_PREFIX = "nmt1."


class InvalidToken(ValueError):
    """The token is not one netmesh made (garbled, truncated or of another format)."""


class TokenParts(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    server: str
    key_id: str
    secret: str
    server_key: str = ""  # empty in tokens made before signed desired states
    # The broker's CA certificate (base64 DER) when it speaks TLS (tls:// URL):
    # the agent checks the broker against it, and nothing else.
    ca: str = ""

    def ca_der(self) -> bytes | None:
        return base64.b64decode(self.ca) if self.ca else None


def make_token(
    server: str, key_id: str, secret: str, server_key: str = "", ca: bytes | None = None
) -> str:
    body = msgspec.json.encode(
        TokenParts(
            server=server,
            key_id=key_id,
            secret=secret,
            server_key=server_key,
            ca=base64.b64encode(ca).decode() if ca else "",
        )
    )
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
    try:
        if parts.server_key:
            verify_key_of(parts.server_key)
        if parts.ca:
            base64.b64decode(parts.ca, validate=True)
    except (ValueError, binascii.Error):
        raise InvalidToken("enrollment token is damaged (copy it again, whole)") from None
    return parts


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
