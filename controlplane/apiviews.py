"""What the read API answers (`controlplane.http`), as msgspec types: the
answers are converted to these before they are sent, and the OpenAPI document
is generated from them, so the two cannot drift apart. Closed-world
(`forbid_unknown_fields`): a field a query grows that is not here fails the
API's tests instead of going out undocumented."""

from __future__ import annotations

from typing import Any

import msgspec


class View(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class NetworkView(View, frozen=True):
    name: str
    cidr: str
    listen_port: int
    mtu: int
    keepalive: int
    created_at: float
    nodes: int
    dns_domain: str = ""  # the suffix of its nodes' names


class NodeView(View, frozen=True):
    id: str
    name: str
    network: str
    address: str
    interface_address: str
    host_id: str
    public_key: str
    endpoint: str | None
    listen_port: int
    joined_at: float
    tags: list[str]
    exit_via: str | None = None  # the internet gateway its default route goes through


class PeerStatusView(View, frozen=True):
    public_key: str
    name: str
    endpoint: str | None = None
    last_handshake: float = 0.0
    rx_bytes: int = 0
    tx_bytes: int = 0
    handshake_age: float | None = None  # seconds before the report; None: never
    connected: bool = False
    # "direct" (at an address it announced), "direct, nat" (at its NAT's public
    # mapping), "relay NAME" (through relay NAME's pair port); None: unknown
    # (controlplane/queries.py path_of).
    path: str | None = None


class NodeStatusView(View, frozen=True):
    id: str
    name: str
    network: str
    address: str
    desired_revision: int | None
    applied_revision: int | None
    # in sync | behind | never reported | error (`netmesh status`)
    state: str
    reported_at: float | None
    error: str | None
    rejected: int
    last_rejection: str | None
    peers: list[PeerStatusView]
    # Its agent reads its desired state now (bound to its consumer).
    online: bool = False


class PolicyView(View, frozen=True):
    network: str
    policy: bool  # False: everyone in the network reaches everyone
    document: str | None
    revision: int | None
    error: str | None


class EventView(View, frozen=True):
    seq: int
    subject: str
    type: str
    time: float
    actor: str
    command_id: str
    data: dict[str, Any]
    signer: str = ""  # the admin's key, on the first event of a signed command


class TokenView(View, frozen=True):
    """Who the bearer is."""

    name: str
    role: str
    networks: list[str]
    expires_at: float | None


class ErrorView(View, frozen=True):
    error: str  # one line, for people
    code: str  # stable, for programs (`events.commands.ErrorCode`)
