"""The SQLite read model: topology rows (with desired-state revisions), checkpoint.

The projection runner writes the rows an event touched and the checkpoint in
one transaction, so a crash never applies an event twice or skips one. The
file can be deleted at any time: the runner rebuilds it from the stream, and a
file of another schema version is deleted and rebuilt on open.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec
import structlog

from projections.topology import (
    Client,
    DnsRecord,
    EnrollmentKey,
    Gateway,
    Host,
    Network,
    Node,
    Relay,
    RelayPair,
    Topology,
    Touched,
    compiled,
)

SCHEMA_VERSION = 7

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoint (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS networks (
    name TEXT PRIMARY KEY, cidr TEXT NOT NULL, listen_port INTEGER NOT NULL,
    mtu INTEGER NOT NULL, keepalive INTEGER NOT NULL, created_at REAL NOT NULL,
    revision INTEGER NOT NULL, policy_text TEXT NOT NULL, policy_seq INTEGER NOT NULL,
    dns_domain TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dns_records (
    network TEXT NOT NULL, name TEXT NOT NULL, a TEXT NOT NULL, aaaa TEXT NOT NULL,
    cname TEXT NOT NULL, PRIMARY KEY (network, name));
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, network TEXT NOT NULL, secret_sha256 TEXT NOT NULL,
    uses INTEGER, used INTEGER NOT NULL, expires_at REAL, revoked INTEGER NOT NULL,
    created_at REAL NOT NULL, tags TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS retired_keys (key_id TEXT PRIMARY KEY, network TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (
    host_id TEXT PRIMARY KEY, name TEXT NOT NULL, public_key TEXT NOT NULL,
    listen_port INTEGER NOT NULL, endpoints TEXT NOT NULL, registered_at REAL NOT NULL,
    revision INTEGER NOT NULL, signing_key TEXT NOT NULL, key_epoch INTEGER NOT NULL,
    seen TEXT NOT NULL, seen_by TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, network TEXT NOT NULL, host_id TEXT NOT NULL,
    name TEXT NOT NULL, address TEXT NOT NULL, joined_at REAL NOT NULL, tags TEXT NOT NULL,
    exit_via TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS nodes_network ON nodes (network);
CREATE TABLE IF NOT EXISTS gateways (
    network TEXT NOT NULL, node_id TEXT NOT NULL, ranges TEXT NOT NULL,
    nat INTEGER NOT NULL, metric INTEGER NOT NULL, PRIMARY KEY (network, node_id));
CREATE TABLE IF NOT EXISTS ingress (
    network TEXT NOT NULL, node_id TEXT NOT NULL, PRIMARY KEY (network, node_id));
CREATE TABLE IF NOT EXISTS clients (
    network TEXT NOT NULL, name TEXT NOT NULL, public_key TEXT NOT NULL, address TEXT NOT NULL,
    via TEXT NOT NULL, created_at REAL NOT NULL, full_tunnel INTEGER NOT NULL,
    PRIMARY KEY (network, name));
CREATE TABLE IF NOT EXISTS relays (
    network TEXT NOT NULL, node_id TEXT NOT NULL, host_id TEXT NOT NULL,
    low INTEGER NOT NULL, high INTEGER NOT NULL, PRIMARY KEY (network, node_id));
CREATE TABLE IF NOT EXISTS relay_pairs (
    network TEXT NOT NULL, relay TEXT NOT NULL, host_a TEXT NOT NULL, host_b TEXT NOT NULL,
    port_a INTEGER NOT NULL, port_b INTEGER NOT NULL, asked_by TEXT NOT NULL,
    PRIMARY KEY (network, host_a, host_b));
"""

log = structlog.get_logger("netmesh.projections")

CHECKPOINT = "topology"
# Rows written between WAL checkpoints (SQLite's own default is 1,000 pages,
# some 4 MB: about this many rows of ours).
CHECKPOINT_EVERY_ROWS = 20_000


class ReadModel:
    """aiosqlite connection to the read model. Writes come only from the runner."""

    def __init__(self, db: aiosqlite.Connection, writer: sqlite3.Connection) -> None:
        self.db = db  # reads (queries, loading), and WAL checkpoints, on aiosqlite's thread
        self._writer = writer  # the runner's writes, on the event loop
        self._rows_since_checkpoint = 0
        self._checkpointing: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path | str) -> ReadModel:
        db = await cls._connect(path)
        async with db.execute("SELECT name FROM sqlite_master WHERE name = 'meta'") as cur:
            has_meta = await cur.fetchone() is not None
        if has_meta:
            async with db.execute("SELECT value FROM meta WHERE key = 'schema'") as cur:
                row = await cur.fetchone()
            if row is None or row["value"] != str(SCHEMA_VERSION):
                # A projection of another shape: cheaper and safer to rebuild
                # from the stream than to migrate.
                await db.close()
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
                db = await cls._connect(path)
        await db.executescript(SCHEMA)
        await db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
        )
        await db.commit()
        writer = sqlite3.connect(str(path), uri=_is_uri(path))
        writer.execute("PRAGMA synchronous=NORMAL")
        # Checkpoints (the only writes that wait for the disk) are not run
        # inside a commit on the event loop, but by `_checkpoint_soon`.
        writer.execute("PRAGMA wal_autocheckpoint=0")
        return cls(db, writer)

    @staticmethod
    async def _connect(path: Path | str) -> aiosqlite.Connection:
        db = await aiosqlite.connect(str(path), uri=_is_uri(path))
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        return db

    async def close(self) -> None:
        if self._checkpointing is not None:
            await asyncio.wait([self._checkpointing])
        await self.db.close()
        self._writer.close()

    async def checkpoint(self) -> int:
        async with self.db.execute(
            "SELECT seq FROM checkpoint WHERE name = ?", (CHECKPOINT,)
        ) as cur:
            row = await cur.fetchone()
        return int(row["seq"]) if row else 0

    async def load_topology(self) -> Topology:
        topology = Topology()
        policies = {}
        for row in await self._all("SELECT * FROM networks"):
            values = dict(row)
            policies[row["name"]] = values.pop("policy_text")
            topology.networks[row["name"]] = Network(**values)
        for row in await self._all("SELECT * FROM dns_records"):
            network = topology.networks.get(row["network"])
            if network is not None:
                network.records[row["name"]] = DnsRecord(
                    name=row["name"],
                    a=tuple(msgspec.json.decode(row["a"])),
                    aaaa=tuple(msgspec.json.decode(row["aaaa"])),
                    cname=row["cname"],
                )
        for row in await self._all("SELECT * FROM keys"):
            values = dict(row)
            values["revoked"] = bool(values["revoked"])
            values["tags"] = tuple(msgspec.json.decode(values["tags"]))
            topology.keys[row["key_id"]] = EnrollmentKey(**values)
        for row in await self._all("SELECT * FROM retired_keys"):
            topology.retired_keys[row["key_id"]] = row["network"]
        for row in await self._all("SELECT * FROM hosts"):
            values = dict(row)
            values["endpoints"] = tuple(msgspec.json.decode(values["endpoints"]))
            host = Host(**values)
            topology.hosts[host.host_id] = host
            topology.host_by_public_key[host.public_key] = host.host_id
        for row in await self._all("SELECT * FROM nodes"):
            values = dict(row)
            values["tags"] = frozenset(msgspec.json.decode(values["tags"]))
            topology.add_node(Node(**values))
        for row in await self._all("SELECT * FROM gateways"):
            ranges = tuple(msgspec.json.decode(row["ranges"]))
            gateway = Gateway(row["node_id"], ranges, bool(row["nat"]), row["metric"])
            topology.networks[row["network"]].gateways[row["node_id"]] = gateway
        for row in await self._all("SELECT * FROM ingress"):
            topology.networks[row["network"]].ingress.add(row["node_id"])
        for row in await self._all("SELECT * FROM clients"):
            values = dict(row)
            network = topology.networks[values.pop("network")]
            values["full_tunnel"] = bool(values["full_tunnel"])
            topology.add_client(network, Client(**values))
        for row in await self._all("SELECT * FROM relays"):
            relay = Relay(row["node_id"], row["host_id"], (row["low"], row["high"]))
            topology.networks[row["network"]].relays[relay.node_id] = relay
        for row in await self._all("SELECT * FROM relay_pairs"):
            pair = RelayPair(
                row["relay"],
                (row["host_a"], row["host_b"]),
                (row["port_a"], row["port_b"]),
                row["asked_by"],
            )
            topology.networks[row["network"]].relay_pairs[pair.key] = pair
        for name, text in policies.items():
            if text:  # compiled and indexed once its members are in
                network = topology.networks[name]
                policy, network.policy_error = compiled(text)
                topology.set_policy(network, policy)
                network.policy_text = text
                network.previous_policy = None
        topology.last_seq = await self.checkpoint()
        async with self.db.execute("SELECT seq FROM checkpoint WHERE name = 'signed_seen'") as cur:
            topology.signed_seen = await cur.fetchone() is not None
        return topology

    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[aiosqlite.Row]:
        async with self.db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def commit(self, topology: Topology, touched: Touched, seq: int) -> None:
        """Persist what a batch of events changed, with its checkpoint, in one
        transaction (a crash loses the whole batch and replays it).

        Written on the event loop, with no thread hop: a batch costs SQLite
        some 3 us per row of CPU and no disk wait (WAL, synchronous=NORMAL: a
        commit does not fsync). A writer thread cost more than it saved: its
        parameter binding needs the GIL, so it and the loop (nats-py's parsing,
        the fold) kept waiting for each other (a replay waited 35-50 us per
        event on commits, 5 without the thread; handing a command's batch to it
        was an eighth of the control plane's time). Checkpoints, which do wait
        for the disk, run on aiosqlite's thread every so many rows
        (`_checkpoint_soon`).
        """
        # `fold` adds the hosts and networks whose desired revisions moved.
        networks = touched.networks
        touched_networks = [n for n in (topology.networks.get(name) for name in networks) if n]
        removed_nodes = [(n,) for n in touched.nodes if n not in topology.nodes]
        hosts = touched.hosts | touched.reconfigured
        writes: list[tuple[str, list[tuple[Any, ...]]]] = [
            (
                "DELETE FROM networks WHERE name = ?",
                [(n,) for n in networks if n not in topology.networks],
            ),
            # A network's records are few: rewritten whole with the network.
            ("DELETE FROM dns_records WHERE network = ?", [(n,) for n in networks]),
            (
                "INSERT INTO dns_records VALUES (?, ?, ?, ?, ?)",
                [
                    (n.name, r.name, _json_list(r.a), _json_list(r.aaaa), r.cname)
                    for n in (topology.networks.get(name) for name in networks)
                    if n is not None
                    for r in n.records.values()
                ],
            ),
            (
                "INSERT OR REPLACE INTO networks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        n.name,
                        n.cidr,
                        n.listen_port,
                        n.mtu,
                        n.keepalive,
                        n.created_at,
                        n.revision,
                        n.policy_text,
                        n.policy_seq,
                        n.dns_domain,
                    )
                    for n in (topology.networks.get(name) for name in networks)
                    if n is not None
                ],
            ),
            (
                "DELETE FROM keys WHERE key_id = ?",
                [(k,) for k in touched.keys if k not in topology.keys],
            ),
            (
                "INSERT OR REPLACE INTO retired_keys VALUES (?, ?)",
                [
                    (k, topology.retired_keys[k])
                    for k in touched.keys
                    if k not in topology.keys and k in topology.retired_keys
                ],
            ),
            (
                "INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        key.key_id,
                        key.network,
                        key.secret_sha256,
                        key.uses,
                        key.used,
                        key.expires_at,
                        int(key.revoked),
                        key.created_at,
                        _json_list(key.tags),
                    )
                    for key in (topology.keys.get(k) for k in touched.keys)
                    if key is not None
                ],
            ),
            (
                "INSERT OR REPLACE INTO hosts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        host.host_id,
                        host.name,
                        host.public_key,
                        host.listen_port,
                        msgspec.json.encode(list(host.endpoints)).decode(),
                        host.registered_at,
                        host.revision,
                        host.signing_key,
                        host.key_epoch,
                        host.seen,
                        host.seen_by,
                    )
                    for host in (topology.hosts.get(h) for h in hosts)
                    if host is not None
                ],
            ),
            (
                "DELETE FROM nodes WHERE node_id = ?",
                [(n,) for n in touched.nodes if n not in topology.nodes],
            ),
            (
                "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        node.node_id,
                        node.network,
                        node.host_id,
                        node.name,
                        node.address,
                        node.joined_at,
                        _json_list(node.tags),
                        node.exit_via,
                    )
                    for node in (topology.nodes.get(n) for n in touched.nodes)
                    if node is not None
                ],
            ),
            # A network's gateways, rewritten whole with it: a few rows, and
            # only for the networks the batch touched.
            ("DELETE FROM gateways WHERE network = ?", [(n,) for n in networks]),
            (
                "DELETE FROM gateways WHERE node_id = ?",
                [(n,) for n in touched.nodes if n not in topology.nodes],
            ),
            (
                "INSERT INTO gateways VALUES (?, ?, ?, ?, ?)",
                [
                    (n.name, g.node_id, _json_list(g.ranges), int(g.nat), g.metric)
                    for n in (topology.networks.get(name) for name in networks)
                    if n is not None
                    for g in n.gateways.values()
                ],
            ),
            # Ingress gateways and clients likewise, whole per network.
            *(
                (f"DELETE FROM {table} WHERE network = ?", [(n,) for n in networks])
                for table in ("ingress", "clients", "relays", "relay_pairs")
            ),
            # A removed node takes its clients (an ingress gateway's) with it.
            ("DELETE FROM ingress WHERE node_id = ?", removed_nodes),
            ("DELETE FROM clients WHERE via = ?", removed_nodes),
            ("DELETE FROM relays WHERE node_id = ?", removed_nodes),
            ("DELETE FROM relay_pairs WHERE relay = ?", removed_nodes),
            (
                "INSERT INTO ingress VALUES (?, ?)",
                [(n.name, node_id) for n in touched_networks for node_id in sorted(n.ingress)],
            ),
            (
                "INSERT INTO clients VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        n.name,
                        c.name,
                        c.public_key,
                        c.address,
                        c.via,
                        c.created_at,
                        int(c.full_tunnel),
                    )
                    for n in touched_networks
                    for c in n.clients.values()
                ],
            ),
            (
                "INSERT INTO relays VALUES (?, ?, ?, ?, ?)",
                [
                    (n.name, r.node_id, r.host_id, *r.ports)
                    for n in touched_networks
                    for r in n.relays.values()
                ],
            ),
            (
                "INSERT INTO relay_pairs VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (n.name, p.relay, *p.hosts, *p.ports, p.asked_by)
                    for n in touched_networks
                    for p in n.relay_pairs.values()
                ],
            ),
            ("INSERT OR REPLACE INTO checkpoint VALUES (?, ?)", [(CHECKPOINT, seq)]),
            (
                "INSERT OR REPLACE INTO checkpoint VALUES ('signed_seen', ?)",
                [(1,)] if topology.signed_seen else [],
            ),
        ]
        rows = [(sql, rows) for sql, rows in writes if rows]
        self._write(rows)
        self._rows_since_checkpoint += sum(len(r) for _, r in rows)
        if self._rows_since_checkpoint >= CHECKPOINT_EVERY_ROWS:
            self._checkpoint_soon()

    def _checkpoint_soon(self) -> None:
        """Copy the WAL into the database file, off the event loop (it fsyncs)."""
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        self._rows_since_checkpoint = 0

        async def checkpoint() -> None:
            # PASSIVE: never waits for readers; what it cannot copy now, the next one does.
            try:
                async with self.db.execute("PRAGMA wal_checkpoint(PASSIVE)"):
                    pass
            except Exception as exc:  # the WAL only grows until the next one
                log.warning("read model checkpoint failed", error=repr(exc))

        self._checkpointing = asyncio.create_task(checkpoint())

    def _write(self, writes: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        db = self._writer
        try:
            for sql, rows in writes:
                db.executemany(sql, rows)
            db.commit()
        except BaseException:
            db.rollback()
            raise


def _is_uri(path: Path | str) -> bool:
    """A `file:` URI: a read model in memory (`file:NAME?mode=memory&cache=shared`,
    its two connections sharing it), as time travel builds them."""
    return isinstance(path, str) and path.startswith("file:")


def _json_list(items: Iterable[str]) -> str:
    return msgspec.json.encode(sorted(items)).decode()
