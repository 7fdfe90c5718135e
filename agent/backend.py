"""What the agent needs from a WireGuard implementation, and what it reads back.

Two backends fit here: userspace (wireguard-go or boringtun, driven through the
UAPI socket) and kernel (pyroute2 generic netlink). Links, addresses, MTU and
routes go through rtnetlink (pyroute2) for both; see `agent/link.py`.
"""

from __future__ import annotations

from typing import Protocol

import msgspec


class PeerState(msgspec.Struct, frozen=True, kw_only=True):
    """A peer as the device reports it."""

    public_key: str  # base64
    allowed_ips: tuple[str, ...] = ()  # sorted CIDR strings
    endpoint: str | None = None  # "ip:port" / "[v6]:port"
    persistent_keepalive: int = 0
    last_handshake: float = 0.0  # unix seconds, 0 = never
    rx_bytes: int = 0
    tx_bytes: int = 0


class DeviceState(msgspec.Struct, frozen=True, kw_only=True):
    """The WireGuard part of an interface, as read from the device."""

    public_key: str | None  # base64; None when no private key is set
    listen_port: int
    fwmark: int = 0  # the mark on its own UDP packets (0: none)
    peers: tuple[PeerState, ...] = ()


class PeerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A peer to add or change in place (never removed and re-added)."""

    public_key: str
    allowed_ips: tuple[str, ...]  # replaces the peer's allowed IPs
    endpoint: str | None = None  # None: leave the endpoint as it is
    persistent_keepalive: int = 0


class BackendError(Exception):
    """A WireGuard operation failed. `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class WireGuardBackend(Protocol):
    """One WireGuard interface on this machine."""

    interface: str

    async def exists(self) -> bool:
        """Whether the interface exists (and, for userspace, its UAPI socket answers)."""
        ...

    async def create(self) -> None:
        """Create the interface (idempotent). Raises BackendError."""
        ...

    async def destroy(self) -> None:
        """Remove the interface (idempotent)."""
        ...

    async def read(self) -> DeviceState:
        """Read device state. Raises BackendError if the interface is absent."""
        ...

    async def configure(
        self,
        *,
        private_key: str | None = None,
        listen_port: int | None = None,
        fwmark: int | None = None,
        upsert_peers: tuple[PeerSpec, ...] = (),
        remove_peers: tuple[str, ...] = (),
    ) -> None:
        """Apply one change in place: other peers are left untouched. Raises BackendError."""
        ...

    async def close(self) -> None:
        """Release resources; leaves the interface up (a stopped agent keeps the network)."""
        ...


class ExistsByReading:
    """`exists()` for a backend whose `read()` fails exactly when the device is
    not there (wireguard-go's socket, the kernel's netlink family)."""

    async def read(self) -> DeviceState:
        raise NotImplementedError

    async def exists(self) -> bool:
        try:
            await self.read()
        except BackendError:
            return False
        return True
