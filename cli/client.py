"""The CLI's side of the protocol: one request, one reply, clear errors.

A command whose answer does not come (the control plane or its broker went
away: the connection dropped, or nobody answers on the control plane's subjects
any more) fails at once instead of at the timeout, and is sent again, once,
with the same id (so the same signed bytes) when the control plane is back:
the control plane answers a retry with the command's original answer, so the
user learns whether it had been applied. A broker that takes the connection
but has not admitted it yet (its control plane is starting) is tried again
with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
from nacl.signing import SigningKey
from nats.aio.client import Client

from cli import lastwrite
from events import natsid
from events.commands import Reply
from events.connect import (
    BrokerDenied,
    BrokerNotReady,
    BrokerTlsMissing,
    ConnectionLost,
    Watch,
    broker_guarded,
    close_quickly,
    connect_once,
    refused_by_broker,
    tls_options,
)
from events.natsid import client_options
from events.signing import SigningKeyError, command_headers, load_or_create, open_sealed
from events.subjects import command_subject, query_subject

DEFAULT_SERVER = "nats://127.0.0.1:4222"
REQUEST_TIMEOUT = 15.0
# How long an unanswered command waits for the control plane to come back
# before it is sent again (once, with the same id).
COMEBACK_WAIT = 30.0
# How long a connect keeps trying a broker that answers but admits no one yet.
ADMISSION_WAIT = 10.0
# Each connect attempt's bound on each of its steps (TCP, TLS, the broker's
# greeting, admission). Admission takes milliseconds when a control plane
# answers; when none does, the broker holds the login for its callout timeout
# (5 s) even if a control plane starts meanwhile: a new attempt is admitted.
# So attempts stay short while only admission is pending, and grow only while
# the broker's greeting itself is slow to come.
FIRST_ATTEMPT = 0.5
ADMISSION_ATTEMPT = 1.0
SLOW_ATTEMPT = 3.0
CONNECT_PAUSE = 0.1
# While a command waits: is anyone still answering on the control plane's
# subjects? A control plane that died with the command leaves no one.
PROBE_AFTER = 0.5
PROBE_EVERY = 0.5
PING = query_subject("ping")

WENT_AWAY = "the control plane went away before answering"
MAY_HAVE_BEEN_APPLIED = "the command may or may not have been applied"


class CliError(Exception):
    """Shown to the user as one line; the process exits non-zero."""


class Unreachable(CliError):
    """Nothing answers at the server's address, or the broker admits no one yet."""


class NotDelivered(CliError):
    """A request reached no one: nothing answers on the control plane's subjects
    (the broker is there), or the connection closed before it was sent."""


class Unanswered(CliError):
    """A request was sent and got no answer (it may have been acted on)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class Login:
    """Who the CLI is to the broker: an admin key (the broker admits no one
    else) and, for a tls:// server, the CA its certificate must chain to."""

    key: SigningKey | None = None
    ca: bytes | None = None


async def connect(
    server: str, login: Login | None = None, *, admission_wait: float = ADMISSION_WAIT
) -> Client:
    """A connection to the broker, admitted. A broker that answers but admits
    no one yet is tried again with backoff for `admission_wait` seconds.
    Raises Unreachable, CliError."""
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
    loop = asyncio.get_running_loop()
    deadline = loop.time() + admission_wait
    timeout = FIRST_ATTEMPT
    while True:
        watch = Watch()
        try:
            nc = await connect_once(
                server,
                timeout=timeout,
                name="netmesh-cli",
                error_cb=watch.on_error,
                disconnected_cb=watch.on_disconnect,
                closed_cb=watch.on_disconnect,
                **options,
            )
        except nats.errors.NoServersError:
            raise Unreachable(
                f"cannot connect to {server}: nothing answers there (is `netmesh server` running?)"
            ) from None
        except (BrokerNotReady, TimeoutError) as exc:
            # Not admitted yet (a control plane starting, or none), or a slow
            # path: again, until the deadline.
            ceiling = ADMISSION_ATTEMPT if isinstance(exc, BrokerNotReady) else SLOW_ATTEMPT
            timeout = min(timeout * 2, ceiling)
            if loop.time() + CONNECT_PAUSE + timeout > deadline:
                if isinstance(exc, BrokerNotReady):
                    raise Unreachable(
                        f"the broker at {server} admits no one yet: no control plane answers "
                        f"its logins (starting, or not running?); tried for {admission_wait:.0f} s"
                    ) from None
                raise Unreachable(f"cannot connect to {server}: timed out") from None
            await asyncio.sleep(CONNECT_PAUSE)
            continue
        except (OSError, nats.errors.Error) as exc:
            if refused_by_broker(exc):
                who = "this admin key is not registered (removed?)" if key else "no admin key given"
                raise CliError(
                    f"the broker at {server} refused the connection: {who}; "
                    "pass --admin-key PATH (or NETMESH_ADMIN_KEY)"
                ) from None
            raise Unreachable(f"cannot connect to {server}: {_why(exc)}") from None
        _watches[nc] = watch
        return nc


# Each CLI connection's watch (permission violations, its end), for requests.
_watches: weakref.WeakKeyDictionary[Client, Watch] = weakref.WeakKeyDictionary()


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0]


async def _no_one_answers(nc: Client) -> None:
    """Return once nobody answers on the control plane's subjects (or the
    connection is gone); never, while someone does."""
    await asyncio.sleep(PROBE_AFTER)
    while True:
        if nc.is_closed:
            return
        try:
            await nc.request(PING, b"", timeout=PROBE_EVERY)
        except nats.errors.NoRespondersError:
            return
        except (nats.errors.Error, TimeoutError):
            continue  # slow is not gone (a closed connection is seen above)
        await asyncio.sleep(PROBE_EVERY)


async def ask(
    nc: Client, subject: str, data: bytes, server: str, headers: dict[str, str] | None = None
) -> Reply:
    """Send one request; its reply, whatever it says. Raises Unanswered (sent,
    no answer: the connection dropped, no one answers any more, or the time
    ran out), NotDelivered, CliError."""
    watch = _watches.get(nc) or Watch()
    asked = asyncio.ensure_future(
        watch.request(
            nc,
            subject,
            data,
            timeout=REQUEST_TIMEOUT,
            headers={"Netmesh-Actor": "cli", **(headers or {})},
        )
    )
    gone = asyncio.ensure_future(_no_one_answers(nc))
    try:
        await asyncio.wait({asked, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not asked.done():
        asked.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asked
        raise Unanswered(WENT_AWAY)
    try:
        msg = asked.result()
    except BrokerDenied as exc:
        raise CliError(
            f"denied by the broker: {exc} (this admin key's role does not allow it)"
        ) from None
    except ConnectionLost:
        raise Unanswered(WENT_AWAY) from None
    except nats.errors.NoRespondersError:
        raise NotDelivered(f"no netmesh server is answering at {server}") from None
    except nats.errors.ConnectionClosedError:
        raise NotDelivered(f"the connection to {server} closed before the request went") from None
    except nats.errors.TimeoutError:
        raise Unanswered(
            f"the netmesh server at {server} did not answer within {REQUEST_TIMEOUT:.0f} s"
        ) from None
    try:
        return msgspec.json.decode(msg.data, type=Reply)
    except msgspec.DecodeError:
        raise CliError("the server sent an answer this CLI cannot read") from None


def _result(reply: Reply) -> Any:
    if not reply.ok:
        raise CliError(reply.error or "refused")
    return reply.result


async def request(
    nc: Client,
    subject: str,
    payload: dict[str, Any] | bytes,
    server: str,
    headers: dict[str, str] | None = None,
) -> Any:
    """Send a command or query; return its result. Raises CliError on any refusal."""
    data = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
    return _result(await ask(nc, subject, data, server, headers))


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


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def command(
    server: str,
    verb: str,
    *,
    login: Login | None = None,
    notify: Callable[[str], None] = _to_stderr,
    seq_as: str | None = None,
    **fields: Any,
) -> Any:
    """Send an admin command; with the login's key, signed (with a fresh id and
    the time). Unanswered, it is sent again once the control plane is back
    (`notify` says what happened). With `seq_as`, the sequence of the last
    event it appended (when it appended any) goes into the result under that
    name. Raises CliError, before connecting when the command is malformed."""
    admin_key = login.key if login is not None else None
    fields.setdefault("command_id", uuid.uuid4().hex)
    if admin_key is not None:
        fields["signed_at"] = time.time()
    payload = checked_command(verb, fields)
    headers = command_headers(admin_key, verb, payload) if admin_key is not None else {}
    subject = command_subject(verb)
    nc = await connect(server, login)
    try:
        reply = await ask(nc, subject, payload, server, headers)
    except Unanswered as unanswered:
        await close_quickly(nc)
        why = unanswered.why
        notify(f"{why}; sending the command again with the same id once it is back")
        reply = await _send_again(server, login, subject, payload, headers, why)
        if not reply.ok:
            refused = "it had been refused" if reply.repeated else "refused"
            raise CliError(f"{why}; retried with the same id: {refused}: {reply.error}") from None
        notify(f"{why}; retried with the same id: {_what_happened(reply)}")
    finally:
        await close_quickly(nc)
    if reply.ok and reply.seq is not None:
        lastwrite.remembered.saw(server, reply.seq)
    result = _unsealed(_result(reply), admin_key)
    if seq_as is not None and isinstance(result, dict) and reply.seq is not None:
        result[seq_as] = reply.seq
    return result


async def plan(server: str, verb: str, *, login: Login | None = None, **fields: Any) -> Any:
    """What admin command `verb` would do now, applying nothing: its events
    and, per host, what would change (`netmesh.query.plan.<verb>`). Signed
    like the command (under the plan context), so refused as it would be.
    Raises CliError."""
    admin_key = login.key if login is not None else None
    fields.setdefault("command_id", uuid.uuid4().hex)
    if admin_key is not None:
        fields["signed_at"] = time.time()
    payload = checked_command(verb, fields)
    headers = command_headers(admin_key, verb, payload, plan=True) if admin_key else {}
    nc = await connect(server, login)
    try:
        return _result(await ask(nc, query_subject(f"plan.{verb}"), payload, server, headers))
    finally:
        await close_quickly(nc)


async def _send_again(
    server: str,
    login: Login | None,
    subject: str,
    payload: bytes,
    headers: dict[str, str],
    why: str,
) -> Reply:
    """The reply to `payload` sent again, once it reaches a control plane
    (within COMEBACK_WAIT). Raises CliError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + COMEBACK_WAIT
    pause = 0.05
    command_id = msgspec.json.decode(payload).get("command_id", "")
    unknown = f"{why}: {MAY_HAVE_BEEN_APPLIED} (command id {command_id})"
    while loop.time() < deadline:
        try:
            nc = await connect(server, login, admission_wait=max(0.0, deadline - loop.time()))
        except Unreachable:
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)
            continue
        try:
            while loop.time() < deadline and not nc.is_closed:
                try:
                    return await ask(nc, subject, payload, server, headers)
                except NotDelivered:  # the broker is back, its control plane not yet
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                except Unanswered as again:
                    # Sent again and not answered again: say so rather than
                    # send it a third time.
                    raise CliError(f"{unknown}; sent again, and {again.why}") from None
        finally:
            await close_quickly(nc)
    raise CliError(f"{unknown}; it did not come back within {COMEBACK_WAIT:.0f} s")


def _what_happened(reply: Reply) -> str:
    where = f" (event #{reply.seq})" if reply.seq is not None else ""
    if reply.repeated:
        return f"it had been applied{where}"
    return f"applied now{where}" if reply.seq is not None else "answered now (nothing to change)"


def _unsealed(result: Any, key: SigningKey | None) -> Any:
    """A repeated answer's secret (the token of a key it made, a hook's
    secret) comes sealed to the signer's key: open it."""
    if not isinstance(result, dict):
        return result
    for sealed_as, clear_as in (("sealed_token", "token"), ("sealed_secret", "secret")):
        if sealed_as not in result:
            continue
        sealed = result.pop(sealed_as)
        if key is None:
            raise CliError(f"the answer's {clear_as} is sealed to an admin key, and none was given")
        try:
            result[clear_as] = open_sealed(key, sealed)
        except ValueError:
            raise CliError(f"the answer's {clear_as} is sealed to another admin's key") from None
    return result


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
    """A query's answer, from a replica that has applied this CLI's last change
    (lastwrite). Raises CliError."""
    args.setdefault("min_seq", lastwrite.remembered.seq(server))
    nc = await connect(server, login)
    try:
        return await request(nc, query_subject(what), {k: v for k, v in args.items() if v}, server)
    finally:
        await nc.close()
