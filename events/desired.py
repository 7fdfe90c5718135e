"""Desired WireGuard state: what the control plane tells one host to be.

This is protocol: agents of one version must read what control planes of the
next version write. Fields are only ever added, with defaults.
"""

from __future__ import annotations

import msgspec


class PeerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One WireGuard peer as the control plane wants it."""

    public_key: str  # base64, as `wg` prints it
    allowed_ips: tuple[str, ...]  # CIDRs, e.g. ("10.10.0.2/32",)
    endpoint: str | None = None  # "ip:port" or "[ipv6]:port"; None when the peer is unreachable
    persistent_keepalive: int = 0  # seconds, 0 = off
    name: str = ""  # for logs and humans; not part of WireGuard config


class DesiredState(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a host's agent needs to configure its interface.

    `revision` is the event-stream sequence this state reflects: agents apply a
    state only when its revision is newer than the one they hold.
    """

    host_id: str
    revision: int
    addresses: tuple[str, ...]  # interface addresses with prefix, e.g. ("10.10.0.1/24",)
    listen_port: int
    mtu: int
    peers: tuple[PeerConfig, ...] = ()
    protocol: int = 1


desired_encoder = msgspec.json.Encoder()
desired_decoder = msgspec.json.Decoder(DesiredState)
