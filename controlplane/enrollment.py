"""Enrollment keys' ids and secrets, and the tokens that carry them.

Derived, not drawn: a key's id and secret are HMACs of the id of the command
that creates it, under a secret derived from the control plane's signing key.
So the answer to `key.create` can be given again (a retry whose first answer
was lost to a crash gets the same token) while the log keeps only the secret's
SHA-256; and every replica sharing `signing.key` derives the same ones. Only a
holder of `signing.key` can derive a secret from a command id (which is in the
log for every reader to see).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from nacl.signing import SigningKey

from events.signing import public_text
from events.tokens import make_token


class EnrollmentSecrets:
    def __init__(
        self, signing_key: SigningKey, advertise_url: str, broker_ca: bytes | None = None
    ) -> None:
        self._root = hashlib.sha256(b"netmesh enrollment keys\n" + bytes(signing_key)).digest()
        self._server_key = public_text(signing_key)
        self._url = advertise_url
        self._ca = broker_ca

    def key_for(self, command_id: str) -> tuple[str, str]:
        """(key id, secret) of the enrollment key the command `command_id` makes."""
        key_id = "k" + self._mac(b"key id", command_id).hex()[:10]
        secret = base64.urlsafe_b64encode(self._mac(b"secret", command_id)[:24]).decode()
        return key_id, secret

    def token(self, key_id: str, secret: str) -> str:
        """The token a user hands to an agent (the server's URL, keys and CA in it)."""
        return make_token(self._url, key_id, secret, self._server_key, self._ca)

    def _mac(self, purpose: bytes, command_id: str) -> bytes:
        return hmac.new(self._root, purpose + b"\0" + command_id.encode(), hashlib.sha256).digest()
