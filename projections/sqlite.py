"""The SQLite read model: topology rows, published desired states, checkpoint.

The projection runner writes the rows an event touched and the checkpoint in
one transaction, so a crash never applies an event twice or skips one. The
file can be deleted at any time: the runner rebuilds it from the stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from events.desired import DesiredState, desired_decoder, desired_encoder
from projections.topology import EnrollmentKey, Host, Network, Node, Topology, Touched

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoint (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS networks (
    name TEXT PRIMARY KEY, cidr TEXT NOT NULL, listen_port INTEGER NOT NULL,
    mtu INTEGER NOT NULL, keepalive INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, network TEXT NOT NULL, secret_sha256 TEXT NOT NULL,
    uses INTEGER, used INTEGER NOT NULL, expires_at REAL, revoked INTEGER NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS retired_keys (key_id TEXT PRIMARY KEY, network TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (
    host_id TEXT PRIMARY KEY, name TEXT NOT NULL, public_key TEXT NOT NULL,
    listen_port INTEGER NOT NULL, endpoints TEXT NOT NULL, registered_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, network TEXT NOT NULL, host_id TEXT NOT NULL,
    name TEXT NOT NULL, address TEXT NOT NULL, joined_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS nodes_network ON nodes (network);
CREATE TABLE IF NOT EXISTS desired (
    host_id TEXT PRIMARY KEY, revision INTEGER NOT NULL, body BLOB NOT NULL);
"""

CHECKPOINT = "topology"


class ReadModel:
    """aiosqlite connection to the read model. Writes come only from the runner."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    @classmethod
    async def open(cls, path: Path | str) -> ReadModel:
        db = await aiosqlite.connect(str(path))
        db.row_factory = aiosqlite.Row
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(SCHEMA)
        await db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
        )
        await db.commit()
        return cls(db)

    async def close(self) -> None:
        await self.db.close()

    async def checkpoint(self) -> int:
        async with self.db.execute(
            "SELECT seq FROM checkpoint WHERE name = ?", (CHECKPOINT,)
        ) as cur:
            row = await cur.fetchone()
        return int(row["seq"]) if row else 0

    async def load_topology(self) -> Topology:
        topology = Topology()
        for row in await self._all("SELECT * FROM networks"):
            topology.networks[row["name"]] = Network(**dict(row))
        for row in await self._all("SELECT * FROM keys"):
            values = dict(row)
            values["revoked"] = bool(values["revoked"])
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
            topology.add_node(Node(**dict(row)))
        topology.last_seq = await self.checkpoint()
        return topology

    async def load_desired(self) -> dict[str, DesiredState]:
        rows = await self._all("SELECT body FROM desired")
        return {d.host_id: d for d in (desired_decoder.decode(r["body"]) for r in rows)}

    async def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[aiosqlite.Row]:
        async with self.db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def commit_event(
        self,
        topology: Topology,
        touched: Touched,
        desired: list[DesiredState],
        seq: int,
        *,
        commit: bool = True,
    ) -> None:
        """Persist what one event changed, with its checkpoint, in one transaction.

        With commit=False the transaction stays open and the next call adds to it:
        replaying a long stream commits every few hundred events, still atomically
        with the checkpoint (a crash loses the open batch and replays it).
        """
        db = self.db
        try:
            for name in touched.networks:
                net = topology.networks.get(name)
                if net is None:
                    await db.execute("DELETE FROM networks WHERE name = ?", (name,))
                else:
                    await db.execute(
                        "INSERT OR REPLACE INTO networks VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            net.name,
                            net.cidr,
                            net.listen_port,
                            net.mtu,
                            net.keepalive,
                            net.created_at,
                        ),
                    )
            for key_id in touched.keys:
                key = topology.keys.get(key_id)
                if key is None:
                    await db.execute("DELETE FROM keys WHERE key_id = ?", (key_id,))
                    retired = topology.retired_keys.get(key_id)
                    if retired is not None:
                        await db.execute(
                            "INSERT OR REPLACE INTO retired_keys VALUES (?, ?)", (key_id, retired)
                        )
                else:
                    await db.execute(
                        "INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            key.key_id,
                            key.network,
                            key.secret_sha256,
                            key.uses,
                            key.used,
                            key.expires_at,
                            int(key.revoked),
                            key.created_at,
                        ),
                    )
            for host_id in touched.hosts:
                host = topology.hosts.get(host_id)
                if host is not None:
                    await db.execute(
                        "INSERT OR REPLACE INTO hosts VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            host.host_id,
                            host.name,
                            host.public_key,
                            host.listen_port,
                            msgspec.json.encode(list(host.endpoints)).decode(),
                            host.registered_at,
                        ),
                    )
            for node_id in touched.nodes:
                node = topology.nodes.get(node_id)
                if node is None:
                    await db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))
                else:
                    await db.execute(
                        "INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            node.node_id,
                            node.network,
                            node.host_id,
                            node.name,
                            node.address,
                            node.joined_at,
                        ),
                    )
            for state in desired:
                await db.execute(
                    "INSERT OR REPLACE INTO desired VALUES (?, ?, ?)",
                    (state.host_id, state.revision, desired_encoder.encode(state)),
                )
            await db.execute("INSERT OR REPLACE INTO checkpoint VALUES (?, ?)", (CHECKPOINT, seq))
            if commit:
                await db.commit()
        except BaseException:
            await db.rollback()
            raise
