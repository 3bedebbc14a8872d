"""The remote-user login in a real browser (system Chromium through Playwright).

Proves what only a browser can: the pages work under their own strict CSP (the same-origin
script runs: local times and the countdown appear, and the console reports no CSP
violation), the ``__Host-`` cookie is accepted with its attributes, the forms post with
their CSRF fields, and the pages fit a phone. Screenshots go to docs/screenshots/login-*.png.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page

from ..conftest import Running
from ..integration.helpers import call, create_forwarded, seed

pytestmark = pytest.mark.asyncio

SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
# The ``browser`` fixture (system Chromium through Playwright) is in tests/browser/conftest.py.


def _code(link: str) -> str:
    return link.rsplit("/", 1)[1]


def _watch_console(page: Page, sink: list[str]) -> None:
    page.on("console", lambda msg: sink.append(f"{msg.type}: {msg.text}"))
    page.on("pageerror", lambda exc: sink.append(f"pageerror: {exc}"))


async def _targets(run: Running, group_id: str) -> None:
    async with run.admin() as s:
        ids = []
        for body in (
            {"name": "db01", "protocol": "ssh", "host": "db01.internal", "port": 22},
            {"name": "desktop", "protocol": "rdp", "host": "desk01.internal", "port": 3389},
        ):
            st, t = await call(s, "POST", "/api/v1/targets", body)
            assert st == 201, t
            ids.append(t["id"])
        st, g = await call(s, "GET", f"/api/v1/groups/{group_id}")
        policy = g["policy"]
        policy["targets"] = [*policy["targets"], *ids]
        st, g = await call(s, "PATCH", f"/api/v1/groups/{group_id}", {"policy": policy})
        assert st == 200, g


async def test_remote_user_signs_in_with_a_browser(running: Running, browser: Browser) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    sd = await seed(running)
    await _targets(running, sd.group_id)
    running.gateway.public_ctx.ssh_port = 2222
    async with running.admin() as s:
        st, reason = await call(s, "POST", "/api/v1/reasons", {"label": "Planned maintenance"})
        assert st == 201, reason
    _rid, link = await create_forwarded(
        running, sd, justification="Quarterly patching of the wiki and db01", reason_id=reason["id"]
    )
    base = running.public_url
    console: list[str] = []

    context: BrowserContext = await browser.new_context(
        ignore_https_errors=True,
        viewport={"width": 1280, "height": 860},
        locale="en-GB",
        timezone_id="Europe/Berlin",
    )
    page = await context.new_page()
    _watch_console(page, console)
    referers: list[str] = []
    page.on("request", lambda req: referers.append(req.headers.get("referer", "")))

    await page.goto(base + link)
    await page.wait_for_selector(".local-time")  # the same-origin script ran under the CSP
    assert "your time:" in await page.inner_text(".facts")
    assert "a***@example.com" in await page.inner_text(".facts")
    await page.screenshot(path=str(SHOTS / "login-link.png"), full_page=True)
    assert len(referers) > 1 and referers == [""] * len(referers)  # no Referer carries the link

    n = len(running.mailbox.messages)
    await page.click("text=Send token")
    await page.wait_for_url("**/token")
    await running.mailbox.wait_count(n + 1)
    token = running.mailbox.last_token(sd.email)
    await page.screenshot(path=str(SHOTS / "login-token.png"), full_page=True)

    # A wrong token first: the refusal page, with the way back to the form.
    await page.fill("#token", f"{(int(token) + 1) % 10**8:08d}")
    await page.click("button:has-text('Sign in')")
    await page.wait_for_selector("h1:has-text('Sign-in refused')")
    await page.screenshot(path=str(SHOTS / "login-error.png"), full_page=True)
    await page.click("text=Enter the token again")
    await page.wait_for_url("**/token")

    await page.fill("#token", f"{token[:4]} {token[4:]}")
    await page.click("button:has-text('Sign in')")
    await page.wait_for_url("**/portal")
    text = await page.inner_text("main")
    assert "Your access" in text and "time left" in text.lower()
    assert "ssh -J alice@example.com@localhost:2222 user@db01.internal" in text
    assert "--target desktop --listen 127.0.0.1:13389" in text
    assert await page.is_visible("button.copy")  # copy buttons appear only with the script
    cookies = {c["name"]: c for c in await context.cookies()}
    session = cookies["__Host-domum"]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
    assert session["path"] == "/"
    await page.screenshot(path=str(SHOTS / "login-portal.png"), full_page=True)

    phone = await browser.new_context(
        ignore_https_errors=True,
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    await phone.add_cookies([{**session, "sameSite": "Strict"}])  # type: ignore[list-item]
    mobile = await phone.new_page()
    _watch_console(mobile, console)
    await mobile.goto(base + link)
    await mobile.wait_for_selector(".local-time")
    assert await mobile.evaluate("document.documentElement.scrollWidth") <= 390
    await mobile.screenshot(path=str(SHOTS / "login-link-phone.png"), full_page=True)
    await mobile.goto(base + "/portal")
    await mobile.wait_for_selector(".targets")
    width = await mobile.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the portal scrolls sideways on a phone ({width}px)"
    await mobile.screenshot(path=str(SHOTS / "login-portal-phone.png"), full_page=True)
    await phone.close()

    await page.click("button:has-text('Sign out')")
    await page.wait_for_url("**/signed-out")
    await page.screenshot(path=str(SHOTS / "login-signed-out.png"), full_page=True)
    await page.goto(base + "/portal")
    assert "Not signed in" in await page.inner_text("h1")
    await context.close()

    assert all(_code(link) not in r for r in referers)
    problems = [m for m in console if "Content Security Policy" in m or m.startswith(("error", "pageerror"))]
    # The only expected console errors are the 401/403 page loads themselves.
    problems = [m for m in problems if "status of 40" not in m]
    assert problems == []
