"""Who may do what on the broker: the control plane answers NATS's auth callout.

Every connection except the control plane's own is put to the control plane
(`$SYS.REQ.USER.AUTH`), which decides from its current topology and answers
with a user JWT listing exactly what that connection may publish and subscribe:

- a host (its nkey is the Ed25519 key it registered at join, and it is still a
  node somewhere): a consumer of its own desired subject that the control plane
  creates for it (delivering to its inbox), its own reports and resync
  requests, the host commands, its own inbox;
- an enrolling agent (a key the control plane does not know yet, plus an
  enrollment token whose key and secret match, usable or not: the join says
  why not): `join` and its own inbox, for two minutes;
- an admin or network admin (the admin key they sign commands with): commands,
  queries and reading the event stream; an auditor: queries and events only.

Why auth callout and not JWTs minted ahead of time (both checked here, see
STACK.md): the control plane already holds every fact a decision needs (hosts,
admins and roles, enrollment keys), so the broker asks it and there is nothing
to push, expire or keep in sync; removing a node or an admin is one event, and
the next connection is refused by the same rule that admitted it. The price:
while no control plane is running, nothing new can connect (connected agents
keep their connections and their WireGuard state; an agent that loses its
connection runs from its cache and retries until a control plane answers).

Pure decisions here (`grant_for`, `user_claims`, `server_config`); the
callout service and the connection kicking are the I/O at the edge.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import structlog
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from controlplane.rules import verbs_sent_by
from controlplane.rules.keys import throttle_bucket
from controlplane.rules.spec import Sender
from controlplane.throttle import FailureWindow
from events import natsid
from events.model import AdminRemoved, AnyEvent, NetworkDeleted, NodeRemoved
from events.reports import APPLIED
from events.subjects import (
    COMMAND_PREFIX,
    EVENTS_STREAM,
    QUERY_PREFIX,
    command_subject,
    consume_subject,
    read_events_subject,
    report_subject,
    resync_subject,
)
from events.tokens import InvalidToken, parse_token, secret_digest
from projections.topology import Topology

log = structlog.get_logger("netmesh.brokerauth")

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
# Users the callout admits live in the default account; the control plane's
# own user is declared in the config (and skips the callout).
ACCOUNT = "$G"
# The commands an enrolling agent may send, and a host (which may also join
# another network): from the commands' specs.
ENROLL_VERBS = verbs_sent_by(Sender.ENROLLING)
HOST_VERBS = verbs_sent_by(Sender.HOST, Sender.ENROLLING)
ENROLL_LIFETIME = 120  # seconds an enrolling agent's connection may last
SWEEP_INTERVAL = 60.0  # how often connections are checked against who is admitted

# Reading the event stream: its info and single messages; a consumer of it
# only through the control plane (`netmesh.readevents.<nkey>`, delivering into
# the reader's inbox), since a consumer a client makes may deliver anywhere.
_EVENT_READER = (
    "$JS.API.INFO",
    f"$JS.API.STREAM.INFO.{EVENTS_STREAM}",
    f"$JS.API.STREAM.MSG.GET.{EVENTS_STREAM}",
)


# Why a connection is refused, as a bounded code (metrics label by it).
REFUSAL_REASONS = (
    "anonymous",  # no key
    "bad_signature",  # the nonce is not signed by the key presented
    "unknown_key",  # not an admin or a host in a network, and no token
    "invalid_token",  # an enrollment token that does not parse
    "rate_limited",  # too many failed attempts with this enrollment key
    "unknown_token",  # an enrollment token this control plane does not know
)


class Refused(Exception):
    """Why a connection is not admitted (logged by the server, not shown to the
    client); `reason` is one of REFUSAL_REASONS."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class BrokerCounter(Protocol):
    """What the gate tells about its decisions (`controlplane.metrics`)."""

    def broker_admitted(self, identity: str) -> None: ...

    def broker_refused(self, reason: str) -> None: ...


@dataclass(frozen=True)
class BrokerKeys:
    """The control plane's NATS identities, derived from its signing key, so
    replicas sharing `signing.key` share them."""

    issuer: SigningKey  # signs the user JWTs the callout hands out
    controlplane: SigningKey  # the control plane's own connection
    system: SigningKey  # the system account: connection lists and kicks

    @classmethod
    def derive(cls, root: SigningKey) -> BrokerKeys:
        return cls(
            issuer=natsid.derived_key(root, "auth-callout-issuer"),
            controlplane=natsid.derived_key(root, "controlplane"),
            system=natsid.derived_key(root, "system"),
        )


@dataclass(frozen=True)
class Grant:
    """A connection admitted as `name`, with what it may publish and subscribe."""

    name: str  # host:<id> | admin:<name> | enroll:<key id>
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    # Seconds until the broker closes the connection (None: while admitted;
    # the control plane disconnects identities that lose access).
    lifetime: int | None = None
    max_subscriptions: int = 100


def host_name(host_id: str) -> str:
    return f"host:{host_id}"


def admin_name(name: str) -> str:
    return f"admin:{name}"


def host_grant(host_id: str, nkey: str) -> Grant:
    return Grant(
        name=host_name(host_id),
        publish=(
            *(command_subject(verb) for verb in HOST_VERBS),
            report_subject(host_id, APPLIED),
            resync_subject(host_id),
            # Its desired state comes through a consumer the control plane makes
            # for it, delivering to its inbox; it may not create consumers.
            consume_subject(host_id),
        ),
        subscribe=(f"{natsid.inbox_prefix(nkey)}.>",),
    )


def enroll_grant(key_id: str, nkey: str) -> Grant:
    return Grant(
        name=f"enroll:{key_id}",
        publish=tuple(command_subject(verb) for verb in ENROLL_VERBS),
        subscribe=(f"{natsid.inbox_prefix(nkey)}.>",),
        # Long enough to join; a token's connection does not outlive it.
        lifetime=ENROLL_LIFETIME,
    )


def admin_grant(name: str, role: str, nkey: str) -> Grant:
    commands = () if role == "auditor" else (f"{COMMAND_PREFIX}.>",)
    return Grant(
        name=admin_name(name),
        publish=(*commands, f"{QUERY_PREFIX}.>", *_EVENT_READER, read_events_subject(nkey)),
        subscribe=(f"{natsid.inbox_prefix(nkey)}.>",),
        max_subscriptions=1000,
    )


def _signature_bytes(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        return base64.b64decode(padded)


def grant_for(
    topology: Topology,
    connect_opts: dict[str, Any],
    nonce: str,
    now: float,
    failures: FailureWindow,
) -> Grant:
    """Decide one connection. Raises Refused.

    The server does not check an nkey's signature when a callout decides, so
    this does: the client must have signed the server's nonce with the key it
    names. Then: a known admin key, a host key that is still in some network,
    or a new key with an enrollment token whose key this control plane knows.
    """
    nkey = connect_opts.get("nkey")
    signature = connect_opts.get("sig")
    if not isinstance(nkey, str) or not isinstance(signature, str) or not nonce:
        raise Refused("no key: netmesh admits no anonymous connections", "anonymous")
    try:
        verify_key = natsid.verify_key_of_nkey(nkey)
        verify_key.verify(nonce.encode(), _signature_bytes(signature))
    except (natsid.JwtError, BadSignatureError, binascii.Error, ValueError):
        raise Refused("the nonce is not signed by the key presented", "bad_signature") from None
    key_text = base64.b64encode(bytes(verify_key)).decode()
    admin = topology.admins.get(key_text)
    if admin is not None:
        return admin_grant(admin.name, admin.role, nkey)
    host_id = topology.host_by_signing_key(key_text)
    if host_id is not None and topology.nodes_by_host.get(host_id):
        return host_grant(host_id, nkey)
    token = connect_opts.get("auth_token")
    if not isinstance(token, str) or not token:
        raise Refused("unknown key (removed host or admin?) and no enrollment token", "unknown_key")
    try:
        parts = parse_token(token)
    except InvalidToken as exc:
        raise Refused(str(exc), "invalid_token") from None
    key = topology.keys.get(parts.key_id)
    bucket = throttle_bucket(topology, parts.key_id)
    if not failures.allowed(bucket, now):
        raise Refused(
            f"enrollment key {parts.key_id}: too many failed attempts, rate limited",
            "rate_limited",
        )
    if key is not None:
        if hmac.compare_digest(key.secret_sha256, secret_digest(parts.secret)):
            # Usable or not (expired, used up, revoked): the join says which.
            return enroll_grant(key.key_id, nkey)
    elif parts.key_id in topology.retired_keys:
        # The join explains that the key's network was deleted. Its secret is
        # not kept: counted as a failure, so this is throttled like guessing.
        failures.failed(bucket, now)
        return enroll_grant(parts.key_id, nkey)
    failures.failed(bucket, now)
    raise Refused("enrollment token not recognised", "unknown_token")


def reader_problem(topology: Topology, nkey: str, deliver_subject: str) -> str | None:
    """Why the control plane will not make the reader with this nkey a consumer
    of the event stream delivering to `deliver_subject` (None: it will). Only
    that reader can ask (the broker grants `netmesh.readevents.<nkey>` to it
    alone); the subject must be in its inbox."""
    try:
        key_text = base64.b64encode(bytes(natsid.verify_key_of_nkey(nkey))).decode()
    except natsid.JwtError:
        return "not a reader's key"
    if key_text not in topology.admins:
        return "not an admin or auditor"
    return _inbox_problem(nkey, deliver_subject)


def _inbox_problem(nkey: str, deliver_subject: str) -> str | None:
    inbox = natsid.inbox_prefix(nkey) + "."
    if not deliver_subject.startswith(inbox) or not _is_literal(deliver_subject):
        return "deliver subject must be in the asker's own inbox"
    return None


def delivery_problem(topology: Topology, host_id: str, deliver_subject: str) -> str | None:
    """Why the control plane will not make host `host_id` a consumer delivering
    to `deliver_subject` (None: it will). Only the host itself can ask (the
    broker grants `netmesh.consume.<host>` to it alone), and only for delivery
    into its own inbox, the one subject tree it can read."""
    host = topology.hosts.get(host_id)
    if host is None or not topology.nodes_by_host.get(host_id):
        return f"no host {host_id} in any network"
    if not host.signing_key:
        return f"host {host_id} has no key: enroll it again"
    verify_key = VerifyKey(base64.b64decode(host.signing_key))
    return _inbox_problem(natsid.public_nkey(verify_key), deliver_subject)


def _is_literal(subject: str) -> bool:
    tokens = subject.split(".")
    return all(tokens) and not any(t in ("*", ">") for t in tokens)


def user_claims(grant: Grant, user_nkey: str, now: float) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": user_nkey,
        "aud": ACCOUNT,
        "name": grant.name,
        "nats": {
            "pub": {"allow": list(grant.publish)},
            "sub": {"allow": list(grant.subscribe)},
            "subs": grant.max_subscriptions,
            "data": -1,
            "payload": -1,
            "type": "user",
            "version": 2,
        },
    }
    if grant.lifetime is not None:
        claims["exp"] = int(now) + grant.lifetime
    return claims


def response_claims(
    user_nkey: str, server_id: str, *, user_jwt: str | None = None, error: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "authorization_response", "version": 2}
    if user_jwt is not None:
        body["jwt"] = user_jwt
    if error is not None:
        body["error"] = error
    return {"sub": user_nkey, "aud": server_id, "nats": body}


def names_at_stake(topology: Topology, event: AnyEvent) -> set[str]:
    """Before `event` is applied: the admitted identities it may take access from."""
    if isinstance(event, NodeRemoved):
        return {host_name(event.host_id)}
    if isinstance(event, NetworkDeleted):
        return {host_name(node.host_id) for node in topology.nodes_of_network(event.network)}
    if isinstance(event, AdminRemoved):
        return {admin_name(event.name)}
    return set()


def still_admitted(topology: Topology, name: str) -> bool:
    kind, _, ident = name.partition(":")
    if kind == "host":
        return bool(topology.nodes_by_host.get(ident))
    if kind == "admin":
        return any(admin.name == ident for admin in topology.admins.values())
    return True


def server_config(base: str, keys: BrokerKeys, tls: str = "") -> str:
    """nats-server configuration for a broker the control plane guards: `base`
    (limits, JetStream), the control plane's two users, and the callout."""
    controlplane = natsid.public_nkey(keys.controlplane)
    system = natsid.public_nkey(keys.system)
    issuer = natsid.public_nkey(keys.issuer, natsid.ACCOUNT)
    return f"""{base}
# --- written by netmesh server: broker access is decided by the control plane.
accounts {{
  SYS {{ users: [ {{ nkey: {system} }} ] }}
}}
system_account: SYS
authorization {{
  timeout: 5
  users: [ {{ nkey: {controlplane} }} ]
  auth_callout {{
    issuer: {issuer}
    auth_users: [ {controlplane}, {system} ]
  }}
}}
{tls}"""


class RefusalLog:
    """Refused connections, logged at most once per `interval` with counts by
    reason: a removed host's agent keeps retrying every few seconds, and that
    must not fill the log (nor cost more than counting)."""

    def __init__(
        self, interval: float = SWEEP_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._counts: dict[str, int] = {}
        self._next = 0.0

    def refused(self, why: str, host: object) -> None:
        self._counts[why] = self._counts.get(why, 0) + 1
        if self._clock() >= self._next:
            self.flush(last_host=host)

    def flush(self, last_host: object = None) -> None:
        """Log what was counted since the last line, if anything."""
        self._next = self._clock() + self.interval
        if not self._counts:
            return
        counts, self._counts = self._counts, {}
        log.info(
            "broker connections refused",
            refused=sum(counts.values()),
            by_reason=counts,
            last_host=last_host,
            next_report_in=round(self.interval),
        )


class BrokerGate:
    """Serves the auth callout, and disconnects identities that lost access."""

    def __init__(
        self,
        nc: Client,
        system_nc: Client,
        keys: BrokerKeys,
        topology: Callable[[], Topology],
        queue: str,
        failures: FailureWindow,
        metrics: BrokerCounter | None = None,
    ) -> None:
        self._nc = nc
        self._system_nc = system_nc
        self._metrics = metrics
        self._keys = keys
        self._topology = topology
        self._queue = queue
        # Shared with the join command: failed tokens count the same either way.
        self._failures = failures
        self._sub: Subscription | None = None
        self.admitted = 0
        self.refused = 0
        self.refusals = RefusalLog()

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(AUTH_SUBJECT, queue=self._queue, cb=self._on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_request(self, msg: Msg) -> None:
        try:
            request = natsid.decode_verified(msg.data.decode(errors="replace"))
            info = request["nats"]
            user_nkey = str(info["user_nkey"])
            server_id = str(info["server_id"]["id"])
            client = info.get("client_info") or {}
            opts = info.get("connect_opts") or {}
            if request.get("iss") != server_id:
                raise natsid.JwtError("not signed by the server it names")
        except (natsid.JwtError, KeyError, TypeError) as exc:
            log.warning("malformed auth request ignored", error=str(exc))
            return
        now = time.time()
        try:
            grant = grant_for(
                self._topology(), opts, str(client.get("nonce", "")), now, self._failures
            )
        except Refused as exc:
            self.refused += 1
            self.refusals.refused(str(exc), client.get("host"))
            if self._metrics is not None:
                self._metrics.broker_refused(exc.reason)
            answer = response_claims(user_nkey, server_id, error=str(exc))
        else:
            self.admitted += 1
            if self._metrics is not None:
                # The kind of identity: host, admin or enroll (a bounded set).
                self._metrics.broker_admitted(grant.name.partition(":")[0])
            user_jwt = natsid.encode(user_claims(grant, user_nkey, now), self._keys.issuer)
            answer = response_claims(user_nkey, server_id, user_jwt=user_jwt)
        if msg.reply:
            await msg.respond(natsid.encode(answer, self._keys.issuer).encode())

    async def disconnect(self, names: set[str], timeout: float = 1.0) -> int:
        """Close every connection admitted as one of `names`, on every server
        that answers within `timeout`. Returns how many were closed."""
        closed = await self._kick_where(names.__contains__, timeout)
        if closed:
            log.info("disconnected identities that lost access", names=sorted(names), closed=closed)
        return closed

    async def sweep(self, timeout: float = 2.0) -> int:
        """Disconnect every connection whose identity is no longer admitted: the
        net under `disconnect` (a control plane that stopped between an event
        and its disconnect, a kick that timed out). Returns how many."""
        self.refusals.flush()
        topology = self._topology()

        def lost(name: str) -> bool:
            kind = name.partition(":")[0]
            return kind in ("host", "admin") and not still_admitted(topology, name)

        return await self._kick_where(lost, timeout)

    async def _kick_where(self, should_go: Callable[[str], bool], timeout: float) -> int:
        """Close the connections, on every server that answers, whose admitted
        name `should_go` says must go. Returns how many were closed."""
        closed = 0
        for server_id in await self._servers(timeout):
            try:
                connections = await self._named_connections(server_id, timeout)
            except Exception as exc:  # one slow server does not stop the others
                log.info("connections not listed", server=server_id, error=repr(exc))
                continue
            for cid, name in connections:
                if should_go(name) and await self._kick(server_id, cid, timeout):
                    closed += 1
                    log.info("disconnected", name=name)
        return closed

    async def _kick(self, server_id: str, cid: int, timeout: float) -> bool:
        """Close one connection (best effort: the sweep tries again)."""
        try:
            await self._system_nc.request(
                f"$SYS.REQ.SERVER.{server_id}.KICK",
                msgspec.json.encode({"cid": cid}),
                timeout=timeout,
            )
        except Exception:
            return False
        return True

    async def _servers(self, timeout: float) -> list[str]:
        return [
            body["server"]["id"]
            for body in await self._gather("$SYS.REQ.SERVER.PING", {}, timeout)
            if isinstance(body.get("server"), dict) and "id" in body["server"]
        ]

    async def _named_connections(self, server_id: str, timeout: float) -> list[tuple[int, str]]:
        found: list[tuple[int, str]] = []
        offset = 0
        while True:
            reply = await self._system_nc.request(
                f"$SYS.REQ.SERVER.{server_id}.CONNZ",
                msgspec.json.encode({"auth": True, "offset": offset, "limit": 1024}),
                timeout=timeout,
            )
            data = msgspec.json.decode(reply.data).get("data") or {}
            page = data.get("connections") or []
            found += [(c["cid"], str(c.get("authorized_user", ""))) for c in page]
            offset += len(page)
            if not page or offset >= int(data.get("total", 0)):
                return found

    async def _gather(self, subject: str, body: dict[str, Any], timeout: float) -> list[Any]:
        """Every server's answer to a PING-style request, collected for `timeout`."""
        answers: list[Any] = []
        inbox = self._system_nc.new_inbox()
        sub = await self._system_nc.subscribe(inbox)
        try:
            await self._system_nc.publish(subject, msgspec.json.encode(body), reply=inbox)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    reply = await sub.next_msg(timeout=left)
                except Exception:
                    break
                with contextlib.suppress(msgspec.DecodeError):
                    answers.append(msgspec.json.decode(reply.data))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return answers
