"""The CLI's side of the protocol: one request, one reply, clear errors."""

from __future__ import annotations

import ssl
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nacl.signing import SigningKey
from nats.aio.client import Client

from events import natsid
from events.commands import Reply
from events.connect import (
    BrokerDenied,
    BrokerTlsMissing,
    Denials,
    broker_guarded,
    connect_once,
    refused_by_broker,
    tls_options,
)
from events.natsid import client_options
from events.signing import SigningKeyError, command_headers, load_or_create
from events.subjects import command_subject, query_subject

DEFAULT_SERVER = "nats://127.0.0.1:4222"
REQUEST_TIMEOUT = 15.0


class CliError(Exception):
    """Shown to the user as one line; the process exits non-zero."""


@dataclass(frozen=True)
class Login:
    """Who the CLI is to the broker: an admin key (the broker admits no one
    else) and, for a tls:// server, the CA its certificate must chain to."""

    key: SigningKey | None = None
    ca: bytes | None = None


async def connect(server: str, login: Login | None = None) -> Client:
    login = login or Login()
    key = login.key
    try:
        options = {
            **(client_options(key) if key is not None else {}),
            **tls_options(server, login.ca),
        }
    except BrokerTlsMissing:
        raise CliError(
            f"{server} speaks TLS: pass --ca PATH (or NETMESH_CA), the server's "
            "<data-dir>/tls/ca.pem"
        ) from None
    denials = Denials()
    try:
        nc = await connect_once(server, name="netmesh-cli", error_cb=denials.on_error, **options)
    except nats.errors.NoServersError:
        raise CliError(
            f"cannot connect to {server}: nothing answers there (is `netmesh server` running?)"
        ) from None
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        if refused_by_broker(exc):
            who = "this admin key is not registered (removed?)" if key else "no admin key given"
            raise CliError(
                f"the broker at {server} refused the connection: {who}; "
                "pass --admin-key PATH (or NETMESH_ADMIN_KEY)"
            ) from None
        raise CliError(f"cannot connect to {server}: {_why(exc)}") from None
    _denials[nc] = denials
    return nc


# Each CLI connection's permission violations, for `request`.
_denials: weakref.WeakKeyDictionary[Client, Denials] = weakref.WeakKeyDictionary()


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


async def request(
    nc: Client,
    subject: str,
    payload: dict[str, Any] | bytes,
    server: str,
    headers: dict[str, str] | None = None,
) -> Any:
    """Send a command or query; return its result. Raises CliError on any refusal."""
    data = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
    denials = _denials.get(nc) or Denials()
    try:
        msg = await denials.request(
            nc,
            subject,
            data,
            timeout=REQUEST_TIMEOUT,
            headers={"Netmesh-Actor": "cli", **(headers or {})},
        )
    except BrokerDenied as exc:
        raise CliError(
            f"denied by the broker: {exc} (this admin key's role does not allow it)"
        ) from None
    except nats.errors.NoRespondersError:
        raise CliError(f"no netmesh server is answering at {server}") from None
    except nats.errors.TimeoutError:
        raise CliError(f"the netmesh server at {server} did not answer in time") from None
    try:
        reply = msgspec.json.decode(msg.data, type=Reply)
    except msgspec.DecodeError:
        raise CliError("the server sent an answer this CLI cannot read") from None
    if not reply.ok:
        raise CliError(reply.error or "refused")
    return reply.result


def checked_command(verb: str, fields: dict[str, Any]) -> bytes:
    """The command as it goes on the wire, checked against its spec first: an
    unknown verb, a misspelt field or a value of the wrong type fails here, not
    at the server. Raises CliError."""
    # Imported here: the rules cost 50 ms, which queries and agents need not pay.
    from controlplane.rules import spec_for_verb
    from controlplane.rules.spec import Sender

    spec = spec_for_verb(verb)
    if spec is None:
        raise CliError(f"unknown command {verb!r}")
    if spec.sent_by is not Sender.ADMIN:
        raise CliError(f"{verb} is sent by agents (`netmesh agent ...`), not by admins")
    try:
        msgspec.convert(fields, type=spec.command)
    except msgspec.ValidationError as exc:
        raise CliError(f"invalid {verb} command: {exc}") from None
    # The fields as given, not the checked command re-encoded: what is signed
    # is what the user asked for, without defaults filled in.
    return msgspec.json.encode(fields)


async def command(server: str, verb: str, *, login: Login | None = None, **fields: Any) -> Any:
    """Send an admin command; with the login's key, signed (with a fresh id and
    the time). Raises CliError, before connecting when the command is malformed."""
    admin_key = login.key if login is not None else None
    fields.setdefault("command_id", uuid.uuid4().hex)
    if admin_key is not None:
        fields["signed_at"] = time.time()
    payload = checked_command(verb, fields)
    headers = command_headers(admin_key, verb, payload) if admin_key is not None else {}
    nc = await connect(server, login)
    try:
        return await request(nc, command_subject(verb), payload, server, headers)
    finally:
        await nc.close()


def event_reader(nc: Client, login: Login) -> str | None:
    """Who reads the event stream, on a guarded broker (where readers have the
    control plane make their consumers); None on an open one."""
    if login.key is None or not broker_guarded(nc):
        return None
    return str(natsid.public_nkey(login.key))


def login_from(key_path: Path | None, ca_path: Path | None) -> Login:
    """The admin key and broker CA to log in with, where they exist (queries
    and the event stream need no signature, but a guarded broker wants to know
    who asks)."""
    key = None
    if key_path is not None and key_path.is_file():
        try:
            key = load_or_create(key_path)
        except SigningKeyError as exc:
            raise CliError(str(exc)) from None
    ca = None
    if ca_path is not None and ca_path.is_file():
        try:
            ca = ssl.PEM_cert_to_DER_cert(ca_path.read_text())
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read the broker CA {ca_path}: {exc}") from None
    return Login(key, ca)


def load_admin_key(path: Path | None) -> SigningKey:
    """The admin key to sign with; CliError with what to do when there is none."""
    if path is None or not path.exists():
        where = f" ({path} does not exist)" if path is not None else ""
        raise CliError(
            "admin commands are signed: pass --admin-key PATH (or NETMESH_ADMIN_KEY); "
            f"`netmesh server` wrote one to <data-dir>/admin.key on its first start{where}"
        )
    try:
        return load_or_create(path)
    except SigningKeyError as exc:
        raise CliError(str(exc)) from None


async def query(server: str, what: str, *, login: Login | None = None, **args: Any) -> Any:
    nc = await connect(server, login)
    try:
        return await request(nc, query_subject(what), {k: v for k, v in args.items() if v}, server)
    finally:
        await nc.close()
