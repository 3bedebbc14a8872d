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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from ..conftest import Running
from ..integration.helpers import call, create_forwarded, login_direct, seed
from ..peers.sshd import Sshd, ensure_user, sshd_available

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
USER = "domumtest"
PASSWORD = "Tr0ub4dor-and-3"

_BUFFER_TEXT = """() => {
  const b = window.domumTerminal.buffer.active;
  const out = [];
  for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));
  return out.join("\\n");
}"""


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("the system Chromium is not installed (make test installs it)")
    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def pam_sshd(tmp_path: Path) -> Iterator[Sshd]:
    if not sshd_available():
        pytest.skip("needs root and Debian openssh-server")
    ensure_user(USER, PASSWORD)
    with Sshd.running(tmp_path / "sshd", password=True) as sshd:
        yield sshd


async def wait_for_text(page: Page, needle: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = str(await page.evaluate(_BUFFER_TEXT))
        if needle in text:
            return text
        await page.wait_for_timeout(50)
    raise AssertionError(f"{needle!r} not on screen:\n{text}")


async def test_terminal_in_chromium(running: Running, pam_sshd: Sshd, chromium: Browser) -> None:
    sd = await seed(
        running,
        target={
            "name": "db01",
            "protocol": "ssh",
            "host": "127.0.0.1",
            "port": pam_sshd.port,
            "ssh_host_key": pam_sshd.host_key_line,
        },
    )
    rid, link = await create_forwarded(running, sd)
    cookie = await login_direct(running, sd, link)
    context = await chromium.new_context(ignore_https_errors=True, viewport={"width": 1100, "height": 700})
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
    banner = await wait_for_text(page, "login as:")
    assert "Alice Example <alice@example.com>" in banner and "Access ends:" in banner

    await page.click("#terminal")
    await page.keyboard.type(USER)
    await page.keyboard.press("Enter")
    await wait_for_text(page, "Password:")
    await page.keyboard.type(PASSWORD)
    await page.keyboard.press("Enter")
    await wait_for_text(page, "$ ")
    await page.keyboard.type("echo domum-ok")
    await page.keyboard.press("Enter")
    screen = await wait_for_text(page, "\ndomum-ok\n")
    assert PASSWORD not in screen
    # Rendered for people too, not only in xterm's buffer.
    assert "domum-ok" in await page.locator(".xterm-rows").inner_text()

    # 24-bit colour is applied through CSSOM (xterm writes it as a style attribute).
    await page.keyboard.type(r"printf '\033[38;2;1;2;3mTRUECOLOR\033[0m\n'")
    await page.keyboard.press("Enter")
    await wait_for_text(page, "\nTRUECOLOR\n")
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
    await wait_for_text(page, f"\n{rows} {cols}\n")
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / "terminal-ssh.png"))

    # Revoke: the page says why at once.
    async with running.admin() as s:
        started = time.monotonic()
        st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
        assert st == 200
    await page.wait_for_selector("body[data-terminal=closed]", timeout=2_000)
    assert time.monotonic() - started < 2.0
    assert await page.text_content("#terminal-status") == "closed: access revoked"
    await wait_for_text(page, "Session ended: access revoked.")

    violations = [m for m in console if "Content Security Policy" in m or "pageerror" in m]
    assert not violations, violations
    await context.close()
