"""Commands (requests to change something) and their replies: the protocol
between the CLI / agents and the command service.

Commands are closed-world: an unknown field is an error, so a typo never
passes silently. Commands are imperative; the events they produce are past tense.
Sent as JSON to `netmesh.cmd.<verb>`; the reply is `Reply`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, get_args

import msgspec

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Mtu = Annotated[int, msgspec.Meta(ge=576, le=9000)]
Keepalive = Annotated[int, msgspec.Meta(ge=0, le=3600)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=63)]


class Command(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    command_id: str = ""  # set by the sender; makes a retried command harmless
    # When the sender signed it (seconds since the epoch): with the command id,
    # what makes a captured admin command useless to replay.
    signed_at: float = 0.0


class CreateNetwork(Command, frozen=True, tag="network.create"):
    name: str
    cidr: str
    listen_port: Port = 51820
    mtu: Mtu = 1420
    keepalive: Keepalive = 25
    dns_domain: str = ""  # "": NAME.internal


class UpdateNetwork(Command, frozen=True, tag="network.update"):
    """Change a network's MTU, keepalive or DNS domain (None: leave it); its
    members follow in place. Ports belong to hosts (one interface serves all
    its networks)."""

    name: str
    mtu: Mtu | None = None
    keepalive: Keepalive | None = None
    dns_domain: str | None = None


class DeleteNetwork(Command, frozen=True, tag="network.delete"):
    name: str
    force: bool = False  # delete even with nodes in it (they are disconnected)


class CreateEnrollmentKey(Command, frozen=True, tag="key.create"):
    network: str
    uses: Annotated[int, msgspec.Meta(ge=1)] | None = 1  # None = unlimited
    expires_in: Annotated[float, msgspec.Meta(gt=0)] | None = None  # seconds; None = never
    tags: tuple[str, ...] = ()  # nodes joining with it carry these


class RevokeEnrollmentKey(Command, frozen=True, tag="key.revoke"):
    key_id: str


class Join(Command, frozen=True, tag="join"):
    public_key: str
    name: Name
    # The enrollment token. An agent sends it beside the payload it signs (a
    # header), and signs `token_sha256` instead: the signed join is kept as
    # its proof, and a token in the log could be copied by anyone reading it.
    token: str = ""
    endpoints: tuple[str, ...] = ()
    listen_port: Port | None = None  # None: the network's listen port
    # The host's own Ed25519 key (base64): the join is signed with it, and so
    # must be everything the host sends later (endpoint reports, leaving).
    signing_key: str = ""
    token_sha256: str = ""  # of the token (events.signing.token_digest)


class RemoveNode(Command, frozen=True, tag="node.remove"):
    node: str  # node id, or NETWORK/NAME, or a name unique across networks


class TagNode(Command, frozen=True, tag="node.tag"):
    """Add tags to a node (those it carries already are left as they are)."""

    node: str  # node id, or NETWORK/NAME, or a name unique across networks
    tags: tuple[str, ...]


class UntagNode(Command, frozen=True, tag="node.untag"):
    """Take tags from a node (those it does not carry are ignored)."""

    node: str
    tags: tuple[str, ...]


class SetPolicy(Command, frozen=True, tag="policy.set"):
    """Put an access policy in force in a network: its JSON5 text, as written
    (validated by the rules against the network's members)."""

    network: str
    document: str


class ClearPolicy(Command, frozen=True, tag="policy.clear"):
    """The network allows everything again."""

    network: str


class AddDnsRecord(Command, frozen=True, tag="dns.add"):
    """A name in a network's domain: NAME relative to it (`db`) or whole
    (`db.office.internal`), with addresses (A, AAAA) or an alias (CNAME)."""

    network: str
    name: str
    a: tuple[str, ...] = ()
    aaaa: tuple[str, ...] = ()
    cname: str = ""


class RemoveDnsRecord(Command, frozen=True, tag="dns.remove"):
    network: str
    name: str  # relative or whole, as for AddDnsRecord


class ReportEndpoint(Command, frozen=True, tag="endpoint.report"):
    host_id: str
    endpoints: tuple[str, ...]
    listen_port: Port | None = None  # None: keep the host's port


class RequestKeyRotation(Command, frozen=True, tag="node.rotate_key"):
    """An admin asks a node's host to make a new WireGuard key."""

    node: str


class RotateHostKey(Command, frozen=True, tag="host.rotate_key"):
    """A host announces its new WireGuard public key (`netmesh agent rotate-key`):
    peers switch to it in place."""

    host_id: str
    public_key: str


class Role(StrEnum):
    """Who an admin key is: what its holder may sign."""

    ADMIN = "admin"  # everything
    NETWORK_ADMIN = "network-admin"  # the commands about their networks
    AUDITOR = "auditor"  # nothing: queries and the event log only


# Plain strings (click shows an Enum's names, not its values).
ROLES: tuple[str, ...] = tuple(role.value for role in Role)


class AddAdmin(Command, frozen=True, tag="admin.add"):
    """Someone else may sign commands: `admin` (everything), `network-admin`
    (their networks only), `auditor` (queries and the event log only)."""

    name: Name
    public_key: str  # base64 Ed25519 (`netmesh admin keygen` makes one)
    role: str = "admin"
    networks: tuple[str, ...] = ()


class RemoveAdmin(Command, frozen=True, tag="admin.remove"):
    name: str


class AddHook(Command, frozen=True, tag="hook.add"):
    """POST the events whose type matches `events` to `url`, in order, each
    signed with HMAC-SHA256 under a secret the control plane makes."""

    url: str
    events: str = "*"


class RemoveHook(Command, frozen=True, tag="hook.remove"):
    hook_id: str


class CreateAdminToken(Command, frozen=True, tag="token.create"):
    """A bearer token for the read API and the dashboard (`--http`); what its
    role may read is what that role's admin may query."""

    name: Name
    role: str = "auditor"
    networks: tuple[str, ...] = ()  # a network-admin token's networks
    expires_in: Annotated[float, msgspec.Meta(gt=0)] | None = None  # seconds; None = never


class RevokeAdminToken(Command, frozen=True, tag="token.revoke"):
    name: str


class LeaveNetworks(Command, frozen=True, tag="host.leave"):
    """A host takes itself out of one network, or all (`netmesh agent leave`)."""

    host_id: str
    network: str | None = None


class AddEgress(Command, frozen=True, tag="egress.add"):
    """Make a node an egress gateway to `ranges` (or give it more ranges)."""

    node: str  # node id, or NETWORK/NAME, or a name unique across networks
    ranges: tuple[str, ...]
    nat: bool = True
    metric: int = 100


class RemoveEgress(Command, frozen=True, tag="egress.remove"):
    """Take `ranges` from an egress gateway (none: all of them)."""

    node: str
    ranges: tuple[str, ...] = ()


class SetExit(Command, frozen=True, tag="node.exit"):
    """Send `node`'s default route through `via`, an internet gateway of its
    network (a node name there, or any way of naming a node)."""

    node: str
    via: str


class ClearExit(Command, frozen=True, tag="node.exit_off"):
    """`node` routes as its host does again."""

    node: str


class AddIngress(Command, frozen=True, tag="ingress.add"):
    """Make a node an ingress gateway: external clients connect through it."""

    node: str


class RemoveIngress(Command, frozen=True, tag="ingress.remove"):
    """A node stops being an ingress gateway; its clients are removed."""

    node: str


class CreateClient(Command, frozen=True, tag="client.create"):
    """Register an external client by its public key (the CLI or the device
    made the key pair: the private key is never sent)."""

    network: str
    name: str
    via: str  # the ingress gateway: a node name in `network`, or any way of naming a node
    public_key: str
    full_tunnel: bool = False  # everything through `via`, which must be an internet gateway


class RemoveClient(Command, frozen=True, tag="client.remove"):
    network: str
    name: str


# -- NAT traversal (controlplane/rules/nat.py) ---------------------------------


class ReportSeenEndpoint(Command, frozen=True, tag="endpoint.seen"):
    """Host `host_id`'s device saw the peer `peer_key` at `endpoint` (the
    source of its packets after a handshake)."""

    host_id: str
    peer_key: str
    endpoint: str


class AddRelay(Command, frozen=True, tag="relay.add"):
    """Make a node a relay for pairs of its network's hosts that cannot reach
    each other directly (it needs an endpoint everyone reaches)."""

    node: str
    network: str = ""  # when given, the node must be in it
    ports: str = ""  # "LOW-HIGH": the UDP ports it may forward on (two per pair)


class RemoveRelay(Command, frozen=True, tag="relay.remove"):
    """A node stops relaying; its pairs go back to trying direct."""

    node: str


class RequestRelay(Command, frozen=True, tag="relay.request"):
    """Host `host_id` cannot reach the peer `peer_key` directly: a relay of a
    network they share should forward between them."""

    host_id: str
    peer_key: str


# The protocol's commands, each once. What the control plane does with each
# (who may send it, what it produces) is its spec, in controlplane/rules/.
AnyCommand = (
    CreateNetwork
    | UpdateNetwork
    | DeleteNetwork
    | CreateEnrollmentKey
    | RevokeEnrollmentKey
    | Join
    | RemoveNode
    | ReportEndpoint
    | LeaveNetworks
    | RotateHostKey
    | AddAdmin
    | RemoveAdmin
    | RequestKeyRotation
    | TagNode
    | UntagNode
    | SetPolicy
    | ClearPolicy
    | AddEgress
    | RemoveEgress
    | SetExit
    | ClearExit
    | AddIngress
    | RemoveIngress
    | CreateClient
    | RemoveClient
    | AddDnsRecord
    | RemoveDnsRecord
    | AddHook
    | RemoveHook
    | CreateAdminToken
    | RevokeAdminToken
    | ReportSeenEndpoint
    | AddRelay
    | RemoveRelay
    | RequestRelay
)

COMMAND_TYPES: tuple[type[Command], ...] = get_args(AnyCommand)
VERBS: dict[str, type[Command]] = {str(cls.__struct_config__.tag): cls for cls in COMMAND_TYPES}


class ErrorCode(StrEnum):
    """Why a command or query was refused: stable, for programs (the message is
    for people). A StrEnum, so on the wire it is the plain string."""

    INVALID = "invalid"  # malformed, or against a rule about its own fields
    NOT_FOUND = "not_found"  # it names something that does not exist
    CONFLICT = "conflict"  # against what exists (a name taken, the last admin...)
    AMBIGUOUS = "ambiguous"  # a name that fits several things: say which
    EXHAUSTED = "exhausted"  # an enrollment key used up, a network out of addresses
    EXPIRED = "expired"  # an enrollment key past its time
    REVOKED = "revoked"  # an enrollment key revoked
    INVALID_TOKEN = "invalid_token"  # an enrollment token that does not authenticate
    UNAUTHORIZED = "unauthorized"  # not signed, or not by someone who may
    # This command id was taken by another command (or by one applied before
    # answers were recorded): send a new one. (A retry of the same command
    # gets its original answer instead, with `repeated`.)
    DUPLICATE = "duplicate"
    RATE_LIMITED = "rate_limited"  # too many failures: retry later
    BUSY = "busy"  # too many concurrent changes: retry
    UNAVAILABLE = "unavailable"  # the event store did not answer: retry
    INTERNAL = "internal"  # a bug: see the server log
    UPGRADE_REQUIRED = "upgrade_required"  # an agent too old for this control plane


class Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every command and query answer. `error` is set (with a stable `code`) on refusal."""

    ok: bool
    result: Any = None
    error: str | None = None
    # An ErrorCode, decoded as a plain string: a client reads the codes a newer
    # server may add instead of failing on the whole reply.
    code: str | None = None
    seq: int | None = None  # stream sequence of the last event the command appended
    # The answer the command got the first time its id was seen, given again:
    # nothing was done now (a retry whose first answer was lost).
    repeated: bool = False

    @classmethod
    def refused(cls, code: ErrorCode, error: str) -> Reply:
        return cls(ok=False, code=code, error=error)


def command_verb(command: Command) -> str:
    return str(type(command).__struct_config__.tag)
