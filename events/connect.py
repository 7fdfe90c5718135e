"""NATS connections for callers that want one answer, not a retry loop.

nats-py retries a failed first connect forever when `max_reconnect_attempts`
is 0 (only values > 0 bound it) and logs a traceback per attempt; the CLI,
enrollment and readiness checks want "connected" or a one-line reason, quickly.

Two more things nats-py 2.16 gets wrong for them. A guarded broker holds a new
connection while it asks the control plane who it is (auth callout); with no
control plane answering (none running, or one still starting) it sends its
first PING after 2 s, which nats-py takes for the PONG that means "admitted":
`connect` returns a client that never sends anything, and the broker closes it
at its callout timeout (5 s). And a request pending when the connection drops
is never failed: it waits for its whole timeout. `connect_once` raises
`BrokerNotReady` for the first; `Watch.request` fails with `ConnectionLost` at
once for the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

# The name the broker's certificate is made for, whatever address it is dialled
# at: clients check the certificate against the CA they pinned and this name.
BROKER_TLS_NAME = "netmesh-nats"


class BrokerTlsMissing(Exception):
    """A tls:// URL, but no CA to check the broker's certificate against."""


def server_urls(urls: str | list[str]) -> list[str]:
    """A broker URL, or several (a cluster) separated by commas, as the list
    nats-py fails over between. Tokens, identities and `--server` carry the
    comma-separated text, so one URL (every older token) is the same as before."""
    parts = urls if isinstance(urls, list) else urls.split(",")
    return [part.strip() for part in parts if part.strip()]


def uses_tls(url: str) -> bool:
    """Whether the broker URL (or any of several) is tls://."""
    return any(u.lower().startswith("tls://") for u in server_urls(url))


def tls_options(url: str, ca_der: bytes | None) -> dict[str, Any]:
    """nats-py options for `url`: for tls://, TLS first (before the server says
    anything) against the pinned CA only. Raises BrokerTlsMissing."""
    if not uses_tls(url):
        return {}
    if not ca_der:
        raise BrokerTlsMissing(f"{url} wants TLS, but no CA certificate is known to check it")
    context = ssl.create_default_context(cadata=ca_der)
    return {"tls": context, "tls_hostname": BROKER_TLS_NAME, "tls_handshake_first": True}


_NOT_ADMITTED = (
    "the broker has not admitted the connection: no control plane answers its logins yet"
)


async def _silent(exc: Exception) -> None:
    """The caller reports the failure itself, once."""


class BrokerDenied(Exception):
    """The broker refused to let this connection publish or subscribe there."""


class BrokerNotReady(nats.errors.Error):
    """The broker took the connection but has not admitted it: it is waiting
    for a control plane to answer its login (auth callout), and none does yet
    (none is running, or one is starting). Retryable."""


class ConnectionLost(Exception):
    """The connection dropped while a request waited for its answer: it may or
    may not have been received and acted on."""


class Watch:
    """What the broker tells a connection asynchronously, for its requests:
    permission violations (as -ERR; without this, a request the broker would
    not deliver just times out, and a refusal looks like a dead server) and
    the connection's end (nats-py leaves a pending request waiting for its
    whole timeout). Pass `on_error` and `on_disconnect` to the connection."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.lost = False
        self._changed = asyncio.Event()

    async def on_error(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            self.seen.append(str(exc).removeprefix("nats: "))
            self._changed.set()

    async def on_disconnect(self) -> None:
        self.lost = True
        self._changed.set()

    async def request(self, nc: Client, subject: str, data: bytes, **options: Any) -> Msg:
        """`nc.request`, failing with BrokerDenied as soon as the broker refuses
        it (or the reply subscription), and with ConnectionLost as soon as the
        connection drops, instead of at the timeout."""
        before = len(self.seen)
        asked = asyncio.ensure_future(nc.request(subject, data, **options))
        while True:
            self._changed.clear()
            changed = asyncio.ensure_future(self._changed.wait())
            await asyncio.wait({asked, changed}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
            if asked.done():
                return asked.result()
            fresh = [why for why in self.seen[before:] if subject in why or "_inbox" in why]
            if fresh or self.lost:
                asked.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asked
                if fresh:
                    raise BrokerDenied(fresh[0])
                raise ConnectionLost(f"the connection to the broker dropped while {subject} waited")


def broker_guarded(nc: Client) -> bool:
    """Whether the broker asked this connection for credentials (a guarded
    broker; nats-py keeps the server's INFO in a private field)."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    return bool(info.get("auth_required"))


def refused_by_broker(exc: BaseException) -> bool:
    """The broker turned our credentials away (nats-py raises a plain Error with
    the server's text on first connect, AuthorizationError later)."""
    return isinstance(exc, nats.errors.AuthorizationError) or (
        "authorization violation" in str(exc).lower()
    )


# Not a name nats-py would keep (it has whitespace): stands for "not seen yet".
_NOT_SEEN = "\n"
# Header name as sent -> its name as nats-py gives it (None: nats-py drops the
# header). A few names recur on every message; bounded against a sender that
# makes up new ones.
_HEADER_NAMES: dict[bytes, str | None] = {}
_HEADER_NAMES_MAX = 256


def _header_name(raw: bytes) -> str | None:
    # nats-py's own rules (nats/aio/client.py, `_parse_header_lines`).
    try:
        name = raw.strip().decode("ascii")
    except UnicodeDecodeError:
        return None
    if any(c.isspace() for c in name):
        return None
    return name


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py's header-block parser, same result for every input (a test
    compares them), with each header name checked once rather than per message:
    nats-py's per-character check of the name was a tenth of a replay's time."""
    out: dict[str, str] = {}
    names = _HEADER_NAMES
    for line in raw.split(b"\r\n"):
        raw_name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = names.get(raw_name, _NOT_SEEN)
        if name is _NOT_SEEN:
            name = _header_name(raw_name)
            if len(names) < _HEADER_NAMES_MAX:
                names[raw_name] = name
        if name is None:
            continue
        out[name] = value.strip().decode("utf-8", "replace")
    return out


class NetmeshClient(Client):
    """nats-py's client with `parse_header_lines` for message headers.

    The one override of nats-py internals for speed: `_parse_header_lines` is
    a private static method that `_process_headers` calls for every message
    with headers (every event carries a MAC and JetStream's batch headers).
    tests/test_connect.py fails if nats-py stops calling it or parses
    differently, so an upgrade cannot silently change what headers say.
    """

    _parse_header_lines = staticmethod(parse_header_lines)


async def connect(url: str | list[str], **options: Any) -> NetmeshClient:
    """`nats.connect`, with a `NetmeshClient`. Raises what `nats.connect` raises."""
    nc = NetmeshClient()
    await nc.connect(server_urls(url), **options)
    return nc


async def connect_once(url: str | list[str], *, timeout: float = 3.0, **options: Any) -> Client:
    """Connect or raise (OSError, nats.errors.Error, TimeoutError), without
    nats-py's retry loop. `timeout` bounds each step (TCP, TLS, the broker's
    greeting) and the wait for admission: a broker that still holds the login
    at its first PING (2 s) is asked again, until then. BrokerNotReady (a
    nats.errors.Error): the broker answered but did not admit the connection
    in time; no control plane answers its logins. Several URLs (a cluster):
    each is tried in turn, in the order given."""
    options.setdefault("error_cb", _silent)
    urls = server_urls(url)
    if len(urls) > 1:
        return await _first_that_answers(urls, timeout, options)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await _attempt(url, timeout, options)
        except BrokerNotReady:
            timeout = deadline - loop.time() - ADMISSION_PAUSE
            if timeout < ADMISSION_PAUSE:
                raise
            await asyncio.sleep(ADMISSION_PAUSE)


ADMISSION_PAUSE = 0.1


async def _first_that_answers(urls: list[str], timeout: float, options: dict[str, Any]) -> Client:
    """Each broker of a cluster in turn: one that is gone, or drops the
    connection while it is made (a broker being killed), is passed over; a
    refusal of our credentials is final (every broker asks the same control
    planes). Raises what the last one raised."""
    failure: BaseException | None = None
    for one in urls:
        try:
            return await connect_once(one, timeout=timeout, **options)
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            if refused_by_broker(exc):
                raise
            failure = exc
    assert failure is not None
    raise failure


async def _attempt(url: str | list[str], timeout: float, options: dict[str, Any]) -> Client:
    nc = NetmeshClient()
    try:
        try:
            # nats-py's annotations say int; its timeouts take seconds as floats.
            await nc.connect(
                server_urls(url),
                **{
                    "connect_timeout": timeout,
                    "allow_reconnect": False,
                    "max_reconnect_attempts": 1,
                    "reconnect_time_wait": 0.05,
                    **options,
                },
            )
        except TimeoutError:
            # The greeting (INFO) came: what timed out is the wait for admission.
            if getattr(nc, "_server_info", None):
                raise BrokerNotReady(_NOT_ADMITTED) from None
            raise
        if not nc.is_connected:
            # The broker's own PING, taken by nats-py for the PONG of admission.
            raise BrokerNotReady(_NOT_ADMITTED)
    except BaseException:
        # nats-py leaves the socket of a refused connection open (an
        # "Authorization Violation" on first connect): close it here.
        # (Aborted, not closed: after a failed TLS handshake, waiting for a
        # clean close never ends.) A client that got as far as reading runs
        # its callbacks when its socket goes: they are the caller's, for the
        # connection it will get, not for this one.
        nc._disconnected_cb = nc._closed_cb = None
        nc._error_cb = _silent
        _abort(nc)
        raise
    return nc


def _abort(nc: Client) -> None:
    """Drop the connection's socket now (nats-py keeps it in private fields)."""
    transport = getattr(nc, "_transport", None)
    for name in ("_io_writer", "_bare_io_writer"):
        writer = getattr(transport, name, None)
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.transport.abort()


async def close_quickly(nc: Client, timeout: float = 2.0) -> None:
    """Close, but do not wait long for a peer that is gone: a TLS close waits
    for the broker's answer, which never comes over a path that died (an
    agent whose address went away took 30 s to stop)."""
    try:
        await asyncio.wait_for(nc.close(), timeout)
    except TimeoutError:
        _abort(nc)
    except Exception:  # closing is best effort
        return


async def server_has_seen_everything(nc: Client, timeout: float = 5.0) -> None:
    """Return once the server has processed everything sent on `nc` so far
    (subscriptions included).

    `Client.flush()` is not enough in nats-py 2.16: it writes its PING straight
    to the socket, ahead of protocol still queued for the flusher, so the PONG
    can come back before our SUBs reach the server (seen here: a request sent
    right after "ready" met "no responders"). A message sent to ourselves goes
    through the same queue, after the SUBs, so its arrival proves they landed.
    """
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=1)
    try:
        await nc.publish(inbox, b"")
        await sub.next_msg(timeout=timeout)
    finally:
        # With the message in, max_msgs has already removed the subscription.
        with contextlib.suppress(nats.errors.BadSubscriptionError):
            await sub.unsubscribe()
