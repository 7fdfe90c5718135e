"""The topology: networks, enrollment keys, hosts and nodes, folded from events.

One fold serves two readers: the command service decides against it (its
write model) and the projection runner persists it to SQLite and derives each
host's desired WireGuard state from it.

`evolve` mutates the model in place (copying a model of thousands of nodes per
event would make replay quadratic) and returns what it touched, so that callers
persist and re-derive only that. It does no I/O and reads no clock: the same
events always give the same model.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from events.dns import default_domain, fqdn, node_label, normal, relative_name
from events.envelope import RecordedEvent
from events.model import (
    AdminAdded,
    AdminRemoved,
    AdminTokenCreated,
    AdminTokenRevoked,
    AdminTokenUsed,
    ClientCreated,
    ClientRemoved,
    DnsRecordAdded,
    DnsRecordRemoved,
    EgressAdded,
    EgressRemoved,
    EnrollmentKeyCreated,
    EnrollmentKeyRevoked,
    EnrollmentKeyUsed,
    ExitCleared,
    ExitSet,
    HookAdded,
    HookRemoved,
    HostEndpointObserved,
    HostEndpointSeen,
    HostKeyRotated,
    HostKeyRotationRequested,
    HostRegistered,
    IngressAdded,
    IngressRemoved,
    NetworkCreated,
    NetworkDeleted,
    NetworkUpdated,
    NodeJoined,
    NodeRemoved,
    NodeTagged,
    NodeUntagged,
    PolicyCleared,
    PolicySet,
    RelayAdded,
    RelayPairOpened,
    RelayRemoved,
)
from events.policy import Policy, PolicyDocument, PolicyError, parse_policy
from events.subjects import EVENTS_PREFIX
from projections.access import AccessIndex, Member

COMMAND_MEMORY = 100_000


@dataclass(frozen=True)
class Admin:
    name: str
    public_key: str
    role: str  # admin | network-admin | auditor
    networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class DnsRecord:
    """A custom name in a network's domain (relative to it), canonical."""

    name: str
    a: tuple[str, ...] = ()
    aaaa: tuple[str, ...] = ()
    cname: str = ""


@dataclass
class AdminToken:
    """A read API bearer token (`controlplane.rules.tokens`)."""

    name: str
    secret_sha256: str  # of the whole token
    role: str
    networks: tuple[str, ...]
    expires_at: float | None
    created_at: float
    revoked: bool = False
    last_used_at: float | None = None  # its last recorded use


@dataclass
class Network:
    name: str
    cidr: str
    listen_port: int
    mtu: int
    keepalive: int
    created_at: float
    # Last event that changed something every member's desired state holds
    # (a membership, a member's peer entry, the network's MTU): every
    # member's desired revision is at least this.
    revision: int = 0
    # The access policy in force (None: everyone reaches everyone), the text
    # it was set from and the event that set it; the policy before it (what
    # the last policy event changed from); who its rules match.
    policy: Policy | None = None
    policy_text: str = ""
    policy_seq: int = 0
    policy_error: str = ""  # why the recorded policy does not parse (it then allows nothing)
    previous_policy: Policy | None = None
    access: AccessIndex | None = None
    dns_domain: str = ""  # the suffix of its members' names (NETWORK.internal by default)
    # Custom names by their name relative to the domain.
    records: dict[str, DnsRecord] = field(default_factory=dict)
    # Egress gateways by node id; the last one a departure took away (what
    # it changed, read once by the sections' rules).
    gateways: dict[str, Gateway] = field(default_factory=dict)
    departed_gateway: Gateway | None = None
    # Ingress gateways (node ids) and external clients by name; the clients
    # the last removal of a gateway (or its node) took away, read once by
    # the sections' rules.
    ingress: set[str] = field(default_factory=set)
    clients: dict[str, Client] = field(default_factory=dict)
    departed_clients: tuple[Client, ...] = ()
    # Relays by node id, the pairs they forward by pair key ("HOSTA,HOSTB",
    # host ids sorted), and the pairs the last removal closed (read once by
    # the sections' rules).
    relays: dict[str, Relay] = field(default_factory=dict)
    relay_pairs: dict[str, RelayPair] = field(default_factory=dict)
    closed_pairs: tuple[RelayPair, ...] = ()

    def pairs_via(self, node_id: str) -> list[RelayPair]:
        """The pairs relay `node_id` forwards, by pair key."""
        return [p for _, p in sorted(self.relay_pairs.items()) if p.relay == node_id]

    def pairs_of_host(self, host_id: str) -> list[RelayPair]:
        """The relayed pairs `host_id` is one of, by pair key."""
        return [p for _, p in sorted(self.relay_pairs.items()) if host_id in p.hosts]

    def close_pairs(self, pairs: list[RelayPair]) -> None:
        for pair in pairs:
            self.relay_pairs.pop(pair.key, None)
        self.closed_pairs = tuple(pairs)

    def clients_via(self, node_id: str) -> list[Client]:
        """The clients of ingress gateway `node_id`, by name."""
        return [c for _, c in sorted(self.clients.items()) if c.via == node_id]

    def gateways_of(self, cidr: str) -> list[Gateway]:
        """The gateways forwarding to `cidr`, by node id."""
        return [g for _, g in sorted(self.gateways.items()) if cidr in g.ranges]


@dataclass(frozen=True)
class Gateway:
    """A node's egress: the ranges it forwards to, whether it masquerades,
    and its metric (among gateways of one range, members use the lowest)."""

    node_id: str
    ranges: tuple[str, ...]  # sorted
    nat: bool = True
    metric: int = 100


@dataclass(frozen=True)
class Client:
    """An external WireGuard client (no agent), reached through the ingress
    gateway `via` (a node id); its address is from the network's pool."""

    name: str
    public_key: str
    address: str
    via: str
    created_at: float
    full_tunnel: bool = False


@dataclass(frozen=True)
class Relay:
    """A node forwarding relayed pairs' datagrams on UDP ports low..high."""

    node_id: str
    host_id: str
    ports: tuple[int, int]  # low, high (inclusive)


@dataclass(frozen=True)
class RelayPair:
    """Two hosts relay `relay` (a node id) forwards between: `hosts[i]` sends
    to its port `ports[i]`."""

    relay: str
    hosts: tuple[str, str]  # sorted
    ports: tuple[int, int]
    asked_by: str

    @property
    def key(self) -> str:
        return pair_key(*self.hosts)

    def port_for(self, host_id: str) -> int:
        """The relay port `host_id` sends to."""
        return self.ports[self.hosts.index(host_id)]


def pair_key(a: str, b: str) -> str:
    """The key of the pair of hosts a and b (either order)."""
    return ",".join(sorted((a, b)))


@dataclass(frozen=True)
class Hook:
    """A webhook: events of types matching `events` are POSTed to `url`."""

    hook_id: str
    url: str
    events: str
    secret_sha256: str
    command_id: str  # of the command that added it: its secret derives from it
    added_seq: int  # delivery starts after this event
    added_at: float


@dataclass
class EnrollmentKey:
    key_id: str
    network: str
    secret_sha256: str
    uses: int | None
    expires_at: float | None
    created_at: float
    used: int = 0
    revoked: bool = False
    tags: tuple[str, ...] = ()  # nodes joining with it carry these

    def uses_left(self) -> int | None:
        return None if self.uses is None else max(self.uses - self.used, 0)


@dataclass
class Host:
    host_id: str
    name: str
    public_key: str
    listen_port: int
    endpoints: tuple[str, ...]
    registered_at: float
    # Last event that changed this host's own desired state in a way not
    # shared by a whole network (its interface, its memberships).
    revision: int = 0
    signing_key: str = ""  # what the host's own commands must be signed with
    key_epoch: int = 0  # raised when an admin asks for a new WireGuard key
    # Where a peer last saw it from ("ip:port", its NAT mapping), by whom.
    seen: str = ""
    seen_by: str = ""


@dataclass
class Node:
    node_id: str
    network: str
    host_id: str
    name: str
    address: str
    joined_at: float
    tags: frozenset[str] = frozenset()
    exit_via: str = ""  # the internet gateway (node id) its default route goes through

    def member(self) -> Member:
        """The node as a policy sees it."""
        return Member(self.name, self.address, self.tags)


class Touched(msgspec.Struct, frozen=True):
    """What one event changed: ids to persist, and how desired states moved.

    `reconfigured` hosts had their memberships change: they need their whole
    desired state (a snapshot). Which entries of which sections other hosts
    must re-read is for each section's rule to say (`projections.sections`);
    `projections.desired.fold` adds those as `rereads`.

    A msgspec Struct, not a frozen dataclass: a replay makes two per event, and
    a frozen dataclass of seven fields costs some 2 us to make, a Struct 0.1.
    """

    networks: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()
    nodes: frozenset[str] = frozenset()
    reconfigured: frozenset[str] = frozenset()
    # Filled in by projections.desired.fold: (section rule's rereads).
    rereads: tuple[Any, ...] = ()
    believed: bool = True  # False for an event seen but not applied

    @staticmethod
    def union(many: list[Touched]) -> Touched:
        return Touched(
            networks=frozenset().union(*(t.networks for t in many)),
            keys=frozenset().union(*(t.keys for t in many)),
            hosts=frozenset().union(*(t.hosts for t in many)),
            nodes=frozenset().union(*(t.nodes for t in many)),
            reconfigured=frozenset().union(*(t.reconfigured for t in many)),
            rereads=tuple(r for t in many for r in t.rereads),
        )


@dataclass
class Topology:
    networks: dict[str, Network] = field(default_factory=dict)
    keys: dict[str, EnrollmentKey] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    # Index: network -> node ids, host -> node ids, public key -> host id.
    nodes_by_network: dict[str, set[str]] = field(default_factory=dict)
    # Network -> its nodes' addresses (as integers), and a floor below which
    # every host address is taken: allocating is then O(1), not O(nodes).
    addresses: dict[str, set[int]] = field(default_factory=dict)
    address_floor: dict[str, int] = field(default_factory=dict)
    nodes_by_host: dict[str, set[str]] = field(default_factory=dict)
    host_by_public_key: dict[str, str] = field(default_factory=dict)
    # Keys of deleted networks -> their network, so that a join can say why it fails.
    retired_keys: dict[str, str] = field(default_factory=dict)
    # Optimistic concurrency: last stream sequence per aggregate subject.
    versions: dict[str, int] = field(default_factory=dict)
    last_network_seq: int = 0
    last_admin_seq: int = 0
    last_seq: int = 0
    # Admins who may sign commands, by public key.
    admins: dict[str, Admin] = field(default_factory=dict)
    hooks: dict[str, Hook] = field(default_factory=dict)
    # Read API bearer tokens by name, and the name of each by its digest.
    tokens: dict[str, AdminToken] = field(default_factory=dict)
    tokens_by_digest: dict[str, str] = field(default_factory=dict)
    # Once a signed event has been seen, unsigned ones are not believed (before
    # that, they are events written before the control plane signed them).
    signed_seen: bool = False
    # Events seen but not believed (forged onto the stream), for the log.
    refused: int = 0
    # The node the last removal dropped (its name: sections re-read it).
    last_dropped: Node | None = None
    # Command id -> stream sequence of its last event, for the most recent
    # COMMAND_MEMORY commands: a command sent twice is refused, not applied twice
    # (JetStream's own duplicate window is minutes; this outlives it). Ordered:
    # dropping a plain dict's oldest key (`next(iter(d))`) scans past every key
    # deleted before it, ~16 us per event once the memory is full.
    commands: OrderedDict[str, int] = field(default_factory=OrderedDict)

    def version(self, subject: str) -> int:
        return self.versions.get(subject, 0)

    def nodes_of_network(self, network: str) -> list[Node]:
        return sorted(
            (self.nodes[n] for n in self.nodes_by_network.get(network, ())),
            key=lambda node: node.node_id,
        )

    def nodes_of_host(self, host_id: str) -> list[Node]:
        return sorted(
            (self.nodes[n] for n in self.nodes_by_host.get(host_id, ())),
            key=lambda node: node.network,
        )

    def networks_of_host(self, host_id: str) -> set[str]:
        return {self.nodes[n].network for n in self.nodes_by_host.get(host_id, ())}

    def host_by_signing_key(self, key: str) -> str | None:
        """The host that registered this signing key, preferring one that is
        still in a network (a machine that lost its WireGuard key but kept its
        signing key joins again as a new host). A scan: this runs once per
        broker connection, not per message."""
        if not key:
            return None
        found = None
        for host in self.hosts.values():
            if host.signing_key == key:
                if self.nodes_by_host.get(host.host_id):
                    return host.host_id
                found = host.host_id
        return found

    def revision_of(self, host_id: str) -> int:
        """The host's desired-state revision: the last event that changed it."""
        host = self.hosts.get(host_id)
        revision = host.revision if host is not None else 0
        for node_id in self.nodes_by_host.get(host_id, ()):
            network = self.networks.get(self.nodes[node_id].network)
            if network is not None and network.revision > revision:
                revision = network.revision
        return revision

    def mark_changed(self, host_ids: Iterable[str], networks: Iterable[str], seq: int) -> None:
        """Event `seq` changed these hosts' desired states, and those of every
        member of these networks: their revisions move to it."""
        for host_id in host_ids:
            host = self.hosts.get(host_id)
            if host is not None:
                host.revision = seq
        for name in networks:
            network = self.networks.get(name)
            if network is not None:
                network.revision = seq

    def dns_name(self, node: Node) -> str | None:
        """The node's name in DNS (NODE.DOMAIN); None when its name cannot be one."""
        network = self.networks.get(node.network)
        label = node_label(node.name)
        if network is None or label is None:
            return None
        return fqdn(label, network.dns_domain)

    def add_node(self, node: Node) -> None:
        self.nodes[node.node_id] = node
        self.nodes_by_network.setdefault(node.network, set()).add(node.node_id)
        self.nodes_by_host.setdefault(node.host_id, set()).add(node.node_id)
        self.claim_address(node.network, node.address)
        network = self.networks.get(node.network)
        if network is not None and network.access is not None:
            network.access.add(node.node_id, node.member())

    def drop_node(self, node_id: str) -> Node | None:
        node = self.nodes.pop(node_id, None)
        self.last_dropped = node
        if node is not None:
            self.nodes_by_network.get(node.network, set()).discard(node_id)
            self.nodes_by_host.get(node.host_id, set()).discard(node_id)
            self.free_address(node.network, node.address)
            network = self.networks.get(node.network)
            if network is not None and network.access is not None:
                network.access.remove(node_id)
            if network is not None:
                network.departed_gateway = network.gateways.pop(node_id, None)
                network.ingress.discard(node_id)
                self.drop_clients(network, network.clients_via(node_id))
                network.relays.pop(node_id, None)
                network.close_pairs(
                    [
                        p
                        for p in network.relay_pairs.values()
                        if p.relay == node_id or node.host_id in p.hosts
                    ]
                )
        return node

    def claim_address(self, network: str, address: str) -> None:
        """`address` (a node's or a client's) is taken in `network`'s pool."""
        used = self.addresses.setdefault(network, set())
        used.add(int(ipaddress.ip_address(address)))
        floor = self.address_floor.get(network)
        if floor is None:
            known = self.networks.get(network)
            floor = host_range(ipaddress.ip_network(known.cidr))[0] if known else 0
        while floor in used:  # amortized O(1): the floor only rises here
            floor += 1
        self.address_floor[network] = floor

    def free_address(self, network: str, address: str) -> None:
        freed = int(ipaddress.ip_address(address))
        self.addresses.get(network, set()).discard(freed)
        if freed < self.address_floor.get(network, 0):
            self.address_floor[network] = freed

    def add_client(self, network: Network, client: Client) -> None:
        network.clients[client.name] = client
        self.claim_address(network.name, client.address)

    def drop_clients(self, network: Network, clients: list[Client]) -> None:
        """Take `clients` out of `network`, remembered as its departed clients."""
        for client in clients:
            network.clients.pop(client.name, None)
            self.free_address(network.name, client.address)
        network.departed_clients = tuple(clients)

    def set_policy(self, network: Network, policy: Policy | None) -> None:
        """Put `policy` in force in `network` (None: allow everything) and index it."""
        network.previous_policy = network.policy
        network.policy = policy
        network.access = (
            None
            if policy is None
            else AccessIndex(
                policy,
                ((n, self.nodes[n].member()) for n in self.nodes_by_network.get(network.name, ())),
            )
        )

    def members_of(self, network: str) -> frozenset[str]:
        """The hosts with a node in `network`."""
        return frozenset(self.nodes[n].host_id for n in self.nodes_by_network.get(network, ()))


def host_range(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> tuple[int, int]:
    """The first and last host address, as `hosts()` has them: IPv4 skips the
    network and broadcast addresses (not in a /31 or /32), IPv6 the
    subnet-router anycast address (not in a /127 or /128)."""
    low, high = int(network.network_address), int(network.broadcast_address)
    if network.max_prefixlen - network.prefixlen <= 1:
        return low, high
    return low + 1, high - 1 if network.version == 4 else high


_NETWORK_SUBJECTS = f"{EVENTS_PREFIX}.network."
_ADMIN_SUBJECTS = f"{EVENTS_PREFIX}.admin."
_NOT_BELIEVED = Touched(believed=False)


def evolve(topology: Topology, recorded: RecordedEvent) -> Touched:
    """Apply one stored event to the topology; return what it touched.

    Events at or below the aggregate's version are skipped (already applied), so
    a consumer may safely see an event twice.
    """
    subject = recorded.subject
    if recorded.seq <= topology.versions.get(subject, 0):
        return _NOT_BELIEVED
    topology.versions[subject] = recorded.seq
    topology.last_seq = max(topology.last_seq, recorded.seq)
    if subject.startswith(_NETWORK_SUBJECTS):
        topology.last_network_seq = max(topology.last_network_seq, recorded.seq)
    elif subject.startswith(_ADMIN_SUBJECTS):
        topology.last_admin_seq = max(topology.last_admin_seq, recorded.seq)
    # Versions move for every message on a subject (the stream's optimistic
    # checks count them all); only authentic events change the model.
    if recorded.signature == "valid":
        topology.signed_seen = True
    elif recorded.signature == "invalid" or (
        recorded.signature == "unsigned" and topology.signed_seen
    ):
        topology.refused += 1
        return _NOT_BELIEVED
    command_id = recorded.envelope.command_id
    if command_id:
        commands = topology.commands
        commands.pop(command_id, None)  # re-insert: most recent last
        commands[command_id] = recorded.seq
        if len(commands) > COMMAND_MEMORY:
            commands.popitem(last=False)
    at = recorded.envelope.time

    match recorded.event:
        # The commonest event in a live network first (cases are tried in order).
        case HostEndpointObserved() as e:
            host = topology.hosts.get(e.host_id)
            if host is not None:
                host.endpoints = e.endpoints
                host.listen_port = e.listen_port
            return Touched(hosts=frozenset((e.host_id,)))
        case HostEndpointSeen() as e:
            host = topology.hosts.get(e.host_id)
            if host is not None:
                host.seen, host.seen_by = e.endpoint, e.seen_by
            return Touched(hosts=frozenset((e.host_id,)))
        case AdminAdded() as e:
            topology.admins[e.public_key] = Admin(e.name, e.public_key, e.role, e.networks)
            return Touched()
        case AdminRemoved(name=name):
            for admin_key, admin in list(topology.admins.items()):
                if admin.name == name:
                    del topology.admins[admin_key]
            return Touched()
        case HookAdded() as e:
            topology.hooks[e.hook_id] = Hook(
                e.hook_id, e.url, e.events, e.secret_sha256, command_id, recorded.seq, at
            )
            return Touched()
        case HookRemoved(hook_id=hook_id):
            topology.hooks.pop(hook_id, None)
            return Touched()
        case AdminTokenCreated() as e:
            replaced = topology.tokens.get(e.name)
            if replaced is not None:
                topology.tokens_by_digest.pop(replaced.secret_sha256, None)
            topology.tokens[e.name] = AdminToken(
                e.name, e.secret_sha256, e.role, e.networks, e.expires_at, created_at=at
            )
            topology.tokens_by_digest[e.secret_sha256] = e.name
            return Touched()
        case AdminTokenRevoked(name=name):
            token = topology.tokens.get(name)
            if token is not None:
                token.revoked = True
            return Touched()
        case AdminTokenUsed(name=name):
            token = topology.tokens.get(name)
            if token is not None:
                token.last_used_at = at
            return Touched()
        case NetworkCreated() as e:
            topology.networks[e.network] = Network(
                name=e.network,
                cidr=e.cidr,
                listen_port=e.listen_port,
                mtu=e.mtu,
                keepalive=e.keepalive,
                created_at=at,
                revision=recorded.seq,
                dns_domain=normal(e.dns_domain) or default_domain(e.network),
            )
            return Touched(networks=frozenset({e.network}))
        case NetworkUpdated() as e:
            network = topology.networks.get(e.network)
            if network is None:
                return Touched(networks=frozenset({e.network}))
            network.mtu = network.mtu if e.mtu is None else e.mtu
            network.keepalive = network.keepalive if e.keepalive is None else e.keepalive
            domain = normal(e.dns_domain) if e.dns_domain is not None else network.dns_domain
            if domain == network.dns_domain:
                return Touched(networks=frozenset({e.network}))
            # Every name of its members moves: each gets a snapshot.
            network.dns_domain = domain
            members = topology.members_of(e.network)
            return Touched(networks=frozenset({e.network}), reconfigured=members)
        case DnsRecordAdded() | DnsRecordRemoved() as e:
            network = topology.networks.get(e.network)
            if network is None:
                return Touched()
            # The event holds the name as the admin signed it (relative or
            # whole): the rules checked it is inside the domain of the time.
            try:
                name = relative_name(e.name, network.dns_domain)
                if isinstance(e, DnsRecordAdded):
                    network.records[name] = dns_record(name, e.a, e.aaaa, e.cname)
                else:
                    network.records.pop(name, None)
            except ValueError:  # not what the rules let through: changes nothing
                return Touched()
            return Touched(networks=frozenset({e.network}))
        case NetworkDeleted(network=name):
            topology.networks.pop(name, None)
            key_ids = frozenset(k for k, key in topology.keys.items() if key.network == name)
            for key_id in key_ids:
                del topology.keys[key_id]
                topology.retired_keys[key_id] = name
            removed = [topology.drop_node(n) for n in list(topology.nodes_by_network.get(name, ()))]
            topology.nodes_by_network.pop(name, None)
            topology.addresses.pop(name, None)
            topology.address_floor.pop(name, None)
            members = frozenset(n.host_id for n in removed if n)
            return Touched(
                networks=frozenset({name}),
                keys=key_ids,
                nodes=frozenset(n.node_id for n in removed if n),
                hosts=members,
                reconfigured=members,
            )
        case EnrollmentKeyCreated() as e:
            topology.keys[e.key_id] = EnrollmentKey(
                key_id=e.key_id,
                network=e.network,
                secret_sha256=e.secret_sha256,
                uses=e.uses,
                expires_at=e.expires_at,
                created_at=at,
                tags=e.tags,
            )
            return Touched(keys=frozenset({e.key_id}))
        case EnrollmentKeyUsed(key_id=key_id):
            key = topology.keys.get(key_id)
            if key is not None:
                key.used += 1
            return Touched(keys=frozenset({key_id}))
        case EnrollmentKeyRevoked(key_id=key_id):
            key = topology.keys.get(key_id)
            if key is not None:
                key.revoked = True
            return Touched(keys=frozenset({key_id}))
        case HostRegistered() as e:
            topology.hosts[e.host_id] = Host(
                host_id=e.host_id,
                name=e.name,
                public_key=e.public_key,
                listen_port=e.listen_port,
                endpoints=e.endpoints,
                registered_at=at,
                signing_key=e.signing_key,
            )
            topology.host_by_public_key[e.public_key] = e.host_id
            return Touched(hosts=frozenset({e.host_id}), reconfigured=frozenset({e.host_id}))
        case HostKeyRotationRequested() as e:
            host = topology.hosts.get(e.host_id)
            if host is None:
                return Touched()
            host.key_epoch = e.epoch
            return Touched(hosts=frozenset({e.host_id}))
        case HostKeyRotated() as e:
            host = topology.hosts.get(e.host_id)
            if host is None:
                return Touched()
            topology.host_by_public_key.pop(host.public_key, None)
            host.public_key = e.public_key
            topology.host_by_public_key[e.public_key] = e.host_id
            return Touched(hosts=frozenset({e.host_id}))
        case NodeJoined() as e:
            topology.add_node(
                Node(
                    node_id=e.node_id,
                    network=e.network,
                    host_id=e.host_id,
                    name=e.name,
                    address=e.address,
                    joined_at=at,
                    tags=frozenset(e.tags),
                )
            )
            return Touched(
                nodes=frozenset({e.node_id}),
                hosts=frozenset({e.host_id}),
                reconfigured=frozenset({e.host_id}),
            )
        case NodeRemoved() as e:
            leaving = topology.nodes.get(e.node_id)
            network = topology.networks.get(leaving.network) if leaving is not None else None
            # A network's relays and relayed pairs are persisted whole with it.
            relayed = network is not None and bool(network.relays)
            topology.drop_node(e.node_id)
            return Touched(
                networks=frozenset({network.name}) if relayed and network else frozenset(),
                nodes=frozenset({e.node_id}),
                hosts=frozenset({e.host_id}),
                reconfigured=frozenset({e.host_id}),
            )
        case NodeTagged() | NodeUntagged() as e:
            node = topology.nodes.get(e.node_id)
            if node is None:
                return Touched()
            tags = frozenset(e.tags)
            node.tags = node.tags | tags if isinstance(e, NodeTagged) else node.tags - tags
            network = topology.networks.get(node.network)
            if network is not None and network.access is not None:
                network.access.retag(node.node_id, node.tags)
            return Touched(nodes=frozenset({e.node_id}))
        case PolicySet() | PolicyCleared() as e:
            network = topology.networks.get(e.network)
            if network is None:
                return Touched()
            was_open = network.policy is None
            if isinstance(e, PolicySet):
                policy, network.policy_error = compiled(e.document)
                topology.set_policy(network, policy)
                network.policy_text = e.document
            else:
                topology.set_policy(network, None)
                network.policy_text = network.policy_error = ""
            network.policy_seq = recorded.seq
            # From or to allowing everything, every member's peers and firewall
            # change as a whole: each gets a snapshot. Between two policies,
            # the sections' rules say whose entries the changed rules moved.
            members = topology.members_of(e.network)
            opened_or_closed = was_open != (network.policy is None)
            return Touched(
                networks=frozenset({e.network}),
                reconfigured=members if opened_or_closed else frozenset(),
            )
        case EgressAdded() | EgressRemoved() as e:
            network = topology.networks.get(e.network)
            if network is None or e.node_id not in topology.nodes:
                return Touched()
            was = network.gateways.get(e.node_id)
            if isinstance(e, EgressAdded):
                ranges = tuple(sorted({*(was.ranges if was else ()), *e.ranges}))
                network.gateways[e.node_id] = Gateway(e.node_id, ranges, e.nat, e.metric)
            elif was is not None:
                ranges = tuple(r for r in was.ranges if e.ranges and r not in e.ranges)
                if ranges:
                    network.gateways[e.node_id] = Gateway(e.node_id, ranges, was.nat, was.metric)
                else:
                    del network.gateways[e.node_id]
            return Touched(networks=frozenset({e.network}), nodes=frozenset({e.node_id}))
        case ExitSet() | ExitCleared() as e:
            node = topology.nodes.get(e.node_id)
            if node is None:
                return Touched()
            node.exit_via = e.via if isinstance(e, ExitSet) else ""
            return Touched(nodes=frozenset({e.node_id}))
        case IngressAdded() | IngressRemoved() as e:
            network = topology.networks.get(e.network)
            if network is None or e.node_id not in topology.nodes:
                return Touched()
            if isinstance(e, IngressAdded):
                network.ingress.add(e.node_id)
            else:
                network.ingress.discard(e.node_id)
                topology.drop_clients(network, network.clients_via(e.node_id))
            return Touched(networks=frozenset({e.network}), nodes=frozenset({e.node_id}))
        case ClientCreated() as e:
            network = topology.networks.get(e.network)
            if network is None or e.via not in network.ingress or e.name in network.clients:
                return Touched()
            client = Client(
                name=e.name,
                public_key=e.public_key,
                address=e.address,
                via=e.via,
                created_at=at,
                full_tunnel=e.full_tunnel,
            )
            topology.add_client(network, client)
            return Touched(networks=frozenset({e.network}))
        case ClientRemoved() as e:
            network = topology.networks.get(e.network)
            gone = network.clients.get(e.name) if network is not None else None
            if network is None or gone is None:
                return Touched()
            topology.drop_clients(network, [gone])
            return Touched(networks=frozenset({e.network}))
        case RelayAdded() as e:
            network = topology.networks.get(e.network)
            if network is None or e.node_id not in topology.nodes:
                return Touched()
            network.relays[e.node_id] = Relay(e.node_id, e.host_id, e.ports)
            return Touched(networks=frozenset({e.network}))
        case RelayRemoved() as e:
            network = topology.networks.get(e.network)
            if network is None or network.relays.pop(e.node_id, None) is None:
                return Touched()
            network.close_pairs(network.pairs_via(e.node_id))
            return Touched(networks=frozenset({e.network}))
        case RelayPairOpened() as e:
            network = topology.networks.get(e.network)
            pair = RelayPair(e.relay, e.hosts, e.ports, e.asked_by)
            if network is None or e.relay not in network.relays or pair.key in network.relay_pairs:
                return Touched()
            network.relay_pairs[pair.key] = pair
            return Touched(networks=frozenset({e.network}))
    return Touched()  # pragma: no cover - every event type is matched above


def dns_record(name: str, a: Iterable[str], aaaa: Iterable[str], cname: str) -> DnsRecord:
    """A record in canonical form (addresses as `ipaddress` prints them,
    each once, sorted)."""
    return DnsRecord(
        name=name,
        a=tuple(sorted({str(ipaddress.ip_address(x)) for x in a})),
        aaaa=tuple(sorted({str(ipaddress.ip_address(x)) for x in aaaa})),
        cname=normal(cname),
    )


def compiled(document: str) -> tuple[Policy, str]:
    """A recorded policy's parsed form, and why it does not parse ("" when it
    does). It was validated when it was set; if this version cannot parse it,
    it fails closed (nothing allowed) rather than opening the network."""
    try:
        return parse_policy(document), ""
    except PolicyError as exc:
        return Policy(rules=(), document=PolicyDocument()), str(exc)
