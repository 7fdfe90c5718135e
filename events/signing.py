"""Ed25519 signatures over desired-state messages (and, later, commands).

The control plane signs the exact bytes it publishes; the signature travels in
a header, so the payload stays plain JSON for anyone tapping the stream. An
agent verifies with the key it pinned at enrollment (the token carries it):
then whoever can publish on the broker still cannot make an agent add a peer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
from pathlib import Path

import msgspec
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import SealedBox
from nacl.signing import SigningKey, VerifyKey

SIGNATURE_HEADER = "Netmesh-Signature"


class SigningKeyError(Exception):
    """The key file is unreadable or not a key."""


def sign(key: SigningKey, data: bytes) -> str:
    """Base64 of the detached signature of `data`."""
    return base64.b64encode(key.sign(data).signature).decode()


def verify_key_of(text: str) -> VerifyKey:
    """A public key as tokens carry it (base64). Raises ValueError."""
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64") from exc
    if len(raw) != 32:
        raise ValueError("not an Ed25519 public key")
    return VerifyKey(raw)


def public_text(key: SigningKey) -> str:
    return base64.b64encode(bytes(key.verify_key)).decode()


def verify(key: VerifyKey, data: bytes, signature: str | None) -> str | None:
    """None when `signature` is a valid signature of `data` by `key`, else why not."""
    if not signature:
        return "unsigned"
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(data, raw)
    except (binascii.Error, ValueError, BadSignatureError):
        return "bad signature"
    return None


EVENT_MAC_HEADER = "Netmesh-Mac"


def event_mac_key(key: SigningKey) -> bytes:
    """The secret events are authenticated with, derived from the control
    plane's key (replicas that share `signing.key` share it). A MAC, not a
    signature: only control planes check events, and an HMAC costs a
    microsecond where an Ed25519 check costs fifty (a rebuild checks them all)."""
    return hashlib.sha256(b"netmesh event mac\n" + bytes(key)).digest()


def event_mac(key: bytes, data: bytes) -> str:
    return base64.b64encode(hmac.new(key, data, hashlib.sha256).digest()).decode()


def event_mac_ok(key: bytes, data: bytes, mac: str | None) -> bool:
    return bool(mac) and hmac.compare_digest(event_mac(key, data), mac or "")


COMMAND_SIGNER_HEADER = "Netmesh-Signer"
COMMAND_CONTEXT = b"netmesh-command\n"
# A plan (`--plan`) is signed under its own context: its signature cannot be
# sent again as the command's.
PLAN_CONTEXT = b"netmesh-plan\n"


# A join carries its enrollment token here, beside the signed payload, which
# holds only the token's digest (`token_digest`): the signed text is kept in
# the log as the join's proof, and the log must not hold the token.
ENROLLMENT_TOKEN_HEADER = "Netmesh-Enrollment-Token"


def token_digest(token: str) -> str:
    """What a signed join says of its enrollment token: sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def signed_command(verb: str, payload: bytes) -> bytes:
    """What an admin signs for a command: a context tag (a signature made for
    anything else cannot pass as a command), the verb, the exact payload (which
    holds the command id and the time it was signed)."""
    return COMMAND_CONTEXT + verb.encode() + b"\n" + payload


def signed_plan(verb: str, payload: bytes) -> bytes:
    """What an admin signs to ask what a command would do (`--plan`): the
    command's text under another context tag, so that it applies nothing."""
    return PLAN_CONTEXT + verb.encode() + b"\n" + payload


def command_headers(
    key: SigningKey, verb: str, payload: bytes, *, plan: bool = False
) -> dict[str, str]:
    signed = signed_plan(verb, payload) if plan else signed_command(verb, payload)
    return {COMMAND_SIGNER_HEADER: public_text(key), SIGNATURE_HEADER: sign(key, signed)}


def seal_for(signer: str, secret: str) -> str:
    """`secret` encrypted to the holder of the Ed25519 key `signer` (base64,
    as commands name it): a sealed box to its X25519 form. Only they can open
    it (`open_sealed`). Raises ValueError for a signer that is not a key."""
    box = SealedBox(verify_key_of(signer).to_curve25519_public_key())
    return base64.b64encode(box.encrypt(secret.encode())).decode()


def open_sealed(key: SigningKey, sealed: str) -> str:
    """What `seal_for` sealed for `key`'s public half. Raises ValueError."""
    try:
        box = SealedBox(key.to_curve25519_private_key())
        return box.decrypt(base64.b64decode(sealed, validate=True)).decode()
    except (binascii.Error, CryptoError, UnicodeDecodeError) as exc:
        raise ValueError("not sealed for this key") from exc


def signed_payload(
    key: SigningKey, verb: str, fields: dict[str, object]
) -> tuple[bytes, dict[str, str]]:
    """A command's payload, stamped with the time, and the headers that sign it."""
    payload = msgspec.json.encode({**fields, "signed_at": time.time()})
    return payload, command_headers(key, verb, payload)


def load_or_create(path: Path) -> SigningKey:
    """The key in `path` (base64 seed), made on first use with mode 0600."""
    if path.exists():
        try:
            return SigningKey(base64.b64decode(path.read_text().strip(), validate=True))
        except (OSError, binascii.Error, ValueError) as exc:
            raise SigningKeyError(f"{path}: not a signing key ({exc})") from None
    key = SigningKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(bytes(key)).decode() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return key
