"""The dashboard in headless Chromium, run inside a test host by the netns
driver (`Host.driver()`, which imports this as `dashboard_probe`: nothing from
`tests.` here), so that the browser reaches a control plane that lives in that
host's network namespace."""

from __future__ import annotations

from typing import Any

from playwright.async_api import Browser, Page, Playwright, async_playwright

CHROMIUM = "/usr/bin/chromium"

# name -> (state class, last-handshake text) of every row of the node table.
ROWS = """() => Object.fromEntries([...document.querySelectorAll('#nodes tbody tr')]
    .map(r => [r.cells[1].textContent, [r.dataset.state, r.cells[7].textContent]]))"""


class DashboardProbe:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._page: Page | None = None

    async def open(self) -> None:
        self._playwright = await async_playwright().start()
        self._browser = await self._playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        self._page = page = await self._browser.new_page()
        await page.goto(self.url)
        await page.fill("#token", self.token)
        await page.click("#login button[type=submit]")
        await page.wait_for_selector("#nodes tbody tr", timeout=15_000)

    async def wait_states(self, expected: dict[str, str], timeout: float) -> dict[str, Any]:
        """Until each named node shows the expected state class (no reload):
        then every row, name -> [state, last handshake]."""
        assert self._page is not None
        await self._page.wait_for_function(
            """(want) => Object.entries(want).every(([name, state]) =>
                [...document.querySelectorAll('#nodes tbody tr')].some(
                    r => r.cells[1].textContent === name && r.dataset.state === state))""",
            arg=expected,
            timeout=timeout * 1000,
        )
        return await self.rows()

    async def rows(self) -> dict[str, Any]:
        assert self._page is not None
        rows: dict[str, Any] = await self._page.evaluate(ROWS)
        return rows

    async def lines(self) -> dict[str, int]:
        """The topology's lines: all, and those drawn as live (a recent handshake)."""
        assert self._page is not None
        return {
            "all": await self._page.locator("#topology line").count(),
            "up": await self._page.locator("#topology line.up").count(),
        }

    async def screenshot(self, path: str) -> None:
        assert self._page is not None
        await self._page.screenshot(path=path, full_page=True)

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.close()
        if self._playwright is not None:
            await self._playwright.stop()
