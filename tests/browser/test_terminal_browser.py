"""The browser SSH terminal in real headless Chromium (Playwright on /usr/bin/chromium).

Proves what only a browser can: xterm.js loads as ES modules under the gateway's strict
CSP (no inline script or style, and no CSP violation in the console: its run-time CSS
goes through constructable stylesheets), the websocket opens with the ``__Host-`` cookie
and the page's own Origin, typing reaches a real sshd through the gateway, a window
resize reaches the target's pty, and a revoke shows its reason at once.
Screenshot: docs/screenshots/terminal-ssh.png.
"""

from __future__ import annotations

import time

from playwright.async_api import Browser

from ..conftest import Running
from ..integration.helpers import call
from ..integration.test_ssh_terminal import PASSWORD, USER
from .conftest import SCREENSHOTS, on_screen


async def test_terminal_in_chromium(
    running: Running, ssh_signed_in: tuple[str, str], browser: Browser
) -> None:
    rid, cookie = ssh_signed_in
    context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1100, "height": 700})
    await context.add_cookies(
        [
            {
                "name": "__Host-domum",
                "value": cookie,
                "url": running.public_url + "/",
                "secure": True,
                "httpOnly": True,
                "sameSite": "Strict",
            }
        ]
    )
    page = await context.new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))

    await page.goto(f"{running.public_url}/ssh/db01")
    await page.wait_for_selector("body[data-terminal=open]", timeout=10_000)
    banner = await on_screen(page, "login as:")
    assert "Alice Example <alice@example.com>" in banner and "Access ends:" in banner

    await page.click("#terminal")
    await page.keyboard.type(USER)
    await page.keyboard.press("Enter")
    await on_screen(page, "Password:")
    await page.keyboard.type(PASSWORD)
    await page.keyboard.press("Enter")
    await on_screen(page, "$ ")
    await page.keyboard.type("echo domum-ok")
    await page.keyboard.press("Enter")
    screen = await on_screen(page, "\ndomum-ok\n")
    assert PASSWORD not in screen
    # Rendered for people too, not only in xterm's buffer.
    assert "domum-ok" in await page.locator(".xterm-rows").inner_text()

    # 24-bit colour is applied through CSSOM (xterm writes it as a style attribute).
    await page.keyboard.type(r"printf '\033[38;2;1;2;3mTRUECOLOR\033[0m\n'")
    await page.keyboard.press("Enter")
    await on_screen(page, "\nTRUECOLOR\n")
    # The buffer fills before the next animation frame paints it.
    await page.wait_for_function(
        """() => [...document.querySelectorAll('.xterm-rows span')]
              .some(s => s.textContent === 'TRUECOLOR' && getComputedStyle(s).color === 'rgb(1, 2, 3)')""",
        timeout=5_000,
    )

    # Resize the window: fit addon -> resize message -> the target's pty.
    await page.set_viewport_size({"width": 760, "height": 460})
    await page.wait_for_timeout(300)
    cols, rows = await page.evaluate("[window.domumTerminal.cols, window.domumTerminal.rows]")
    assert cols < 100
    await page.keyboard.type("stty size")
    await page.keyboard.press("Enter")
    await on_screen(page, f"\n{rows} {cols}\n")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "terminal-ssh.png"))

    # Revoke: the page says why at once.
    async with running.admin() as s:
        started = time.monotonic()
        st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
        assert st == 200
    await page.wait_for_selector("body[data-terminal=closed]", timeout=2_000)
    assert time.monotonic() - started < 2.0
    assert await page.text_content("#terminal-status") == "closed: access revoked"
    await on_screen(page, "Session ended: access revoked.")

    violations = [m for m in console if "Content Security Policy" in m or "pageerror" in m]
    assert not violations, violations
    await context.close()
