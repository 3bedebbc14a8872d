"""The seed's workflow in a real Chromium against a real gateway, without touching curl.

Sign in, register a target, a group with its policy, a user and a reason through the
pages, request access with the wizard (once with a duration, once with a custom window),
save, forward the URL access (confirm "Yes"), find the link in the real SMTP mailbox,
then revoke. Every wizard step is saved as a screenshot under docs/screenshots/.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from playwright.async_api import Browser, Page, expect

from domum_gateway.model import RequestStatus

from ..conftest import Running
from .conftest import SCREENSHOTS

pytestmark = pytest.mark.asyncio

IST = timezone(timedelta(hours=5, minutes=30))  # the browser's zone below: Asia/Kolkata, no DST


async def _shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _watch(page: Page) -> list[str]:
    """Collect script errors and CSP violations (Chromium reports both on the console)."""
    problems: list[str] = []

    def console(text: str, kind: str) -> None:
        # A refused form is answered 422 on purpose; Chromium logs every 4xx page load.
        if kind == "error" and not text.startswith("Failed to load resource: the server responded"):
            problems.append(text)

    page.on("console", lambda m: console(m.text, m.type))
    page.on("pageerror", lambda e: problems.append(str(e)))
    return problems


async def _general_step(page: Page, group: str, user: str, justification: str) -> None:
    await page.get_by_role("link", name="Request access", exact=True).click()
    await expect(page.locator("form#wizard[data-step='general']")).to_be_visible()
    # The user select stays disabled until a group is chosen, then lists its users only.
    await expect(page.locator("#f-user-id")).to_be_disabled()
    await page.select_option("#f-group-id", label=group)
    await page.select_option("#f-user-id", label=user)
    await page.fill("#f-justification", justification)
    await page.select_option("#f-reason-id", label="Maintenance")
    await page.fill("#f-governance-code", "CHG-1234")


async def test_seed_workflow_in_chromium(running: Running, browser: Browser) -> None:
    context = await browser.new_context(
        ignore_https_errors=True,
        viewport={"width": 1280, "height": 900},
        timezone_id="Asia/Kolkata",
        locale="en-GB",
    )
    page = await context.new_page()
    page.set_default_timeout(10_000)
    problems = _watch(page)
    admin = running.admin_url

    # Sign in with the API token.
    await page.goto(admin + "/admin")
    await expect(page).to_have_url(re.compile(r"/admin/login\?next="))
    await page.fill("#f-token", running.admin_token)
    await _shot(page, "01-sign-in")
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Access requests")).to_be_visible()

    # Catalogue through the pages: target, group with policy, user, reason.
    await page.get_by_role("link", name="Targets").click()
    await page.get_by_role("link", name="New target").click()
    await page.fill("#f-name", "wiki")
    await page.select_option("#f-protocol", "http")
    await expect(page.locator("#f-host")).to_be_hidden()  # only the fields for http
    await page.fill("#f-url", "http://127.0.0.1:9/")
    await page.get_by_role("button", name="Create target").click()
    await expect(page.locator(".notice-ok")).to_contain_text("Target wiki created.")

    await page.get_by_role("link", name="Groups").click()
    await page.get_by_role("link", name="New group").click()
    await page.fill("#f-name", "Operations")
    await page.get_by_label("wiki").check()
    await page.fill("#f-allow-cidrs", "127.0.0.0/8\n10.0.0.0/8")
    await page.fill("#f-max-duration-value", "14")
    await page.select_option("#f-max-duration-unit", "days")
    await page.fill("#f-max-sessions", "2")
    await page.get_by_label("SMS").uncheck()
    await _shot(page, "08-group-policy")
    await page.get_by_role("button", name="Create group").click()
    await expect(page.locator(".notice-ok")).to_contain_text("Group Operations created.")
    await expect(page.locator("tbody")).to_contain_text("allow 127.0.0.0/8, 10.0.0.0/8")

    await page.get_by_role("link", name="Users").click()
    await page.get_by_role("link", name="New user").click()
    await page.select_option("#f-group-id", label="Operations")
    await page.fill("#f-name", "Alice Example")
    await page.fill("#f-email", "alice@example.com")
    await page.get_by_role("button", name="Create user").click()
    await expect(page.locator(".notice-ok")).to_contain_text("User Alice Example created.")

    await page.get_by_role("link", name="Reasons").click()
    await page.get_by_role("link", name="New reason").click()
    await page.fill("#f-label", "Maintenance")
    await page.get_by_role("button", name="Create reason").click()
    await expect(page.locator(".notice-ok")).to_contain_text("Reason Maintenance created.")

    # Wizard, duration: General -> Access limitation -> Review -> Save.
    await _general_step(page, "Operations", "Alice Example (alice@example.com)", "Patch the wiki")
    await _shot(page, "02-wizard-general")
    await page.get_by_role("button", name="Continue").click()
    await expect(page.locator("form#wizard[data-step='limit']")).to_be_visible()
    # The browser's own offset is offered (Asia/Kolkata), instead of guessing UTC.
    await expect(page.locator("#f-tz")).to_have_value("+05:30")
    day = (datetime.now(IST) + timedelta(days=1)).strftime("%Y-%m-%d")
    await page.fill("#f-start-date", day)
    await page.fill("#f-start-time", "09:00")
    await page.fill("#f-duration-value", "2")
    await page.select_option("#f-duration-unit", "hours")
    await expect(page.locator("#custom-fields")).to_be_hidden()
    await _shot(page, "03-wizard-access-limitation")
    await page.get_by_role("button", name="Continue").click()
    await expect(page.locator("form#wizard[data-step='review']")).to_be_visible()
    await expect(page.locator("#review-end")).to_contain_text(f"{day} 11:00 UTC+05:30")
    await expect(page.locator("#review-end")).to_contain_text(f"{day} 05:30 UTC")
    await _shot(page, "04-wizard-review")
    await page.get_by_role("button", name="Save").click()
    await expect(page.locator(".notice-ok")).to_contain_text("Access request for Alice Example saved.")
    first = page.url.rsplit("/", 1)[1]
    assert first.startswith("req_")

    # Requests list -> row action -> Forward URL Access -> "Yes".
    await page.get_by_role("link", name="Requests", exact=True).click()
    row = page.locator("tbody tr").filter(has_text=first)
    await row.locator("summary").click()
    await row.get_by_role("link", name="Forward URL Access").click()
    await expect(page.get_by_role("heading", name="Forward URL Access")).to_be_visible()
    await expect(page.locator("#confirm-question")).to_contain_text("a***@example.com")
    await _shot(page, "05-forward-confirm")
    await page.get_by_role("button", name="Yes").click()
    await expect(page.locator(".notice-ok")).to_contain_text(
        "Personal link sent by e-mail to a***@example.com."
    )
    await expect(row.locator(".badge")).to_have_text("forwarded")
    await _shot(page, "06-requests-forwarded")
    await running.mailbox.wait_count(1)
    link = running.mailbox.last_link("alice@example.com")
    assert re.search(r"/a/[A-Za-z0-9_-]{16,}$", link), link

    # Wizard, custom window on the quarter-hour grid.
    await _general_step(page, "Operations", "Alice Example (alice@example.com)", "Rotate the certificates")
    await page.get_by_role("button", name="Continue").click()
    await expect(page.locator("form#wizard[data-step='limit']")).to_be_visible()
    await page.get_by_label("Custom").check()
    await expect(page.locator("#duration-fields")).to_be_hidden()
    await expect(page.locator("#f-end-time")).to_have_attribute("step", "900")
    await page.fill("#f-start-date", day)
    await page.fill("#f-start-time", "10:00")
    await page.fill("#f-end-date", day)
    await page.fill("#f-end-time", "12:30")
    await _shot(page, "07-wizard-custom")
    await page.get_by_role("button", name="Continue").click()
    await expect(page.locator("#review-end")).to_contain_text(f"{day} 12:30 UTC+05:30")
    await page.get_by_role("button", name="Save").click()
    await expect(page.locator(".notice-ok")).to_contain_text("saved")
    second = page.url.rsplit("/", 1)[1]

    # Revoke the forwarded one, again through its confirmation.
    await page.get_by_role("link", name="Requests", exact=True).click()
    row = page.locator("tbody tr").filter(has_text=first)
    await row.locator("summary").click()
    await row.get_by_role("link", name="Revoke").click()
    await page.get_by_role("button", name="Yes, revoke").click()
    await expect(page.locator(".notice-ok")).to_contain_text("Access revoked")
    await expect(row.locator(".badge")).to_have_text("revoked")

    store = running.gateway.store
    one, two = await store.get_request(first), await store.get_request(second)
    assert one is not None and one.status is RequestStatus.REVOKED
    assert two is not None and two.status is RequestStatus.SAVED
    assert one.end - one.start == timedelta(hours=2)
    assert two.start == datetime.fromisoformat(f"{day}T10:00:00+05:30").astimezone(UTC)
    assert two.end - two.start == timedelta(hours=2, minutes=30)

    # The request's page tells its story; the audit chain verifies.
    await page.get_by_role("link", name="Alice Example").first.click()
    await expect(page.locator("h1")).to_contain_text("Access for Alice Example")
    await page.goto(admin + f"/admin/requests/{first}")
    await expect(page.locator("#h-events + .table-wrap")).to_contain_text("request.revoked")
    await _shot(page, "10-request-detail")
    await page.get_by_role("link", name="Audit log").click()
    await page.get_by_role("button", name="Verify chain").click()
    await expect(page.locator("#verify-result")).to_contain_text("Audit chain intact")
    await _shot(page, "11-audit-verify")

    # Phone width: the same list is usable (rows stack, nothing overflows the viewport).
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.goto(admin + "/admin/requests")
    await expect(page.get_by_role("heading", name="Access requests")).to_be_visible()
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, overflow
    await _shot(page, "09-requests-phone")

    assert problems == [], problems
    await context.close()


async def test_keyboard_only_sign_in_and_field_errors(running: Running, browser: Browser) -> None:
    context = await browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    problems = _watch(page)
    await page.goto(running.admin_url + "/admin/login")
    # The token field has focus on arrival; typing and Enter sign in.
    await expect(page.locator("#f-token")).to_be_focused()
    await page.keyboard.type(running.admin_token)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", name="Access requests")).to_be_visible()
    # First Tab reaches the skip link, which moves focus to the content.
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    outline = await page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid", "focus must be visible"
    # A refused form focuses its error summary and keeps what was typed.
    await page.goto(running.admin_url + "/admin/targets/new")
    await page.fill("#f-name", "Not A Slug")
    await page.select_option("#f-protocol", "tcp")
    await page.fill("#f-host", "db.internal")
    await page.get_by_role("button", name="Create target").click()
    await expect(page.locator("#error-summary")).to_be_focused()
    await expect(page.locator("#f-name-error")).to_contain_text("lowercase letters")
    await expect(page.locator("#f-port-error")).to_contain_text("required for tcp targets")
    await expect(page.locator("#f-name")).to_have_value("Not A Slug")
    await expect(page.locator("#f-host")).to_have_value("db.internal")
    await _shot(page, "12-field-errors")
    # The summary links move focus to the field.
    await page.locator("#error-summary a").first.click()
    await expect(page.locator("#f-name")).to_be_focused()
    assert problems == [], problems
    await context.close()
