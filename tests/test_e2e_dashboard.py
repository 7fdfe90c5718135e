"""The dashboard on a real deployment: `netmesh server --http` in host cp,
real agents (wireguard-go) in hosts a, b and c under a policy that lets only
a reach b, and headless Chromium in cp (the page is served on cp's loopback).
The page shows the nodes in sync with a recent handshake and one live line,
a-b (c peers with no one), then b offline once its agent stops, without a
reload."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.dashboard_probe import CHROMIUM
from tests.meshnet import Mesh
from tests.netns import (
    TestNet,
    ping,
    testnet_fixture,  # noqa: F401  (the `testnet` fixture)
    wait_until,
)
from tests.test_dashboard import ARTIFACTS

HTTP = "127.0.0.1:8080"  # on cp's own loopback


@pytest.mark.netns
async def test_the_dashboard_shows_real_agents_in_sync_then_offline(
    testnet: TestNet, tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian package chromium)")
    mesh = Mesh(testnet, tmp_path)
    mesh.cp = await testnet.add_host("cp")
    for name in ("a", "b", "c"):
        mesh.hosts[name] = await testnet.add_host(name)
    await mesh.start_server("--http", HTTP)
    await mesh.cli("network", "create", "office", "--cidr", "10.66.0.0/24")
    (tmp_path / "policy.json5").write_text('{rules: [{from: ["a"], to: ["b"]}]}')
    await mesh.cli("policy", "set", "office", str(tmp_path / "policy.json5"))
    key = (await mesh.cli("key", "create", "--network", "office", "--unlimited"))[1].strip()
    for name in ("a", "b", "c"):
        # Frequent passes: each reports the peers' handshakes.
        await mesh.start_agent(name, key, ["--resync-interval", "2"])
    await wait_until(mesh.all_in_sync, timeout=60, interval=0.3, message="agents in sync")
    nodes = {n["name"]: n for n in await mesh.cli_json("node", "list")}
    assert await wait_until(
        functools.partial(ping, mesh.hosts["a"], nodes["b"]["address"]),
        timeout=20,
        message="a reaches b over the overlay",
    )
    token = (await mesh.cli("admin", "token", "create", "dash"))[1].strip()

    browser = await mesh.cp.driver()
    try:
        await browser.new("page", "dashboard_probe:DashboardProbe", f"http://{HTTP}", token)
        await browser.call("page", "open")
        every = {"a": "in-sync", "b": "in-sync", "c": "in-sync"}
        await browser.call("page", "wait_states", expected=every, timeout=30)

        async def handshakes_shown() -> bool:
            rows = await browser.call("page", "rows")
            return bool(rows["a"][1] != "never" and rows["b"][1] != "never")

        await wait_until(handshakes_shown, timeout=30, interval=0.5, message="handshakes shown")
        rows = await browser.call("page", "rows")
        assert rows["c"][1] == "never"  # c has no peer
        assert await browser.call("page", "lines") == {"up": 1, "all": 1}

        await mesh.stop_agent("b")
        rows = await browser.call(
            "page", "wait_states", expected={"a": "in-sync", "b": "offline"}, timeout=30
        )
        assert rows["b"][0] == "offline" and rows["c"][0] == "in-sync"
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard-mesh.png"
        await browser.call("page", "screenshot", path=str(shot))
        print(f"dashboard screenshot: {shot}")
        await browser.call("page", "close")
    finally:
        await browser.close()
    await mesh.stop_agent("a")
    await mesh.stop_agent("c")
    await mesh.stop_server()
