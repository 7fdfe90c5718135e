"""The dashboard in a real browser: Debian's headless Chromium, driven by
playwright (never `playwright install`: it would download a browser), against
a real control plane on a real nats-server. The page's node list is the
CLI's; a node joining appears and a removed node disappears without a
reload; a wrong or revoked token shows the 401 message. A screenshot is kept
under `.artifacts/` of the checkout."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from controlplane.embedded import EmbeddedNats
from tests.readapi import Served, served
from tests.test_cli_policy import join

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / ".artifacts"
WAIT_MS = 15_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian package chromium)")
    # Chromium is there: failing to start it is a failure, not a skip.
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def api(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Served]:
    async with served(nats_server, tmp_path / "cp") as running:
        yield running


async def cli_nodes(api: Served) -> list[tuple[str, str, str, str]]:
    rows = json.loads(await api.cli("node", "list", "--json"))
    return sorted((r["id"], r["network"], r["name"], r["address"]) for r in rows)


async def page_nodes(page: Page) -> list[tuple[str, str, str, str]]:
    rows = await page.eval_on_selector_all(
        "#nodes tbody tr",
        """rows => rows.map(r => [r.dataset.nodeId, r.cells[0].textContent,
                                  r.cells[1].textContent, r.cells[2].textContent])""",
    )
    return sorted(tuple(r) for r in rows)


async def sign_in(page: Page, token: str) -> None:
    await page.fill("#token", token)
    await page.click("#login button[type=submit]")


async def test_the_dashboard_follows_the_network_live(api: Served, browser: Browser) -> None:
    await api.cli("network", "create", "office", "--cidr", "10.10.0.0/24")
    for n, name in enumerate(["web1", "db1"], 1):
        key = (await api.cli("key", "create", "--network", "office")).strip()
        await join(api.nats_url, key, n, name)
    token = await api.token("dashboard", "--role", "auditor")

    page = await browser.new_page()
    elsewhere: list[str] = []  # the page fetches nothing from anywhere else
    page.on("request", lambda r: None if r.url.startswith(api.url) else elsewhere.append(r.url))
    await page.goto(api.url)
    error = page.locator("#auth-error")
    await error.wait_for(state="visible", timeout=WAIT_MS)
    assert "no token given" in await error.inner_text()

    await sign_in(page, "nma1.wrong")
    await page.wait_for_function(
        "() => document.querySelector('#auth-error').textContent.includes('not recognised')",
        timeout=WAIT_MS,
    )
    assert "401" in await error.inner_text()
    assert await page.locator("#dashboard").is_hidden()

    await sign_in(page, token)
    await page.wait_for_function(
        "() => document.querySelectorAll('#nodes tbody tr').length === 2", timeout=WAIT_MS
    )
    assert await error.is_hidden()
    assert await page_nodes(page) == await cli_nodes(api)
    assert await page.evaluate("() => sessionStorage.getItem('netmesh.token')") == token
    assert await page.locator("#topology circle.node").count() == 2
    assert await page.locator("#topology line").count() == 0  # no agent reported a peer
    assert await page.locator("#whoami").inner_text() == "token dashboard (auditor)"
    states = await page.eval_on_selector_all(
        "#nodes tbody tr", "rs => rs.map(r => r.dataset.state)"
    )
    assert states == ["never", "never"]  # no agent runs: they never reported

    # A node joins: it appears without a reload.
    key = (await api.cli("key", "create", "--network", "office")).strip()
    await join(api.nats_url, key, 3, "app1")
    (app1,) = [n for n in await cli_nodes(api) if n[2] == "app1"]
    await page.wait_for_selector(f'#nodes tr[data-node-id="{app1[0]}"]', timeout=WAIT_MS)
    await page.wait_for_selector(f'#topology circle[data-node-id="{app1[0]}"]', timeout=WAIT_MS)
    assert await page_nodes(page) == await cli_nodes(api)

    # A node is removed: it disappears, and the event log says so.
    (db1,) = [n for n in await cli_nodes(api) if n[2] == "db1"]
    await api.cli("node", "remove", "office/db1")
    await page.wait_for_selector(
        f'#nodes tr[data-node-id="{db1[0]}"]', state="detached", timeout=WAIT_MS
    )
    assert await page_nodes(page) == await cli_nodes(api)
    await page.wait_for_selector("#events li:has-text('node.removed')", timeout=WAIT_MS)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    await page.screenshot(path=str(shot), full_page=True)
    print(f"dashboard screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    # Revoked while the page is open: the next refresh says so.
    await api.cli("admin", "token", "revoke", "dashboard")
    await page.wait_for_function(
        "() => document.querySelector('#auth-error').textContent.includes('has been revoked')",
        timeout=WAIT_MS,
    )
    assert await page.locator("#dashboard").is_hidden()
    assert elsewhere == []
