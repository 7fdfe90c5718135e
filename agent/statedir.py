"""The agent's state directory: its identity, its key, its last desired state.

The WireGuard private key is made here and never leaves the machine. Files are
written atomically (temp file, fsync, rename): a crash leaves the old file or
the new one, never half of one.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import msgspec
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from agent.relay import PairStatus
from events.desired import DesiredState, decode_state, desired_encoder
from events.signing import SigningKeyError, load_or_create


class Identity(msgspec.Struct, kw_only=True):
    host_id: str
    name: str
    server: str
    networks: list[str] = []
    endpoints: list[str] = []
    # The control plane's signing key, pinned from the enrollment token: desired
    # states not signed by it are refused. Empty for hosts enrolled before tokens
    # carried it (they accept unsigned states, with a warning; re-enroll to pin).
    server_key: str = ""
    # The last key epoch the control plane asked for that this host honoured.
    key_epoch: int = 0
    # The broker's CA (base64 DER), pinned from the token, for a tls:// server.
    server_ca: str = ""
    # Enrollment keys this host has joined with: a token it already used (in
    # its config file, on every start) is not a reason to join again.
    joined_keys: list[str] = []

    def ca_der(self) -> bytes | None:
        return base64.b64decode(self.server_ca) if self.server_ca else None


class AgentStatus(msgspec.Struct, kw_only=True):
    """What the running agent last knew, for `netmesh agent status`."""

    pid: int
    interface: str
    backend: str
    connected: bool = False
    # The broker of the connection (one of a cluster's), and whether the
    # control plane delivers this host's desired state over it.
    broker: str | None = None
    subscribed: bool = False
    desired_revision: int = 0
    applied_revision: int = 0
    last_error: str | None = None
    rejected: int = 0
    last_rejection: str | None = None
    updated_at: float = 0.0
    relays: list[PairStatus] = []  # on a relay host: the pairs it forwards, counted


class StateDirError(Exception):
    pass


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    def ensure(self) -> None:
        """Create the directory 0700. Raises StateDirError."""
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise StateDirError(f"cannot use state dir {self.path}: {exc.strerror}") from None

    @property
    def _key_file(self) -> Path:
        return self.path / "private.key"

    def signing_key(self) -> SigningKey:
        """This host's Ed25519 key, for its own commands; made on first use (0600)."""
        try:
            return load_or_create(self.path / "signing.key")
        except SigningKeyError as exc:
            raise StateDirError(str(exc)) from None

    def stage_private_key(self) -> PrivateKey:
        """A new WireGuard key, written next to the current one (0600) until
        `commit_private_key`: a rotation the control plane refuses changes nothing."""
        key = PrivateKey.generate()
        atomic_write(self.path / "private.key.next", base64.b64encode(bytes(key)) + b"\n", 0o600)
        return key

    def commit_private_key(self) -> None:
        os.replace(self.path / "private.key.next", self._key_file)

    def private_key_made_at(self) -> float:
        """When the current WireGuard key was made (its file's mtime)."""
        return self._key_file.stat().st_mtime

    def private_key(self) -> PrivateKey:
        """This host's WireGuard key, made on first use."""
        if self._key_file.exists():
            raw = base64.b64decode(self._key_file.read_text().strip())
            return PrivateKey(raw)
        key = PrivateKey.generate()
        atomic_write(self._key_file, base64.b64encode(bytes(key)) + b"\n", 0o600)
        return key

    def load_identity(self) -> Identity | None:
        path = self.path / "identity.json"
        if not path.exists():
            return None
        try:
            return msgspec.json.decode(path.read_bytes(), type=Identity)
        except msgspec.DecodeError as exc:
            raise StateDirError(f"{path} is damaged: {exc}") from None

    def save_identity(self, identity: Identity) -> None:
        atomic_write(self.path / "identity.json", msgspec.json.encode(identity))

    def load_desired(self) -> DesiredState | None:
        path = self.path / "desired.json"
        if not path.exists():
            return None
        try:
            # Any version this agent can read: older ones are upcast.
            return decode_state(path.read_bytes())
        except msgspec.DecodeError:
            return None  # a damaged cache is only a cache: the server sends it again

    def save_desired(self, state: DesiredState) -> None:
        atomic_write(self.path / "desired.json", desired_encoder.encode(state))

    def forget_desired(self) -> None:
        (self.path / "desired.json").unlink(missing_ok=True)

    def save_status(self, status: AgentStatus) -> None:
        atomic_write(self.path / "status.json", msgspec.json.encode(status), 0o644)

    def clear_status(self) -> None:
        (self.path / "status.json").unlink(missing_ok=True)


def load_status(path: Path) -> AgentStatus | None:
    file = path / "status.json"
    if not file.exists():
        return None
    try:
        return msgspec.json.decode(file.read_bytes(), type=AgentStatus)
    except msgspec.DecodeError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def public_key_of(key: PrivateKey) -> str:
    return base64.b64encode(bytes(key.public_key)).decode()


def private_key_b64(key: PrivateKey) -> str:
    return base64.b64encode(bytes(key)).decode()
