"""The CLI's side of the protocol: one request, one reply, clear errors."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nacl.signing import SigningKey
from nats.aio.client import Client

from events.commands import Reply
from events.connect import connect_once, refused_by_broker
from events.natsid import client_options
from events.signing import SigningKeyError, command_headers, load_or_create
from events.subjects import command_subject, query_subject

DEFAULT_SERVER = "nats://127.0.0.1:4222"
REQUEST_TIMEOUT = 15.0


class CliError(Exception):
    """Shown to the user as one line; the process exits non-zero."""


async def connect(server: str, key: SigningKey | None = None) -> Client:
    """Connect as the admin whose key this is (the broker admits no one else)."""
    login = client_options(key) if key is not None else {}
    try:
        return await connect_once(server, name="netmesh-cli", **login)
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
    try:
        msg = await nc.request(
            subject,
            data,
            timeout=REQUEST_TIMEOUT,
            headers={"Netmesh-Actor": "cli", **(headers or {})},
        )
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


async def command(
    server: str, verb: str, *, admin_key: SigningKey | None = None, **fields: Any
) -> Any:
    """Send a command; with `admin_key`, signed (with a fresh id and the time)."""
    nc = await connect(server, admin_key)
    try:
        fields.setdefault("command_id", uuid.uuid4().hex)
        headers: dict[str, str] = {}
        payload: dict[str, Any] | bytes = fields
        if admin_key is not None:
            fields["signed_at"] = time.time()
            payload = msgspec.json.encode(fields)
            headers = command_headers(admin_key, verb, payload)
        return await request(nc, command_subject(verb), payload, server, headers)
    finally:
        await nc.close()


def login_key(path: Path | None) -> SigningKey | None:
    """The admin key to log in with, if there is one (queries and the event
    stream need no signature, but a guarded broker wants to know who asks)."""
    if path is None or not path.is_file():
        return None
    try:
        return load_or_create(path)
    except SigningKeyError as exc:
        raise CliError(str(exc)) from None


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


async def query(server: str, what: str, *, key: SigningKey | None = None, **args: Any) -> Any:
    nc = await connect(server, key)
    try:
        return await request(nc, query_subject(what), {k: v for k, v in args.items() if v}, server)
    finally:
        await nc.close()
