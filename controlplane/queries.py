"""Answers to `netmesh.query.<what>`, read from the SQLite read model (and,
for admins, from the write model): `QueryService` answers the requests.

Each query function returns plain JSON-able data; the service wraps it in a Reply.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError

from controlplane.convergence import AppliedLookup, Convergence
from controlplane.hooks import HookDelivery
from controlplane.policyviews import explain_access, plan_policy_change, show_policy
from controlplane.replies import Responder
from controlplane.rules.base import Rejected
from controlplane.rules.ingress import client_view
from controlplane.rules.nodes import match_node
from controlplane.rules.relays import relay_view
from controlplane.rules.tokens import token_live
from controlplane.timetravel import TimeTravel
from events.commands import ErrorCode, Reply
from events.dns import fqdn, node_label
from events.logfilter import Point
from events.reports import APPLIED, applied_decoder
from events.signing import COMMAND_SIGNER_HEADER, SIGNATURE_HEADER
from events.subjects import QUERY_PREFIX, REPORTS_STREAM, report_subject
from projections.desired import peer_endpoint
from projections.sections.paths import endpoint_ip
from projections.sqlite import ReadModel
from projections.timetravel import diff, view_of
from projections.topology import Gateway, Host, Network, Topology

log = structlog.get_logger("netmesh.controlplane")


async def _rows(model: ReadModel, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    async with model.db.execute(sql, params) as cur:
        return [dict(r) for r in await cur.fetchall()]


async def list_networks(model: ReadModel) -> list[dict[str, Any]]:
    return await _rows(
        model,
        "SELECT n.name, n.cidr, n.listen_port, n.mtu, n.keepalive, n.dns_domain, n.created_at,"
        " (SELECT COUNT(*) FROM nodes WHERE network = n.name) AS nodes"
        " FROM networks n ORDER BY n.name",
    )


async def show_network(model: ReadModel, name: str, now: float) -> dict[str, Any]:
    rows = [n for n in await list_networks(model) if n["name"] == name]
    if not rows:
        raise Rejected(ErrorCode.NOT_FOUND, f"no network named {name!r}")
    network = rows[0]
    network["members"] = await list_nodes(model, name)
    network["keys"] = [k for k in await list_keys(model, now) if k["network"] == name]
    return network


async def list_dns(model: ReadModel, network: str | None = None) -> list[dict[str, Any]]:
    """Every name the networks' DNS servers answer (as a host that sees every
    member has them), one row per value: nodes' names and custom records; a
    record whose name a node took later is `shadowed` (the node answers)."""
    where, params = ("WHERE n.name = ?", (network,)) if network is not None else ("", ())
    networks = await _rows(model, f"SELECT n.name, n.dns_domain FROM networks n {where}", params)
    if network is not None and not networks:
        raise Rejected(ErrorCode.NOT_FOUND, f"no network named {network!r}")
    domains = {row["name"]: row["dns_domain"] for row in networks}
    rows: list[dict[str, Any]] = []
    taken: set[str] = set()
    for node in await _rows(model, "SELECT network, name, address FROM nodes ORDER BY node_id"):
        label = node_label(node["name"])
        domain = domains.get(node["network"])
        if label is None or domain is None or fqdn(label, domain) in taken:
            continue
        taken.add(fqdn(label, domain))
        kind = "AAAA" if ":" in node["address"] else "A"
        rows.append(_dns_row(fqdn(label, domain), node["network"], kind, node["address"], "node"))
    for record in await _rows(model, "SELECT * FROM dns_records"):
        domain = domains.get(record["network"])
        if domain is None:
            continue
        name = fqdn(record["name"], domain)
        values = [("A", a) for a in msgspec.json.decode(record["a"])]
        values += [("AAAA", a) for a in msgspec.json.decode(record["aaaa"])]
        values += [("CNAME", record["cname"])] if record["cname"] else []
        for kind, value in values:
            row = _dns_row(name, record["network"], kind, value, "record")
            rows.append({**row, "shadowed": name in taken})
    return sorted(rows, key=lambda r: (r["network"], r["name"], r["type"], r["value"]))


def _dns_row(name: str, network: str, kind: str, value: str, source: str) -> dict[str, Any]:
    return {
        "name": name,
        "network": network,
        "type": kind,
        "value": value,
        "source": source,
        "shadowed": False,
    }


def _endpoint(row: dict[str, Any]) -> str | None:
    host = Host(
        host_id=row["host_id"],
        name=row["host_name"],
        public_key=row["public_key"],
        listen_port=row["listen_port"],
        endpoints=tuple(msgspec.json.decode(row["endpoints"])),
        registered_at=0.0,
    )
    return peer_endpoint(host)


NODE_SQL = (
    "SELECT nd.node_id AS id, nd.name, nd.network, nd.address, nd.host_id, nd.joined_at, nd.tags,"
    " h.name AS host_name, h.public_key, h.listen_port, h.endpoints, n.cidr, ex.name AS exit_via"
    " FROM nodes nd JOIN hosts h ON h.host_id = nd.host_id"
    " JOIN networks n ON n.name = nd.network"
    " LEFT JOIN nodes ex ON ex.node_id = nd.exit_via AND nd.exit_via != ''"
)


def _node(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "network": row["network"],
        "address": row["address"],
        "interface_address": f"{row['address']}/{ipaddress.ip_network(row['cidr']).prefixlen}",
        "host_id": row["host_id"],
        "public_key": row["public_key"],
        "endpoint": _endpoint(row),
        "listen_port": row["listen_port"],
        "joined_at": row["joined_at"],
        "tags": sorted(msgspec.json.decode(row["tags"])),
        "exit_via": row["exit_via"],  # the internet gateway its default route goes through
    }


async def list_nodes(model: ReadModel, network: str | None = None) -> list[dict[str, Any]]:
    if network is not None:
        if not await _rows(model, "SELECT 1 FROM networks WHERE name = ?", (network,)):
            raise Rejected(ErrorCode.NOT_FOUND, f"no network named {network!r}")
        rows = await _rows(
            model, NODE_SQL + " WHERE nd.network = ? ORDER BY nd.network, nd.name", (network,)
        )
    else:
        rows = await _rows(model, NODE_SQL + " ORDER BY nd.network, nd.name")
    return [_node(r) for r in rows]


async def find_node(model: ReadModel, ref: str) -> dict[str, Any]:
    """By id, NETWORK/NAME, or a name unique across networks."""
    nodes = await list_nodes(model)
    return match_node(ref, nodes, lambda n: (n["id"], n["network"], n["name"]))


def key_state(key: dict[str, Any], now: float) -> str:
    if key["revoked"]:
        return "revoked"
    if key["expires_at"] is not None and now >= key["expires_at"]:
        return "expired"
    if key["uses"] is not None and key["used"] >= key["uses"]:
        return "used up"
    return "active"


async def list_keys(model: ReadModel, now: float) -> list[dict[str, Any]]:
    rows = await _rows(
        model,
        "SELECT key_id, network, uses, used, expires_at, revoked, created_at, tags FROM keys"
        " ORDER BY created_at, key_id",
    )
    for row in rows:
        row["revoked"] = bool(row["revoked"])
        row["tags"] = sorted(msgspec.json.decode(row["tags"]))
        row["state"] = key_state(row, now)
    return rows


async def desired_revisions(model: ReadModel) -> dict[str, int]:
    """Each host's desired revision, as `Topology.revision_of` derives it."""
    rows = await _rows(
        model,
        "SELECT h.host_id, MAX(h.revision, COALESCE(MAX(n.revision), 0)) AS revision"
        " FROM hosts h LEFT JOIN nodes d ON d.host_id = h.host_id"
        " LEFT JOIN networks n ON n.name = d.network GROUP BY h.host_id",
    )
    return {r["host_id"]: int(r["revision"]) for r in rows}


async def status(model: ReadModel, applied: AppliedLookup) -> list[dict[str, Any]]:
    """Each node: desired vs applied revision of its host."""
    desired = await desired_revisions(model)
    out = []
    nodes = await list_nodes(model)
    names = {n["public_key"]: n["name"] for n in nodes}
    # An ingress gateway's peers include its external clients.
    for client in await _rows(model, "SELECT public_key, name FROM clients"):
        names.setdefault(client["public_key"], f"client {client['name']}")
    reaches = await _reaches(model)
    relays = await _relays(model)
    reports = await _reports(applied, {n["host_id"] for n in nodes})
    for node in nodes:
        host_id = node["host_id"]
        report = reports[host_id]
        applied_revision = report.get("revision") if report else None
        want = desired.get(host_id)
        if report is None:
            state = "never reported"
        elif report.get("error"):
            state = "error"
        elif want is not None and applied_revision is not None and applied_revision >= want:
            state = "in sync"
        else:
            state = "behind"
        out.append(
            {
                "id": node["id"],
                "name": node["name"],
                "network": node["network"],
                "address": node["address"],
                "desired_revision": want,
                "applied_revision": applied_revision,
                "state": state,
                "reported_at": report.get("at") if report else None,
                "error": report.get("error") if report else None,
                # Desired states the agent refused (bad or missing signature).
                "rejected": report.get("rejected", 0) if report else 0,
                "last_rejection": report.get("last_rejection") if report else None,
                "peers": _peers(report, names, reaches, relays),
            }
        )
    return out


# Report lookups in flight at once: one round trip to JetStream each.
REPORT_READS = 32


async def _reports(applied: AppliedLookup, host_ids: set[str]) -> dict[str, dict[str, Any] | None]:
    """Each host's latest report, read a few at a time (one after another,
    a status of 500 hosts took 500 round trips: ~110 ms here)."""
    gate = asyncio.Semaphore(REPORT_READS)

    async def read(host_id: str) -> dict[str, Any] | None:
        async with gate:
            return await applied(host_id)

    ordered = sorted(host_ids)
    return dict(zip(ordered, await asyncio.gather(*map(read, ordered)), strict=True))


# WireGuard re-handshakes every 2 minutes while traffic flows (keepalives keep
# it flowing); a handshake older than this means the peer is not reachable.
CONNECTED_WITHIN = 180.0


async def _reaches(model: ReadModel) -> dict[str, tuple[frozenset[str], str]]:
    """Per host's public key: the addresses it announced, and where a peer
    last saw it from (its NAT mapping, "" if none)."""
    rows = await _rows(model, "SELECT public_key, endpoints, seen FROM hosts")
    return {
        r["public_key"]: (
            frozenset(endpoint_ip(e) for e in msgspec.json.decode(r["endpoints"])),
            r["seen"],
        )
        for r in rows
    }


# A relay's address -> (its first and last pair port, its node's name).
Relays = dict[str, list[tuple[int, int, str]]]


async def _relays(model: ReadModel) -> Relays:
    rows = await _rows(
        model,
        "SELECT h.endpoints, r.low, r.high, n.name FROM relays r"
        " JOIN hosts h ON h.host_id = r.host_id JOIN nodes n ON n.node_id = r.node_id",
    )
    found: Relays = {}
    for r in rows:
        for address in msgspec.json.decode(r["endpoints"]):
            found.setdefault(endpoint_ip(address), []).append((r["low"], r["high"], r["name"]))
    return found


def path_of(
    endpoint: str | None, announced: frozenset[str], seen: str, relays: Relays | None = None
) -> str | None:
    """How a peer is reached at `endpoint`: "direct" (an address it announced),
    "direct, nat" (its NAT's public mapping) or "relay NAME" (a relay's pair
    port); None when unknown."""
    if not endpoint:
        return None
    ip = endpoint_ip(endpoint)
    port = endpoint.rpartition(":")[2]
    for low, high, name in (relays or {}).get(ip, ()):
        if port.isdigit() and low <= int(port) <= high:
            return f"relay {name}"
    if ip in announced:
        return "direct"
    if seen and ip == endpoint_ip(seen):
        return "direct, nat"
    return None


def _peers(
    report: dict[str, Any] | None,
    names: dict[str, str],
    reaches: dict[str, tuple[frozenset[str], str]] | None = None,
    relays: Relays | None = None,
) -> list[dict[str, Any]]:
    if not report:
        return []
    reaches = reaches or {}
    at = float(report.get("at") or 0.0)
    peers = []
    for peer in report.get("peers", []):
        handshake = float(peer.get("last_handshake") or 0.0)
        peers.append(
            {
                **peer,
                "name": names.get(peer.get("public_key", ""), ""),
                "handshake_age": round(at - handshake, 1) if handshake else None,
                "connected": bool(handshake) and at - handshake < CONNECTED_WITHIN,
                "path": path_of(
                    peer.get("endpoint"),
                    *reaches.get(peer.get("public_key", ""), (frozenset(), "")),
                    relays,
                ),
            }
        )
    return peers


async def hook_rows(hooks: HookDelivery, topology: Topology) -> list[dict[str, Any]]:
    """Each webhook and how its deliveries go (failing: since when, why)."""
    rows = []
    for hook in sorted(topology.hooks.values(), key=lambda h: h.added_seq):
        status = await hooks.status(hook.hook_id)
        rows.append(
            {
                "hook_id": hook.hook_id,
                "url": hook.url,
                "events": hook.events,
                "added_at": hook.added_at,
                "pending": await hooks.pending(hook.hook_id),
                "state": "failing" if status.failures else "ok",
                **msgspec.to_builtins(status),
            }
        )
    return rows


def list_tokens(topology: Topology, now: float) -> list[dict[str, Any]]:
    """`admin token list`: every read API token and its state, never its digest."""
    return [
        {
            "name": t.name,
            "role": t.role,
            "networks": list(t.networks),
            "created_at": t.created_at,
            "expires_at": t.expires_at,
            "last_used_at": t.last_used_at,
            "state": "revoked" if t.revoked else "active" if token_live(t, now) else "expired",
        }
        for t in sorted(topology.tokens.values(), key=lambda t: t.name)
    ]


class QueryArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str | None = None
    network: str | None = None
    node: str | None = None
    # Access policy queries: a document to plan, the two ends and port to explain.
    document: str | None = None
    source: str | None = None
    destination: str | None = None
    port: str | None = None
    # As of this point of the log (`--at`), for the queries in PAST_QUERIES;
    # `diff`: what changed from `at` to `to`.
    at: Point | None = None
    to: Point | None = None
    # `convergence`: the command whose last event is `seq` (None: every host).
    seq: int | None = None
    command: str | None = None
    # Read-your-writes: answer once this replica has applied event `min_seq`
    # (the last write the asker saw acknowledged, whichever replica made it).
    min_seq: int | None = None


# How long a query waits for its replica to apply `min_seq`.
MIN_SEQ_WAIT = 5.0

# Until this replica has applied event `seq` (write and read model), within
# `timeout`: the sequence it has applied when it has not (None when it has).
CaughtUp = Callable[[int, float], Awaitable[int | None]]


# What can be asked as of a past point: the topology's queries (not agents'
# reports, which are not in the log).
PAST_QUERIES = frozenset(
    {
        "networks",
        "network",
        "nodes",
        "node",
        "keys",
        "policy",
        "admins",
        "gateways",
        "dns",
        "clients",
        "client",
        "relays",
    }
)


def _networks(topology: Topology, network: str | None) -> list[tuple[str, Network]]:
    """The networks a list is over, by name: one (which must exist) or all."""
    if network is not None and network not in topology.networks:
        raise Rejected(ErrorCode.NOT_FOUND, f"no network {network!r}")
    return [(n, net) for n, net in sorted(topology.networks.items()) if network in (None, n)]


def list_gateways(topology: Topology, network: str | None) -> list[dict[str, Any]]:
    """Every gateway (of one network), egress and ingress, from the write model's topology."""
    found = []
    for name, net in _networks(topology, network):
        kinds: list[tuple[str, str, Gateway | None]]
        kinds = [(g.node_id, "egress", g) for g in net.gateways.values()]
        kinds += [(node_id, "ingress", None) for node_id in sorted(net.ingress)]
        for node_id, kind, gateway in kinds:
            node = topology.nodes.get(node_id)
            if node is None:
                continue
            row: dict[str, Any] = {
                "network": name,
                "node_id": node.node_id,
                "name": node.name,
                "address": node.address,
                "kind": kind,
            }
            if gateway is not None:
                row.update(ranges=list(gateway.ranges), nat=gateway.nat, metric=gateway.metric)
            else:
                row["clients"] = [c.name for c in net.clients_via(node_id)]
            found.append(row)
    return sorted(found, key=lambda g: (g["network"], g["name"], g["kind"]))


def list_relays(topology: Topology, network: str | None) -> list[dict[str, Any]]:
    """Every relay (of one network), with the pairs it forwards."""
    return [
        relay_view(topology, net, relay)
        for _, net in _networks(topology, network)
        for _, relay in sorted(net.relays.items())
    ]


def list_clients(topology: Topology, network: str | None) -> list[dict[str, Any]]:
    """Every external client (of one network): never a private key (none is known)."""
    found = []
    for name, net in _networks(topology, network):
        for client in sorted(net.clients.values(), key=lambda c: c.name):
            via = topology.nodes.get(client.via)
            found.append(
                {
                    "network": name,
                    "name": client.name,
                    "address": client.address,
                    "public_key": client.public_key,
                    "via": via.name if via is not None else None,
                    "via_node_id": client.via,
                    "full_tunnel": client.full_tunnel,
                    "created_at": client.created_at,
                }
            )
    return found


def show_client(topology: Topology, network: str, name: str) -> dict[str, Any]:
    """One client, with what its configuration needs (`client_view`)."""
    net = topology.networks.get(network)
    if net is None:
        raise Rejected(ErrorCode.NOT_FOUND, f"no network {network!r}")
    client = net.clients.get(name)
    if client is None:
        raise Rejected(ErrorCode.NOT_FOUND, f"network {network!r} has no client named {name!r}")
    row = next(c for c in list_clients(topology, network) if c["name"] == name)
    return {**row, **client_view(topology, net, client)}


# (verb, payload, signer, signature) -> what the command would do (`CommandPipeline.plan`).
Planner = Callable[[str, bytes, str | None, str | None], Reply]

# `netmesh.query.plan.<verb>`: a command's plan, the payload the command's own.
PLAN_QUERY = "plan."


class QueryService:
    def __init__(
        self,
        nc: Client,
        responder: Responder,
        model: Callable[[], ReadModel | None],
        topology: Callable[[], Topology],
        planner: Planner | None = None,
        timetravel: TimeTravel | None = None,
    ) -> None:
        self._js = nc.jetstream()
        self._responder = responder
        self._model = model
        self._topology = topology
        self._planner = planner
        self._timetravel = timetravel
        self.convergence: Convergence | None = None  # set by the service once it has its parts
        self.hooks: HookDelivery | None = None
        self.caught_up: CaughtUp | None = None  # likewise

    async def on_query(self, msg: Msg) -> None:
        what = msg.subject[len(QUERY_PREFIX) + 1 :]
        if what.startswith(PLAN_QUERY) and self._planner is not None:
            await self._responder.answer(msg, self._plan(what[len(PLAN_QUERY) :], msg))
            return
        try:
            args = msgspec.json.decode(msg.data or b"{}", type=QueryArgs)
            reply = Reply(ok=True, result=await self.answer(what, args))
        except Rejected as exc:
            reply = Reply.refused(exc.code, exc.message)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            reply = Reply.refused(ErrorCode.INVALID, f"invalid query: {exc}")
        except Exception:
            log.exception("query failed", what=what)
            reply = Reply.refused(ErrorCode.INTERNAL, "internal error (see the server log)")
        await self._responder.answer(msg, reply)

    def _plan(self, verb: str, msg: Msg) -> Reply:
        assert self._planner is not None
        headers = msg.headers or {}
        try:
            return self._planner(
                verb, msg.data, headers.get(COMMAND_SIGNER_HEADER), headers.get(SIGNATURE_HEADER)
            )
        except Exception:  # the service must outlive any one plan
            log.exception("plan failed", verb=verb)
            return Reply.refused(ErrorCode.INTERNAL, "internal error (see the server log)")

    async def answer(self, what: str, args: QueryArgs) -> Any:
        """Raises Rejected."""
        if args.min_seq is not None and self.caught_up is not None:
            behind = await self.caught_up(args.min_seq, MIN_SEQ_WAIT)
            if behind is not None:
                raise Rejected(
                    ErrorCode.UNAVAILABLE,
                    f"the control plane that answered has applied event #{behind}, not yet "
                    f"#{args.min_seq} (your last change): waited {MIN_SEQ_WAIT:.0f} s; try again",
                )
        if what == "diff" or args.at is not None:
            return await self._answer_from_the_past(what, args)
        model = self._model()
        assert model is not None
        return await self._read(what, args, model, self._topology(), time.time())

    async def _answer_from_the_past(self, what: str, args: QueryArgs) -> Any:
        """Raises Rejected."""
        travel = self._timetravel
        if travel is None:
            raise Rejected(ErrorCode.INVALID, "this control plane does not keep the past")
        if what == "diff":
            if args.at is None or args.to is None:
                raise Rejected(ErrorCode.INVALID, "diff needs two points: at and to")
            before, after = await travel.replay(args.at), await travel.replay(args.to)
            return {
                "from": before.seq,
                "to": after.seq,
                "changes": msgspec.to_builtins(
                    diff(view_of(before.topology), view_of(after.topology))
                ),
            }
        if what not in PAST_QUERIES:
            raise Rejected(ErrorCode.INVALID, f"{what} cannot be asked as of a past point")
        assert args.at is not None
        past = await travel.past(args.at)
        try:
            return await self._read(what, args, past.model, past.topology, past.time, live=False)
        finally:
            await travel.release(past)

    async def _read(
        self,
        what: str,
        args: QueryArgs,
        model: ReadModel,
        topology: Topology,
        now: float,
        *,
        live: bool = True,
    ) -> Any:
        """Raises Rejected."""
        match what:
            case "ping":  # a client whose command waits asks whether anyone is here
                return {}
            case "networks":
                return await list_networks(model)
            case "network":
                return await show_network(model, args.name or "", now=now)
            case "nodes":
                return await list_nodes(model, args.network)
            case "node":
                node = await find_node(model, args.node or "")
                if live:  # agents' reports are now, not then
                    rows = await status(model, self.applied_report)
                    node["status"] = next((r for r in rows if r["id"] == node["id"]), None)
                return node
            case "keys":
                return await list_keys(model, now=now)
            case "dns":
                return await list_dns(model, args.network)
            case "status":
                return await status(model, self.applied_report)
            case "convergence" if self.convergence is not None:
                return await self.convergence.answer(args.seq, args.command)
            case "hooks" if self.hooks is not None:
                return await hook_rows(self.hooks, topology)
            case "hook_test" if self.hooks is not None:
                hook = topology.hooks.get(args.name or "")
                if hook is None:
                    raise Rejected(ErrorCode.NOT_FOUND, f"no hook {args.name!r}")
                return await self.hooks.test(hook)
            # The policy's compiled form and access index are the write model's.
            case "policy":
                return show_policy(topology, args.network or "")
            case "policy_explain":
                return explain_access(
                    topology,
                    args.network or "",
                    args.source or "",
                    args.destination or "",
                    args.port,
                )
            case "policy_plan":
                return plan_policy_change(topology, args.network or "", args.document or "")
            case "gateways":
                return list_gateways(topology, args.network)
            case "clients":
                return list_clients(topology, args.network)
            case "relays":
                return list_relays(topology, args.network)
            case "client":
                return show_client(topology, args.network or "", args.name or "")
            case "admins":
                # From the write model: admins are a matter of authorization,
                # not of the read model.
                return sorted(
                    (
                        {
                            "name": a.name,
                            "role": a.role,
                            "networks": list(a.networks),
                            "public_key": a.public_key,
                        }
                        for a in topology.admins.values()
                    ),
                    key=lambda a: str(a["name"]),
                )
            case "tokens":  # read API tokens, never their secrets: the write model's too
                return list_tokens(self._topology(), time.time())
        raise Rejected(ErrorCode.INVALID, f"unknown query {what!r}")

    async def applied_report(self, host_id: str) -> dict[str, Any] | None:
        try:
            # Direct: any replica answers, not only the stream's leader (whose
            # broker's death left `status` failing until a new one was elected).
            msg = await self._js.get_last_msg(
                REPORTS_STREAM, report_subject(host_id, APPLIED), direct=True
            )
        except NotFoundError:
            return None
        if not msg.data:
            return None
        try:
            report = applied_decoder.decode(msg.data)
        except msgspec.ValidationError:
            return None
        return msgspec.to_builtins(report)  # type: ignore[no-any-return]
