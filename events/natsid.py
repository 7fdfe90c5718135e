"""NATS identities made from netmesh's own Ed25519 keys, and NATS JWTs.

An nkey is an Ed25519 key with a role prefix (U = user, A = account, N =
server) in NATS's base32 encoding; so a host's signing key is also its NATS
user key, and an admin's key its admin login: one key per party, not two.
A NATS JWT is `base64url(header).base64url(claims).base64url(signature)`, the
signature by the issuer's nkey over the first two parts (alg "ed25519-nkey").
Only what netmesh needs is here: user and auth-response claims, and checking a
server-signed request. Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any

import msgspec
import nkeys
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

USER = nkeys.PREFIX_BYTE_USER
ACCOUNT = nkeys.PREFIX_BYTE_ACCOUNT
SERVER = nkeys.PREFIX_BYTE_SERVER

_HEADER = base64.urlsafe_b64encode(b'{"typ":"JWT","alg":"ed25519-nkey"}').rstrip(b"=")


class JwtError(ValueError):
    """Not a JWT signed by whom it says."""


def seed_text(key: SigningKey, role: int = USER) -> str:
    """The nkey seed ("SU...") of an Ed25519 key, as nats-py's nkeys_seed_str wants."""
    return str(nkeys.encode_seed(bytes(key), role).decode())


def public_nkey(key: SigningKey | VerifyKey, role: int = USER) -> str:
    """The public nkey ("U...", "A...") of an Ed25519 key."""
    raw = bytes(key.verify_key if isinstance(key, SigningKey) else key)
    prefixed = bytes([role]) + raw
    checksum = nkeys.crc16_checksum(bytearray(prefixed))
    return base64.b32encode(prefixed + bytes(checksum)).decode().rstrip("=")


def verify_key_of_nkey(nkey: str, role: int = USER) -> VerifyKey:
    """Raises JwtError unless `nkey` is a well-formed public nkey of that role."""
    try:
        raw = base64.b32decode(nkey + "=" * (-len(nkey) % 8))
    except (ValueError, TypeError) as exc:
        raise JwtError("not an nkey") from exc
    if len(raw) != 35 or raw[0] != role:
        raise JwtError("not an nkey of the expected kind")
    if bytes(nkeys.crc16_checksum(bytearray(raw[:33]))) != raw[33:]:
        raise JwtError("nkey checksum does not match")
    return VerifyKey(raw[1:33])


def inbox_prefix(nkey: str) -> str:
    """Each identity's replies arrive under its own prefix, the only thing it may
    subscribe to: one client cannot read another's answers."""
    return f"_INBOX_{nkey}"


def is_inbox(subject: str) -> bool:
    """An inbox: nats-py's default (`_INBOX.`) or an identity's (`_INBOX_<nkey>.`)."""
    return subject.startswith(("_INBOX.", "_INBOX_"))


def client_options(key: SigningKey, token: str | None = None) -> dict[str, Any]:
    """nats-py connect options to log in as `key` (with an enrollment token, to join)."""
    options: dict[str, Any] = {
        "nkeys_seed_str": seed_text(key),
        "inbox_prefix": inbox_prefix(public_nkey(key)),
    }
    if token:
        options["token"] = token
    return options


def derived_key(root: SigningKey, purpose: str) -> SigningKey:
    """A separate key for `purpose`, reproducible from the root key (replicas that
    share the control plane's signing key derive the same NATS identities)."""
    return SigningKey(hashlib.sha256(b"netmesh-nats\0" + purpose.encode() + bytes(root)).digest())


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(claims: dict[str, Any], issuer: SigningKey, role: int = ACCOUNT) -> str:
    """Sign `claims` (iss, iat and jti are filled in) as a NATS JWT."""
    body = dict(claims)
    body["iss"] = public_nkey(issuer, role)
    body.setdefault("iat", int(time.time()))
    body["jti"] = ""
    # The jti is the hash of the claims without it, as NATS's jwt library does.
    digest = hashlib.sha512(msgspec.json.encode(body)).digest()[:32]
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    signed = _HEADER + b"." + _b64(msgspec.json.encode(body))
    signature = issuer.sign(signed).signature
    return (signed + b"." + _b64(signature)).decode()


def decode_verified(token: str, role: int = SERVER) -> dict[str, Any]:
    """The claims of a JWT signed by the nkey in its `iss`. Raises JwtError."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtError("not a JWT")
    try:
        claims = msgspec.json.decode(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (ValueError, msgspec.DecodeError) as exc:
        raise JwtError("not a JWT") from exc
    if not isinstance(claims, dict) or not isinstance(claims.get("iss"), str):
        raise JwtError("JWT without an issuer")
    key = verify_key_of_nkey(claims["iss"], role)
    try:
        key.verify(f"{parts[0]}.{parts[1]}".encode(), signature)
    except BadSignatureError as exc:
        raise JwtError("JWT signature does not match its issuer") from exc
    expires = claims.get("exp")
    if isinstance(expires, int) and expires < time.time():
        raise JwtError("JWT expired")
    return claims
