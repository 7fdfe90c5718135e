"""A real control plane on a real nats-server with its read API served on a
free loopback port, for the API's and the dashboard's tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats

from controlplane.embedded import EmbeddedNats
from controlplane.http import HttpServer, ReadApi, serve_http
from controlplane.server import read_api
from controlplane.service import ControlPlane
from tests.test_cli import ADMIN_KEY, netmesh


@dataclass
class Served:
    nats_url: str
    url: str  # http://127.0.0.1:PORT
    api: ReadApi
    plane: ControlPlane
    http: HttpServer

    async def cli(self, *args: str) -> str:
        """The CLI's stdout; it must succeed."""
        rc, out, err = await netmesh(self.nats_url, *args)
        assert rc == 0, err
        return out

    async def token(self, name: str, *args: str) -> str:
        out = (await self.cli("admin", "token", "create", name, *args)).strip()
        assert out.startswith("nma1.") and "\n" not in out, out
        return out


@contextlib.asynccontextmanager
async def served(nats_server: EmbeddedNats, data: Path) -> AsyncIterator[Served]:
    nc = await nats.connect(nats_server.url)
    plane = ControlPlane(nc, data, nats_server.url)
    await plane.start()
    ADMIN_KEY[nats_server.url] = str(data / "admin.key")
    api = read_api(plane)
    http = await serve_http(api, "127.0.0.1", 0)
    try:
        yield Served(nats_server.url, http.url, api, plane, http)
    finally:
        await http.close()  # again, when a test closed it: harmless
        await plane.stop()
        await nc.close()
