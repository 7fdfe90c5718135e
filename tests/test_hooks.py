"""Webhooks against a local HTTP server (aiohttp, on loopback) that fails, is
slow and restarts, fed by a real control plane on a real nats-server: every
matching event arrives, in order, signed, at least once; failures are
retried and reported while they last; the position survives control-plane
restarts (and the loss of the hook's consumer); two replicas deliver each
event once, in order."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from aiohttp import web

from controlplane import hooks as hooks_module
from controlplane.embedded import EmbeddedNats, free_port
from controlplane.hooks import backoff
from controlplane.metrics import PrometheusMetrics
from controlplane.streams import HOOKS_STREAM
from events.commands import Reply
from events.model import HookAdded
from events.subjects import EVENTS_STREAM
from tests.eventlog_scenario import control_plane
from tests.netns import wait_until
from tests.test_cli import ADMIN_KEY, netmesh, one_line_error
from tests.test_cli_policy import join


@dataclass
class Receiver:
    """An HTTP endpoint that records what it is sent, and answers as told."""

    port: int
    mode: str = "ok"  # ok | fail | slow
    got: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append((dict(request.headers), body))
        if self.mode == "fail":
            return web.Response(status=500, text="down for maintenance")
        if self.mode == "slow":
            await asyncio.sleep(3)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/in", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/in"

    def delivered(self) -> list[dict[str, Any]]:
        """Each event received, once, in the order first received (a retry
        repeats an event id; a test message has none)."""
        seen: dict[str, dict[str, Any]] = {}
        for headers, body in self.got:
            event_id = headers.get("Netmesh-Event-Id")
            if event_id and event_id not in seen:
                seen[event_id] = json.loads(body)
        return list(seen.values())


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(free_port())
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture(autouse=True)
def quick_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    # A slow endpoint gives up in 1 s, not 10 (the control plane reads it at start).
    monkeypatch.setattr(hooks_module, "POST_TIMEOUT", 1.0)


async def add_hook(url: str, hook_url: str, *extra: str) -> dict[str, Any]:
    rc, out, err = await netmesh(url, "hook", "add", hook_url, "--json", *extra)
    assert rc == 0, err
    return dict(json.loads(out))


async def hooks_of(url: str) -> list[dict[str, Any]]:
    rc, out, err = await netmesh(url, "hook", "list", "--json")
    assert rc == 0, err
    return list(json.loads(out))


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [int(e["seq"]) for e in events]


async def test_failures_are_retried_reported_and_nothing_is_lost(
    nats_server: EmbeddedNats, tmp_path: Path, receiver: Receiver
) -> None:
    metrics = PrometheusMetrics()
    sample = metrics.registry.get_sample_value
    async with control_plane(nats_server.url, tmp_path / "cp", metrics) as (_, admin):
        url = nats_server.url
        secret_file = tmp_path / "hook.secret"
        receiver.mode = "fail"
        added = await add_hook(
            url, receiver.url, "--events", "node.*", "--secret-file", str(secret_file)
        )
        assert "secret" not in added and secret_file.stat().st_mode & 0o777 == 0o600
        secret = secret_file.read_text().strip()
        await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
        token = (await admin.ok("key.create", network="office", uses=5))["token"]
        for n in (1, 2):
            await join(url, token, n, f"h{n}")
        await admin.ok("node.tag", node="office/h1", tags=["web"])

        # While the endpoint fails: retried, with backoff, and reported.
        await wait_until(lambda: len(receiver.got) >= 3, message="retries", timeout=20)
        (row,) = await hooks_of(url)
        assert (row["state"], row["last_error"], row["events"]) == ("failing", "HTTP 500", "node.*")
        assert row["failures"] >= 3 and row["pending"] >= 3 and row["delivered"] == 0
        rc, out, _ = await netmesh(url, "hook", "list")
        assert "failing since" in out and "HTTP 500" in out
        assert sample("netmesh_hooks_failing") == 1
        assert (sample("netmesh_hook_deliveries_total", {"outcome": "failed"}) or 0) >= 3
        first = [json.loads(b)["seq"] for _, b in receiver.got]
        assert len(set(first)) == 1  # in order: nothing after the first until it is taken
        attempts = [int(h["Netmesh-Delivery"]) for h, _ in receiver.got]
        assert attempts == list(range(1, len(attempts) + 1))

        receiver.mode = "ok"
        await wait_until(lambda: len(receiver.delivered()) == 3, message="all three", timeout=30)
        delivered = receiver.delivered()
        assert [e["type"] for e in delivered] == ["node.joined", "node.joined", "node.tagged"]
        assert seqs(delivered) == sorted(seqs(delivered))
        for headers, body in receiver.got:
            mac = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            assert headers["Netmesh-Signature"] == f"sha256={mac}"
            assert headers["Netmesh-Event-Type"].startswith("node.")

        await settled(url)
        assert sample("netmesh_hooks_failing") == 0
        assert sample("netmesh_hook_deliveries_total", {"outcome": "ok"}) == 3

        # A test message, signed too; a hook that is not there: one line, exit 1.
        rc, out, err = await netmesh(url, "hook", "test", added["hook_id"])
        assert rc == 0 and out.startswith(f"hook {added['hook_id']}: HTTP 204"), err
        test_headers, test_body = receiver.got[-1]
        assert json.loads(test_body)["type"] == "hook.test"
        mac = hmac.new(secret.encode(), test_body, hashlib.sha256).hexdigest()
        assert test_headers["Netmesh-Signature"] == f"sha256={mac}"
        receiver.mode = "fail"
        rc, _, err = await netmesh(url, "hook", "test", added["hook_id"])
        one_line_error(rc, err, "did not take the test message: HTTP 500")
        rc, _, err = await netmesh(url, "hook", "remove", "wnope")
        one_line_error(rc, err, "no hook 'wnope'")
        nowhere = str(tmp_path / "no" / "such" / "dir" / "secret")
        before = await admin.last_seq()
        rc, _, err = await netmesh(url, "hook", "add", receiver.url, "--secret-file", nowhere)
        one_line_error(rc, err, f"cannot write the secret to {nowhere}")
        rc, _, err = await netmesh(url, "hook", "add", "ftp://x/y")
        one_line_error(rc, err, "is not an http:// or https:// URL")
        rc, _, err = await netmesh(url, "hook", "add", receiver.url, "--events", "nodes.*")
        one_line_error(rc, err, "unknown event type 'nodes.*'")
        assert await admin.last_seq() == before  # the refused ones wrote nothing
        rc, out, err = await netmesh(url, "hook", "remove", added["hook_id"])
        assert rc == 0 and await hooks_of(url) == []
        js = admin.nc.jetstream()

        async def forgotten() -> bool:
            info = await js.stream_info(HOOKS_STREAM)
            consumers = await js.consumers_info(EVENTS_STREAM)
            hook_consumers = [c for c in consumers if (c.name or "").startswith("hook-")]
            return info.state.messages == 0 and not hook_consumers

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not await forgotten():  # its consumer, position and status are gone
            assert loop.time() < deadline, "the removed hook's traces stay"
            await asyncio.sleep(0.1)


async def settled(url: str, timeout: float = 20.0) -> None:
    """Until every hook has delivered (and had acknowledged) all it has to."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not all(r["state"] == "ok" and r["pending"] == 0 for r in await hooks_of(url)):
        assert loop.time() < deadline, "timed out: hooks settling"
        await asyncio.sleep(0.1)


async def test_slow_and_restarting_endpoints_and_a_restarted_control_plane(
    nats_server: EmbeddedNats, tmp_path: Path, receiver: Receiver
) -> None:
    url = nats_server.url
    async with control_plane(url, tmp_path / "cp") as (_, admin):
        added = await add_hook(url, receiver.url)  # every event
        assert len(added["secret"]) > 20
        await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
        await wait_until(lambda: len(receiver.delivered()) == 1, message="network.created")
        receiver.mode = "slow"  # slower than the control plane waits (1 s here)
        await admin.ok("network.create", name="lab", cidr="10.20.0.0/24")
        await wait_until(lambda: len(receiver.got) >= 3, message="slow attempts", timeout=20)
        receiver.mode = "ok"
        await wait_until(lambda: len(receiver.delivered()) == 2, message="lab", timeout=20)
        # The endpoint goes away and comes back on the same port.
        await receiver.stop()
        token = (await admin.ok("key.create", network="office", uses=5))["token"]
        await join(url, token, 1, "h1")
        await asyncio.sleep(1.5)  # some attempts meet a closed port
        await receiver.start()
        await wait_until(lambda: len(receiver.delivered()) == 6, message="after restart")
        await settled(url)
    before_restart = list(receiver.delivered())
    types = [e["type"] for e in before_restart]
    assert types[:2] == ["network.created", "network.created"]
    assert types[2] == "enrollment_key.created" and "node.joined" in types
    assert seqs(before_restart) == sorted(seqs(before_restart))
    received = len(receiver.got)

    # The control plane restarts: delivery goes on from where it was.
    async with control_plane(url, tmp_path / "cp") as (_, admin):
        await admin.ok("network.update", name="office", mtu=1380)
        await wait_until(lambda: len(receiver.delivered()) == 7, message="after cp restart")
        await settled(url)
    assert receiver.delivered()[-1]["type"] == "network.updated"
    assert len(receiver.got) == received + 1  # nothing before it was sent again

    # Down for longer than the stream lets a consumer live without a reader:
    # the consumer is gone; the position kept beside it still holds.
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_consumer(EVENTS_STREAM, f"hook-{added['hook_id']}")
    finally:
        await nc.close()
    async with control_plane(url, tmp_path / "cp") as (_, admin):
        await admin.ok("network.update", name="office", mtu=1300)
        await wait_until(lambda: len(receiver.delivered()) == 8, message="after lost consumer")
    assert len(receiver.got) == received + 2
    assert seqs(receiver.delivered()) == sorted(seqs(receiver.delivered()))


async def test_two_replicas_deliver_each_event_once_in_order(
    nats_server: EmbeddedNats, tmp_path: Path, receiver: Receiver
) -> None:
    url = nats_server.url
    async with control_plane(url, tmp_path / "cp") as (_, admin):
        # The second replica shares the first's signing key (as replicas must).
        (tmp_path / "cp2").mkdir()
        (tmp_path / "cp2" / "signing.key").write_bytes(
            (tmp_path / "cp" / "signing.key").read_bytes()
        )
        async with control_plane(url, tmp_path / "cp2"):
            ADMIN_KEY[url] = str(tmp_path / "cp" / "admin.key")  # the CLI's admin
            await add_hook(url, receiver.url, "--events", "network.*")
            for n in range(8):
                await admin.ok("network.create", name=f"n{n}", cidr=f"10.{n}.0.0/24")
            await wait_until(lambda: len(receiver.delivered()) == 8, message="eight networks")
    names = [e["data"]["network"] for e in receiver.delivered()]
    assert names == [f"n{n}" for n in range(8)]
    assert len(receiver.got) == 8  # each once: one delivery in flight across the replicas


def test_backoff_grows_to_a_ceiling() -> None:
    assert [backoff(a) for a in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff(50) == 60.0


async def test_the_secret_is_never_in_the_log_and_a_retry_gets_it_sealed(
    nats_server: EmbeddedNats, tmp_path: Path, receiver: Receiver
) -> None:
    from events.signing import command_headers, open_sealed
    from tests.eventlog_scenario import read_log

    async with control_plane(nats_server.url, tmp_path / "cp") as (plane, admin):
        fields = {"command_id": "hook-1", "url": receiver.url, "signed_at": time.time()}
        data = msgspec.json.encode(fields)
        assert admin.key is not None
        headers = command_headers(admin.key, "hook.add", data)
        replies = []
        for _ in range(2):  # the same signed request twice: a retry
            msg = await admin.nc.request("netmesh.cmd.hook.add", data, headers=headers, timeout=10)
            replies.append(msgspec.json.decode(msg.data, type=Reply))
        first, again = replies
        assert first.ok and not first.repeated and again.repeated, (first, again)
        secret = first.result["secret"]
        assert "secret" not in again.result
        assert open_sealed(admin.key, again.result["sealed_secret"]) == secret
        log = await read_log(plane, await admin.last_seq())
        assert secret not in b"".join(msgspec.json.encode(r.envelope) for r in log).decode()
        (added,) = [r.event for r in log if isinstance(r.event, HookAdded)]
        assert added.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
