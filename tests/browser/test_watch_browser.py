"""Live watch in real headless Chromium: the admin console's Watch page on a real sshd.

The user's terminal is driven through its websocket (as in the integration tests); the
auditor signs in to the admin console in Chromium, opens Live sessions, clicks Watch, and
sees what the user's shell prints, read-only, under the console's strict CSP (xterm.js as
ES modules, run-time CSS through constructable stylesheets), with the console's cookie
on the websocket. Keys pressed on the Watch page never reach the target. Terminating the
session shows its reason on the page. Screenshot: docs/screenshots/console-watch.png.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from playwright.async_api import Browser, expect

from ..conftest import Running
from ..integration.helpers import call
from ..integration.test_ssh_terminal import Term, sign_in_to_target, ws_client
from .conftest import SCREENSHOTS, on_screen


@pytest.fixture
async def user_terminal(running: Running, ssh_signed_in: tuple[str, str]) -> AsyncIterator[Term]:
    """The remote user's browser terminal, signed in to the target's shell."""
    _rid, cookie = ssh_signed_in
    async with ws_client(running, cookie) as s:
        ws = await s.ws_connect(f"{running.public_url}/ws/ssh/db01", headers={"Origin": running.public_url})
        term = Term(ws)
        await term.resize(90, 20)
        await sign_in_to_target(term)
        await term.expect("$ ")
        yield term


async def test_watch_page_in_chromium(running: Running, user_terminal: Term, browser: Browser) -> None:
    term = user_terminal
    context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1200, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))

    await page.goto(running.admin_url + "/admin/login")
    await page.fill("#f-token", running.auditor_token)
    await page.get_by_role("button", name="Sign in").click()
    await page.get_by_role("link", name="Live sessions").click()
    await page.get_by_role("link", name="Watch the SSH terminal on db01").click()
    await expect(page.get_by_role("heading", name="Watching Alice Example on db01")).to_be_visible()
    await page.wait_for_selector("body[data-watch=open]")
    assert await page.text_content("#watch-status") == "watching (read-only)"

    # The user is told; the watcher's terminal takes the user's size and shows their shell.
    await term.expect("*** auditor (auditor) is watching this session ***")
    await on_screen(page, "is watching this session", "domumWatch")
    size: Any = await page.evaluate("[window.domumWatch.cols, window.domumWatch.rows]")
    assert size == [90, 20]
    await term.type("echo seen-in-$((2*2))-browsers\r")
    await on_screen(page, "seen-in-4-browsers", "domumWatch")
    assert "seen-in-4-browsers" in await page.locator(".xterm-rows").inner_text()

    # Typing on the watch page goes nowhere.
    await page.click("#watch-terminal")
    await page.keyboard.type("echo FROM-$((1+1))-WATCHER")
    await page.keyboard.press("Enter")
    await term.type("echo user-$((3+3))\r")
    await term.expect("user-6\r\n")
    await on_screen(page, "user-6", "domumWatch")
    assert "FROM-2-WATCHER" not in term.seen.decode(errors="replace")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "console-watch.png"))

    # Terminated: the page says why.
    async with running.admin() as s:
        st, page_data = await call(s, "GET", "/api/v1/sessions")
        assert st == 200
        [session] = page_data["items"]
        st, _ = await call(s, "DELETE", f"/api/v1/sessions/{session['id']}")
        assert st == 204
    await page.wait_for_selector("body[data-watch=closed]")
    status = await page.text_content("#watch-status")
    assert status == "stopped: the watched session ended: terminated by an administrator", status

    violations = [m for m in console if "Content Security Policy" in m or "pageerror" in m or "error" in m]
    assert not violations, violations
    await context.close()
