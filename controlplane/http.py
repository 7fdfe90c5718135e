"""`netmesh server --http HOST:PORT`: the read API and the dashboard.

Read-only, and answered from what the CLI's queries answer from (the read
model and the queries of `controlplane.queries`, the policy views, the event
stream): no logic of its own beyond who may see what. Every `/api/` path but
the OpenAPI document needs a bearer token (`netmesh admin token create`);
a network-admin token sees only its networks. Answers are converted to the
types of `controlplane.apiviews` and the OpenAPI document is generated from
those same types (`openapi()`). Writes stay signed commands (README says why).

The dashboard is plain HTML, CSS and JS shipped in the package
(`controlplane/webui/`), served from here; it reads the same API.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import msgspec
import structlog
from aiohttp import web

from controlplane.apiviews import (
    ErrorView,
    EventView,
    NetworkView,
    NodeStatusView,
    NodeView,
    PolicyView,
    TokenView,
)
from controlplane.queries import QueryArgs, QueryService
from controlplane.rules.base import Decision, Rejected
from controlplane.rules.tokens import authenticate_token, may_read, record_use
from events.commands import ErrorCode
from events.envelope import RecordedEvent
from events.store import EventStore
from projections.topology import AdminToken, Topology

log = structlog.get_logger("netmesh.http")

API_VERSION = "1"
MAX_EVENTS = 1000  # per answer of /api/events: ask again from the last seq for more
KEEPALIVE = 15.0  # seconds between comments on a quiet event stream (finds dead clients)

# The dashboard's files, by the path they are served at (nothing else is).
ASSETS = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
}
# The page loads nothing from anywhere else (no CDN; the test's browser checks).
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"

_TOKEN = web.RequestKey("token", AdminToken)
_PRESENTED = web.RequestKey("presented", str)  # the bearer token as sent
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class Route:
    """One JSON path: what it answers is converted to `answer` before it is
    sent, and documented as `answer`: one type for both."""

    path: str
    handler: str  # the ReadApi method that answers (plain data, converted to `answer`)
    summary: str
    answer: Any  # the msgspec type of the answer
    params: tuple[tuple[str, str], ...] = ()  # (query parameter, description), integers


ROUTES = (
    Route("/api/whoami", "whoami", "The token's name, role and networks", TokenView),
    Route("/api/networks", "networks", "Networks (the CLI's `network list`)", list[NetworkView]),
    Route("/api/nodes", "nodes", "Nodes (the CLI's `node list`)", list[NodeView]),
    Route(
        "/api/status",
        "status",
        "Per node: desired vs applied revision, state, peers' handshakes (`status`)",
        list[NodeStatusView],
    ),
    Route(
        "/api/policies",
        "policies",
        "Each network's access policy (`policy show`)",
        list[PolicyView],
    ),
    Route(
        "/api/events",
        "events",
        f"Events after `since`, oldest first, at most {MAX_EVENTS} (`events log`)",
        list[EventView],
        (("since", "the last sequence already seen (default 0)"),),
    ),
)
STREAM_PATH = "/api/events/stream"
INTEGER = {"type": "integer", "minimum": 0}


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the API, from the answers' own types."""
    types = [route.answer for route in ROUTES] + [ErrorView]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    *answers, error = schemas
    unauthorized = {
        "description": "No token, or one that is not recognised, revoked or expired",
        "content": {"application/json": {"schema": error}},
    }
    paths: dict[str, Any] = {}
    for route, schema in zip(ROUTES, answers, strict=True):
        paths[route.path] = {
            "get": {
                "summary": route.summary,
                "parameters": [
                    {
                        "name": name,
                        "in": "query",
                        "description": text,
                        "schema": {"type": "integer"},
                    }
                    for name, text in route.params
                ],
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {"application/json": {"schema": schema}},
                    },
                    "401": unauthorized,
                },
            }
        }
    paths[STREAM_PATH] = {
        "get": {
            "summary": "Events after `since` (or the header Last-Event-ID), then live, as "
            "server-sent events: `id` is the sequence, `data` an event as /api/events has it",
            "parameters": [
                {"name": "since", "in": "query", "schema": INTEGER},
                {
                    "name": "tail",
                    "in": "query",
                    "description": "start at most this many events before the newest",
                    "schema": INTEGER,
                },
            ],
            "responses": {
                "200": {"description": "OK", "content": {"text/event-stream": {}}},
                "401": unauthorized,
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "netmesh read API",
            "version": API_VERSION,
            "description": "Read-only: changes are signed commands (the netmesh CLI).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def event_view(recorded: RecordedEvent) -> EventView:
    env = recorded.envelope
    data = msgspec.to_builtins(env.data)
    data.pop("type", None)
    return EventView(
        seq=recorded.seq,
        subject=recorded.subject,
        type=env.type,
        time=env.time,
        actor=env.actor,
        command_id=env.command_id,
        data=data,
        signer=env.signer,
    )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encoder.encode(data), status=status, content_type="application/json")


def _refusal(status: int, code: ErrorCode, message: str) -> web.Response:
    response = _json(ErrorView(error=message, code=code), status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="netmesh"'
    return response


class ReadApi:
    """The aiohttp application: the API and the dashboard's files."""

    def __init__(
        self,
        queries: QueryService,
        topology: Callable[[], Topology],
        store: EventStore,
        record: Callable[[Decision, str], Awaitable[int | None]],
        connected_hosts: Callable[[], Awaitable[set[str]]],
    ) -> None:
        self._queries = queries
        self._topology = topology
        self._store = store
        self._record = record
        self._connected_hosts = connected_hosts
        self._recording: set[str] = set()  # tokens whose use is being recorded now
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopping = asyncio.Event()
        self.app = web.Application(middlewares=[self._authenticated])
        self.app.router.add_get("/api/openapi.json", self._openapi)
        for route in ROUTES:
            self.app.router.add_get(route.path, self._answering(route))
        self.app.router.add_get(STREAM_PATH, self._event_stream)
        for path in ASSETS:
            self.app.router.add_get(path, self._asset)
        self.app.on_shutdown.append(self._on_shutdown)

    @web.middleware
    async def _authenticated(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.path.startswith("/api/") or request.path == "/api/openapi.json":
            return await handler(request)
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        now = time.time()
        try:
            if scheme.lower() != "bearer":
                presented = ""
            token = authenticate_token(self._topology(), presented.strip(), now)
        except Rejected as exc:
            return _refusal(401, exc.code, exc.message)
        self._note_use(token, request.remote or "", now)
        request[_TOKEN] = token
        request[_PRESENTED] = presented.strip()
        try:
            return await handler(request)
        except Rejected as exc:
            status = 404 if exc.code == ErrorCode.NOT_FOUND else 400
            return _refusal(status, exc.code, exc.message)
        except web.HTTPException:
            raise
        except Exception:  # the API must outlive any one request
            log.exception("read API request failed", path=request.path)
            return _refusal(500, ErrorCode.INTERNAL, "internal error (see the server log)")

    def _answering(self, route: Route) -> Callable[[web.Request], Awaitable[web.Response]]:
        answer: Callable[[web.Request], Awaitable[Any]] = getattr(self, route.handler)

        async def respond(request: web.Request) -> web.Response:
            return _json(msgspec.convert(await answer(request), route.answer))

        return respond

    def _note_use(self, token: AdminToken, remote: str, now: float) -> None:
        """Record the token's use in the log when it is due (at most hourly):
        in the background, so that no request waits for the stream."""
        if token.name in self._recording:
            return
        decision = record_use(self._topology(), token.name, remote, now)
        if not decision.events:
            return
        self._recording.add(token.name)

        async def recording() -> None:
            try:
                await self._record(decision, f"token:{token.name}")
            except Exception:  # a lost record must not take the API down
                log.exception("token use not recorded", token=token.name)
            finally:
                self._recording.discard(token.name)

        task = asyncio.create_task(recording())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _openapi(self, _request: web.Request) -> web.Response:
        return _json(openapi())

    async def whoami(self, request: web.Request) -> TokenView:
        token = request[_TOKEN]
        return TokenView(
            name=token.name,
            role=token.role,
            networks=list(token.networks),
            expires_at=token.expires_at,
        )

    async def _answer(self, what: str) -> Any:
        return await self._queries.answer(what, QueryArgs())

    async def networks(self, request: web.Request) -> list[dict[str, Any]]:
        return [r for r in await self._answer("networks") if may_read(request[_TOKEN], r["name"])]

    async def nodes(self, request: web.Request) -> list[dict[str, Any]]:
        return [r for r in await self._answer("nodes") if may_read(request[_TOKEN], r["network"])]

    async def status(self, request: web.Request) -> list[dict[str, Any]]:
        rows = [r for r in await self._answer("status") if may_read(request[_TOKEN], r["network"])]
        online = await self._connected_hosts()
        nodes = self._topology().nodes
        views = []
        for row in rows:
            node = nodes.get(row["id"])
            views.append({**row, "online": node is not None and node.host_id in online})
        return views

    async def policies(self, request: web.Request) -> list[dict[str, Any]]:
        token = request[_TOKEN]
        views = []
        for network in await self._answer("networks"):
            if may_read(token, network["name"]):
                policy = await self._queries.answer("policy", QueryArgs(network=network["name"]))
                views.append(policy)
        return views

    async def events(self, request: web.Request) -> list[EventView]:
        token = request[_TOKEN]
        since = _since(request)
        head = await self._store.last_sequence()
        views: list[EventView] = []
        if since < head:
            # Closed when left: its consumer goes at once, not when collected
            # (both stores' follow_batches are async generators).
            following = cast(
                "AsyncGenerator[list[RecordedEvent], None]", self._store.follow_batches(since + 1)
            )
            async with contextlib.aclosing(following) as batches:
                async for batch in batches:
                    views.extend(event_view(r) for r in batch if may_read(token, _network_of(r)))
                    if batch[-1].seq >= head or len(views) >= MAX_EVENTS:
                        break
        return views[:MAX_EVENTS]

    async def _event_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: what /api/events has after `since`, then each
        new event as it is appended, until the client goes away, or its token
        is revoked or expires (checked again at each event and keepalive: a
        stream opened before must not outlive the token; the last message is
        then an `unauthorized` event with the refusal)."""
        token = request[_TOKEN]
        since = _since(request)
        tail = _count(request.query.get("tail"), "tail")
        if tail:  # only the last `tail` events before the live ones (a page's first look)
            since = max(since, await self._store.last_sequence() - tail)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        queue: asyncio.Queue[RecordedEvent] = asyncio.Queue(maxsize=1000)

        async def pump() -> None:  # cancelled at the end, which ends its consumer
            async for recorded in self._store.follow(since + 1):
                await queue.put(recorded)

        pumping = asyncio.create_task(pump())
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                getting = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait(
                    {getting, pumping, stopping},
                    timeout=KEEPALIVE,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if getting not in done:
                    getting.cancel()
                if pumping in done or stopping in done:
                    break
                try:
                    authenticate_token(self._topology(), request[_PRESENTED], time.time())
                except Rejected as exc:
                    refusal = _encoder.encode(ErrorView(error=exc.message, code=exc.code))
                    await response.write(b"event: unauthorized\ndata: %s\n\n" % refusal)
                    break
                if getting not in done:
                    await response.write(b": keepalive\n\n")
                    continue
                recorded = getting.result()
                if may_read(token, _network_of(recorded)):
                    body = _encoder.encode(event_view(recorded))
                    await response.write(b"id: %d\ndata: %s\n\n" % (recorded.seq, body))
        except ConnectionResetError:
            pass  # the client went away
        finally:
            for task in (pumping, stopping):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumping
        return response

    async def _asset(self, request: web.Request) -> web.Response:
        name, content_type = ASSETS[request.path]
        body = (resources.files("controlplane") / "webui" / name).read_bytes()
        return web.Response(
            body=body,
            content_type=content_type,
            headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"},
        )

    async def _on_shutdown(self, _app: web.Application) -> None:
        self._stopping.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)


def _since(request: web.Request) -> int:
    """`?since=SEQ` (or an EventSource's Last-Event-ID). Raises Rejected."""
    return _count(request.query.get("since") or request.headers.get("Last-Event-ID"), "since")


def _count(text: str | None, name: str) -> int:
    """A query parameter that is a whole number (absent: 0). Raises Rejected."""
    text = text or "0"
    if not text.isdigit():
        raise Rejected(
            ErrorCode.INVALID, f"{name} must be a whole number (0 or more), not {text!r}"
        )
    return int(text)


def _network_of(recorded: RecordedEvent) -> object:
    return getattr(recorded.envelope.data, "network", None)


@dataclass
class HttpServer:
    """A running read API; `close()` stops it."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def serve_http(api: ReadApi, host: str, port: int) -> HttpServer:
    """Serve `api` on host:port (0: any free port). Raises OSError."""
    runner = web.AppRunner(api.app, access_log=None, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    return HttpServer(runner, host, int(bound))
