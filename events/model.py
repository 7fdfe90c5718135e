"""The facts netmesh records. Every admin action and every observation that
changes the network becomes one of these, appended to NETMESH_EVENTS.

Rules (see ../shared/DESIGN.md): frozen, past tense, an explicit stable tag;
fields are only ever added, with defaults; existing field types never change.
Events are open-world: decoders ignore fields they do not know.
"""

from __future__ import annotations

from typing import Annotated, get_args

import msgspec

Seconds = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of all events; the tag is the event's `type` on the wire."""


class NetworkCreated(Event, frozen=True, tag="network.created"):
    network: str
    cidr: str
    listen_port: Port = 51820
    mtu: int = 1420
    keepalive: Seconds = 25
    # The suffix of its members' names ("" before DNS: NETWORK.internal).
    dns_domain: str = ""


class NetworkUpdated(Event, frozen=True, tag="network.updated"):
    """Settings of a network changed; None: that one did not."""

    network: str
    mtu: int | None = None
    keepalive: Seconds | None = None
    dns_domain: str | None = None


class NetworkDeleted(Event, frozen=True, tag="network.deleted"):
    network: str


class EnrollmentKeyCreated(Event, frozen=True, tag="enrollment_key.created"):
    network: str
    key_id: str
    # sha256 of the secret, hex: the secret itself never enters the log.
    secret_sha256: str
    uses: int | None = None  # None = unlimited
    expires_at: float | None = None  # unix seconds; None = never
    tags: tuple[str, ...] = ()  # nodes joining with this key carry these tags


class EnrollmentKeyUsed(Event, frozen=True, tag="enrollment_key.used"):
    network: str
    key_id: str
    host_id: str


class EnrollmentKeyRevoked(Event, frozen=True, tag="enrollment_key.revoked"):
    network: str
    key_id: str


class HostRegistered(Event, frozen=True, tag="host.registered"):
    host_id: str
    name: str
    public_key: str
    listen_port: Port = 51820
    endpoints: tuple[str, ...] = ()  # candidate "ip" or "ip:port" the host offered
    signing_key: str = ""  # the host's Ed25519 key (base64); empty for old agents


class HostEndpointObserved(Event, frozen=True, tag="host.endpoint_observed"):
    host_id: str
    endpoints: tuple[str, ...]
    listen_port: Port = 51820


class HostKeyRotated(Event, frozen=True, tag="host.key_rotated"):
    """The host's WireGuard public key changed (made on the host; peers switch)."""

    host_id: str
    public_key: str
    previous_key: str


class HostKeyRotationRequested(Event, frozen=True, tag="host.key_rotation_requested"):
    """An admin asked the host to make a new WireGuard key (`node rotate-key`)."""

    host_id: str
    epoch: int


class NodeJoined(Event, frozen=True, tag="node.joined"):
    network: str
    node_id: str
    host_id: str
    name: str
    address: str  # overlay IP, no prefix
    tags: tuple[str, ...] = ()  # from the enrollment key it joined with


class NodeRemoved(Event, frozen=True, tag="node.removed"):
    network: str
    node_id: str
    host_id: str


class NodeTagged(Event, frozen=True, tag="node.tagged"):
    """Tags added to a node (only those it did not carry)."""

    network: str
    node_id: str
    host_id: str
    tags: tuple[str, ...]


class NodeUntagged(Event, frozen=True, tag="node.untagged"):
    """Tags taken from a node (only those it carried)."""

    network: str
    node_id: str
    host_id: str
    tags: tuple[str, ...]


class PolicySet(Event, frozen=True, tag="policy.set"):
    """A network's access policy, as the admin wrote it (JSON5, comments
    kept): validated when set, compiled again on every replay."""

    network: str
    document: str


class PolicyCleared(Event, frozen=True, tag="policy.cleared"):
    """The network allows everything again."""

    network: str


class EgressAdded(Event, frozen=True, tag="egress.added"):
    """A node forwards to `ranges` (CIDRs outside every network) for the other
    members of its network: an egress gateway. Repeated for a node that is
    one already: `ranges` are added to its own, `nat` and `metric` replace its
    own (they hold for all of its ranges)."""

    network: str
    node_id: str
    host_id: str
    ranges: tuple[str, ...]
    nat: bool = True  # masquerade what leaves towards the ranges
    metric: int = 100  # among gateways of one range, members use the lowest


class EgressRemoved(Event, frozen=True, tag="egress.removed"):
    """Ranges a node no longer forwards to (all of them: it is no longer a gateway)."""

    network: str
    node_id: str
    host_id: str
    ranges: tuple[str, ...]


class ExitSet(Event, frozen=True, tag="exit.set"):
    """A node sends everything not for its networks (its default route)
    through `via`, a node of the same network that is an internet gateway."""

    network: str
    node_id: str
    host_id: str
    via: str  # node id


class ExitCleared(Event, frozen=True, tag="exit.cleared"):
    """A node routes as its host does again."""

    network: str
    node_id: str
    host_id: str


class IngressAdded(Event, frozen=True, tag="ingress.added"):
    """A node takes in external WireGuard clients (phones, stock WireGuard
    apps, routers) and forwards between them and its network: an ingress
    gateway."""

    network: str
    node_id: str
    host_id: str


class IngressRemoved(Event, frozen=True, tag="ingress.removed"):
    """A node is no longer an ingress gateway: its clients go with it."""

    network: str
    node_id: str
    host_id: str


class ClientCreated(Event, frozen=True, tag="client.created"):
    """An external client: a WireGuard device without the agent, reached
    through ingress gateway `via`. Only its public key is known here: its
    private key was made by the admin's CLI (or the device) and never sent."""

    network: str
    name: str
    public_key: str  # base64
    address: str  # overlay IP from the network's pool, no prefix
    via: str  # node id of its ingress gateway
    host_id: str  # the host of `via`
    full_tunnel: bool = False  # its configuration sends everything through `via`


class ClientRemoved(Event, frozen=True, tag="client.removed"):
    network: str
    name: str
    via: str  # node id
    host_id: str  # the host of `via`


class DnsRecordAdded(Event, frozen=True, tag="dns.record_added"):
    """A name in a network's domain, beside its nodes' names: `name` relative
    to the domain (so it follows a change of domain), with its IPv4 and IPv6
    addresses or the name it is an alias of."""

    network: str
    name: str
    a: tuple[str, ...] = ()
    aaaa: tuple[str, ...] = ()
    cname: str = ""


class DnsRecordRemoved(Event, frozen=True, tag="dns.record_removed"):
    network: str
    name: str  # relative to the network's domain


class AdminAdded(Event, frozen=True, tag="admin.added"):
    """Someone may sign admin commands. The first one is written by the control
    plane on its first start (the root of trust `events verify` starts from)."""

    name: str
    public_key: str  # base64 Ed25519
    role: str = "admin"  # admin | network-admin | auditor
    networks: tuple[str, ...] = ()  # a network admin's networks


class AdminRemoved(Event, frozen=True, tag="admin.removed"):
    name: str


class HookAdded(Event, frozen=True, tag="hook.added"):
    """Events of these types are POSTed to `url` from here on (`netmesh hook add`)."""

    hook_id: str
    url: str
    events: str = "*"  # a shell pattern over event types
    # sha256 of its HMAC secret, hex: the secret itself (derived again from the
    # command id by whoever holds signing.key) never enters the log.
    secret_sha256: str = ""


class HookRemoved(Event, frozen=True, tag="hook.removed"):
    hook_id: str


class AdminTokenCreated(Event, frozen=True, tag="admin_token.created"):
    """A bearer token for the read API (`netmesh server --http`): only the
    SHA-256 of its secret is recorded; the token is shown once, to its maker."""

    name: str
    secret_sha256: str
    role: str = "auditor"  # admin | network-admin | auditor: what it may read
    networks: tuple[str, ...] = ()  # a network-admin token's networks
    expires_at: float | None = None  # unix seconds; None = never


class AdminTokenRevoked(Event, frozen=True, tag="admin_token.revoked"):
    name: str


class AdminTokenUsed(Event, frozen=True, tag="admin_token.used"):
    """The read API answered a request with this token: recorded by the
    control plane on a token's first use and then at most once an hour, not
    once per request (`controlplane.rules.tokens.TOKEN_USE_INTERVAL`)."""

    name: str
    remote: str = ""  # the client address of the request that was recorded


# -- NAT traversal (controlplane/rules/nat.py) ---------------------------------


class HostEndpointSeen(Event, frozen=True, tag="host.endpoint_seen"):
    """Where another host's WireGuard device saw this host's packets come from
    (after a handshake): its public mapping when it is behind a NAT."""

    host_id: str  # the host seen
    endpoint: str  # "ip:port"
    seen_by: str  # the host that saw it (and signed the report)


# -- relays (controlplane/rules/relays.py) ------------------------------------


class RelayAdded(Event, frozen=True, tag="relay.added"):
    """A node with an endpoint everyone reaches forwards the WireGuard
    datagrams of pairs that cannot reach each other directly, as they are (it
    holds neither's key), on UDP ports `ports[0]`..`ports[1]` (two per pair)."""

    network: str
    node_id: str
    host_id: str
    ports: tuple[int, int]


class RelayRemoved(Event, frozen=True, tag="relay.removed"):
    """A relay stops forwarding; the pairs it carried go back to trying direct."""

    network: str
    node_id: str
    host_id: str


class RelayPairOpened(Event, frozen=True, tag="relay.pair_opened"):
    """Hosts `hosts` could not reach each other directly: relay `relay` (a
    node id) forwards between them, `hosts[i]` sending to its port `ports[i]`.
    `asked_by` is the host whose agent gave up on the direct path."""

    network: str
    relay: str
    hosts: tuple[str, str]  # host ids, sorted
    ports: tuple[int, int]
    asked_by: str


AnyEvent = (
    AdminAdded
    | AdminRemoved
    | NetworkCreated
    | NetworkUpdated
    | NetworkDeleted
    | EnrollmentKeyCreated
    | EnrollmentKeyUsed
    | EnrollmentKeyRevoked
    | HostRegistered
    | HostEndpointObserved
    | HostKeyRotated
    | HostKeyRotationRequested
    | NodeJoined
    | NodeRemoved
    | NodeTagged
    | NodeUntagged
    | PolicySet
    | PolicyCleared
    | EgressAdded
    | EgressRemoved
    | ExitSet
    | ExitCleared
    | IngressAdded
    | IngressRemoved
    | ClientCreated
    | ClientRemoved
    | DnsRecordAdded
    | DnsRecordRemoved
    | HookAdded
    | HookRemoved
    | AdminTokenCreated
    | AdminTokenRevoked
    | AdminTokenUsed
    | HostEndpointSeen
    | RelayAdded
    | RelayRemoved
    | RelayPairOpened
)

EVENT_TYPES: tuple[type[Event], ...] = get_args(AnyEvent)


def event_type(event: Event) -> str:
    """The stable tag of an event, e.g. "node.joined"."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def aggregate_of(event: AnyEvent) -> tuple[str, str]:
    """(aggregate kind, aggregate id) an event belongs to.

    The network owns its keys, its nodes and so its address pool: that is
    where overlay-address uniqueness is decided. The host owns its identity
    and endpoints.
    """
    match event:
        case AdminAdded(name=name) | AdminRemoved(name=name):
            return ("admin", name)
        case HookAdded(hook_id=hook) | HookRemoved(hook_id=hook):
            return ("hook", hook)
        case (
            AdminTokenCreated(name=name) | AdminTokenRevoked(name=name) | AdminTokenUsed(name=name)
        ):
            return ("token", name)
        case (
            HostRegistered(host_id=h)
            | HostEndpointObserved(host_id=h)
            | HostKeyRotated(host_id=h)
            | HostKeyRotationRequested(host_id=h)
            | HostEndpointSeen(host_id=h)
        ):
            return ("host", h)
        case (
            NetworkCreated(network=n)
            | NetworkUpdated(network=n)
            | NetworkDeleted(network=n)
            | EnrollmentKeyCreated(network=n)
            | EnrollmentKeyUsed(network=n)
            | EnrollmentKeyRevoked(network=n)
            | NodeJoined(network=n)
            | NodeRemoved(network=n)
            | NodeTagged(network=n)
            | NodeUntagged(network=n)
            | PolicySet(network=n)
            | PolicyCleared(network=n)
            | EgressAdded(network=n)
            | EgressRemoved(network=n)
            | ExitSet(network=n)
            | ExitCleared(network=n)
            | IngressAdded(network=n)
            | IngressRemoved(network=n)
            | ClientCreated(network=n)
            | ClientRemoved(network=n)
            | RelayAdded(network=n)
            | RelayRemoved(network=n)
            | RelayPairOpened(network=n)
            | DnsRecordAdded(network=n)
            | DnsRecordRemoved(network=n)
        ):
            return ("network", n)
    raise TypeError(f"unknown event {event!r}")  # pragma: no cover
