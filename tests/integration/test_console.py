"""The admin console at /admin on a real TLS admin listener, driven over HTTP like a browser.

Covers sign-in and the session cookie, CSRF, the auditor's read-only view (every write
refused server-side), field errors that keep what was typed, the request wizard end to
end, row actions, hostile input and the security headers of every page.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from html import unescape
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from multidict import CIMultiDictProxy
from yarl import URL

from domum_gateway.audit import AuditEntry
from domum_gateway.auth.secrets import hash_secret
from domum_gateway.clock import FakeClock
from domum_gateway.control.console import CONSOLE
from domum_gateway.control.console_session import ConsoleSessions
from domum_gateway.control.evidence import verify_bundle
from domum_gateway.model import RequestStatus, Role
from domum_gateway.store.base import AuditFilter
from domum_gateway.store.sqlite import SqliteStore

from ..conftest import Running
from .helpers import Seed, call, create_forwarded, login_direct, request_body, seed

pytestmark = pytest.mark.asyncio

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Page:
    def __init__(self, status: int, text: str, headers: CIMultiDictProxy[str]) -> None:
        self.status = status
        self.text = text
        self.headers = headers

    @property
    def location(self) -> str:
        return self.headers.get("Location", "")


class Console:
    """A cookie-keeping client for the console (what a browser would do, minus script)."""

    def __init__(self, run: Running) -> None:
        self.run = run
        self.jar = aiohttp.CookieJar(unsafe=True)  # the listener is an IP address
        self.s = aiohttp.ClientSession(
            base_url=run.admin_url, cookie_jar=self.jar, connector=aiohttp.TCPConnector(ssl=run.ssl)
        )
        self.csrf = ""

    async def close(self) -> None:
        await self.s.close()

    async def get(self, path: str, **kw: Any) -> Page:
        async with self.s.get(path, allow_redirects=False, **kw) as r:
            page = Page(r.status, await r.text(), r.headers)
        m = _CSRF.search(page.text)
        if m and "/admin/login" not in path:
            self.csrf = m.group(1)
        return page

    async def post(self, path: str, data: Any, *, csrf: bool = True, **kw: Any) -> Page:
        if csrf and isinstance(data, dict):
            data = {"csrf": self.csrf, **data}
        elif csrf and isinstance(data, list):
            data = [("csrf", self.csrf), *data]
        async with self.s.post(path, data=data, allow_redirects=False, **kw) as r:
            return Page(r.status, await r.text(), r.headers)

    async def login(self, token: str, next_: str = "/admin/requests") -> Page:
        page = await self.get("/admin/login")
        m = _CSRF.search(page.text)
        assert m, page.text
        res = await self.post("/admin/login", {"csrf": m.group(1), "token": token, "next": next_}, csrf=False)
        if res.status == 303:
            await self.get("/admin/requests")  # picks up the session's CSRF token
        return res


@pytest.fixture
async def admin(running: Running) -> AsyncIterator[Console]:
    c = Console(running)
    res = await c.login(running.admin_token)
    assert res.status == 303, res.text
    yield c
    await c.close()


@pytest.fixture
async def auditor(running: Running) -> AsyncIterator[Console]:
    c = Console(running)
    res = await c.login(running.auditor_token)
    assert res.status == 303, res.text
    yield c
    await c.close()


def _assert_secure_page(page: Page) -> None:
    assert page.headers["Content-Security-Policy"] == CSP
    assert page.headers["Cache-Control"] == "no-store"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["X-Content-Type-Options"] == "nosniff"


def _no_inline_code(html: str) -> None:
    """CSP forbids inline script and style; make sure no template relies on them."""
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), "inline <script>"
    assert not re.search(r"<style", html), "inline <style>"
    assert not re.search(r"<[^>]*\sstyle=", html), "style attribute"
    assert not re.search(r"<[^>]*\son[a-z]+\s*=", html), "inline event handler"
    assert "javascript:" not in html


def _field_value(html: str, name: str) -> str | None:
    m = re.search(r'<input[^>]*name="' + re.escape(name) + r'"[^>]*value="([^"]*)"', html)
    return unescape(m.group(1)) if m else None


def _selected(html: str, name: str) -> str | None:
    m = re.search(r'<select[^>]*name="' + re.escape(name) + r'"[^>]*>(.*?)</select>', html, re.S)
    if not m:
        return None
    sel = re.search(r'<option value="([^"]*)" selected>', m.group(1))
    return unescape(sel.group(1)) if sel else None


async def _audit_actions(run: Running) -> list[str]:
    return [e.action for e in await run.gateway.store.all_audit()]


# sign-in ---------------------------------------------------------------------
async def test_sign_in_exchanges_the_token_for_a_host_cookie(running: Running) -> None:
    c = Console(running)
    try:
        page = await c.get("/admin/requests?status=saved")
        assert page.status == 303
        assert page.location == "/admin/login?next=/admin/requests%3Fstatus%3Dsaved"
        login = await c.get("/admin/login")
        assert login.status == 200
        _assert_secure_page(login)
        _no_inline_code(login.text)
        assert 'type="password"' in login.text
        csrf = _CSRF.search(login.text)
        assert csrf
        async with c.s.post(
            "/admin/login",
            data={"csrf": csrf.group(1), "token": running.admin_token, "next": "/admin/groups"},
            allow_redirects=False,
        ) as r:
            assert r.status == 303 and r.headers["Location"] == "/admin/groups"
            cookies = r.headers.getall("Set-Cookie")
        session = next(h for h in cookies if h.startswith("__Host-domum-admin="))
        attrs = {a.strip().split("=")[0].lower() for a in session.split(";")[1:]}
        assert {"secure", "httponly", "path", "samesite"} <= attrs
        assert "samesite=strict" in session.lower() and "path=/" in session.lower()
        assert "domain" not in attrs
        value = session.split(";")[0].split("=", 1)[1]
        assert running.admin_token not in value and len(value) >= 40
        groups = await c.get("/admin/groups")
        assert groups.status == 200
        _assert_secure_page(groups)
        assert running.admin_token not in groups.text
        assert "admin" in groups.text and "Sign out" in groups.text
        events = await running.gateway.store.list_audit(AuditFilter(type="console.signed_in"))
        assert [(e.actor, e.origin) for e in events.items] == [("console:admin", "127.0.0.1")]
    finally:
        await c.close()


async def test_wrong_token_is_refused_and_never_echoed(running: Running) -> None:
    c = Console(running)
    try:
        bad = "dgw_wrong<script>alert(1)</script>"
        res = await c.login(bad)
        assert res.status == 401
        assert "not valid" in res.text
        assert bad not in res.text and "alert(1)" not in res.text
        assert "__Host-domum-admin=" not in " ".join(res.headers.getall("Set-Cookie", []))
        assert (await c.get("/admin/requests")).status == 303
        # An over-long token is refused the same way, without a lookup.
        assert (await c.login("x" * 5000)).status == 401
    finally:
        await c.close()


async def test_sign_in_form_needs_its_own_csrf_cookie(running: Running) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=running.ssl)) as s:
        async with s.post(
            running.admin_url + "/admin/login",
            data={"csrf": "forged", "token": running.admin_token},
            allow_redirects=False,
        ) as r:
            assert r.status == 403
            assert r.headers["Content-Type"].startswith("text/html")
            assert "__Host-domum-admin=" not in " ".join(r.headers.getall("Set-Cookie", []))


async def test_next_after_sign_in_stays_inside_the_console(running: Running) -> None:
    for target in ("https://evil.example/", "//evil.example/admin", "/admin/../api/v1/groups", "/admin\\x"):
        c = Console(running)
        try:
            res = await c.login(running.admin_token, next_=target)
            assert res.status == 303 and res.location == "/admin/requests", target
        finally:
            await c.close()


async def test_sign_out_ends_the_session(running: Running, admin: Console) -> None:
    cookie = next(m for m in admin.jar if m.key == "__Host-domum-admin").value
    res = await admin.post("/admin/logout", {})
    assert res.status == 303 and res.location == "/admin/login?signed_out=1"
    assert (await admin.get("/admin/requests")).status == 303
    # The old cookie value is dead server-side, not just forgotten by the browser.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=running.ssl)) as s:
        async with s.get(
            running.admin_url + "/admin/requests",
            headers={"Cookie": f"__Host-domum-admin={cookie}"},
            allow_redirects=False,
        ) as r:
            assert r.status == 303
    assert "console.signed_out" in await _audit_actions(running)


async def test_revoking_the_api_token_ends_console_sessions(running: Running, admin: Console) -> None:
    assert (await admin.get("/admin/groups")).status == 200
    await running.gateway.store.revoke_api_token(
        "admin", datetime.now(UTC), AuditEntry(actor="test", action="token.revoked", subject="token:admin")
    )
    assert (await admin.get("/admin/groups")).status == 303


async def test_idle_and_absolute_expiry(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2030, 1, 1, 8, 0, tzinfo=UTC))
    store = SqliteStore(tmp_path / "console.db", clock)
    await store.open()
    try:
        sessions = ConsoleSessions(store, clock)
        sid, _ = await sessions.create("h", "admin", Role.ADMIN)
        clock.advance(minutes=29)
        assert await sessions.find(sid) is not None
        clock.advance(minutes=29)  # 29 minutes since the last request: still alive
        assert await sessions.find(sid) is not None
        clock.advance(minutes=30)
        assert await sessions.find(sid) is None, "idle for 30 minutes"
        sid, _ = await sessions.create("h", "admin", Role.ADMIN)
        for _ in range(12 * 3 - 1):
            clock.advance(minutes=20)
            assert await sessions.find(sid) is not None
        clock.advance(minutes=20)
        assert await sessions.find(sid) is None, "12 hours after sign-in, however active"
        assert await sessions.find("not-a-session") is None
        # The first one went when the second was created; the second goes now.
        assert await store.purge_expired(clock.now()) == 1
    finally:
        await store.close()


async def test_console_sessions_are_bounded_and_state_round_trips(tmp_path: Path) -> None:
    clock = FakeClock(datetime(2030, 1, 1, 8, 0, tzinfo=UTC))
    store = SqliteStore(tmp_path / "console.db", clock)
    await store.open()
    try:
        sessions = ConsoleSessions(store, clock, max_sessions=3)
        made = []
        for _ in range(4):
            clock.advance(seconds=1)
            made.append(await sessions.create("h", "admin", Role.ADMIN))
        assert await sessions.find(made[0][0]) is None, "the least recently used one was dropped"
        sid, first = made[3]
        found = await sessions.find(sid)
        assert found is not None and found.csrf == first.csrf and not found.dirty
        found.flash("Saved.")
        found.remember_draft("d1", "req_1")
        await sessions.save(found)
        again = await sessions.find(sid)
        assert again is not None and again.saved_drafts == {"d1": "req_1"}
        assert [n.text for n in again.take_notices()] == ["Saved."]
        await sessions.save(again)
        third = await sessions.find(sid)
        assert third is not None and third.notices == [] and third.saved_drafts == {"d1": "req_1"}
        await sessions.end_for_token("h")
        assert await sessions.find(sid) is None
    finally:
        await store.close()


# CSRF ------------------------------------------------------------------------
async def test_posts_without_the_right_csrf_token_are_403(running: Running, admin: Console) -> None:
    for data in ({"label": "No token"}, {"label": "Wrong", "csrf": "x" * 43}, {"label": "Empty", "csrf": ""}):
        res = await admin.post("/admin/reasons/new", data, csrf=False)
        assert res.status == 403, data
        assert res.headers["Content-Type"].startswith("text/html")
        _assert_secure_page(res)
        assert "security token" in res.text
    # Another session's token does not work here either.
    other = Console(running)
    try:
        await other.login(running.admin_token)
        res = await admin.post("/admin/reasons/new", {"label": "Theirs", "csrf": other.csrf}, csrf=False)
        assert res.status == 403
    finally:
        await other.close()
    # A cross-site post is refused even with a valid token.
    res = await admin.post(
        "/admin/reasons/new", {"label": "X-site"}, headers={"Origin": "https://evil.example"}
    )
    assert res.status == 403
    res = await admin.post(
        "/admin/reasons/new", {"label": "X-site"}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert res.status == 403
    assert await running.gateway.store.list_reasons() == []
    res = await admin.post("/admin/reasons/new", {"label": "Fine"})
    assert res.status == 303
    assert [r.label for r in await running.gateway.store.list_reasons()] == ["Fine"]


# auditors --------------------------------------------------------------------
async def _seeded_request(running: Running) -> tuple[Seed, str]:
    sd = await seed(running)
    async with running.admin() as s:
        st, req = await call(s, "POST", "/api/v1/access-requests", request_body(sd))
        assert st == 201, req
    return sd, req["id"]


async def test_auditor_reads_everything_and_can_write_nothing(running: Running, auditor: Console) -> None:
    sd, rid = await _seeded_request(running)
    for path in (
        "/admin/requests",
        f"/admin/requests/{rid}",
        f"/admin/requests/{rid}/explain",
        "/admin/groups",
        "/admin/users",
        "/admin/reasons",
        "/admin/targets",
        "/admin/sessions",
        "/admin/audit",
        "/admin/audit/verify",
    ):
        page = await auditor.get(path)
        assert page.status == 200, path
        _assert_secure_page(page)
        _no_inline_code(page.text)
        assert "Read-only" in page.text
        for write in ("/new", "/forward", "/revoke", "/delete", f'href="/admin/groups/{sd.group_id}"'):
            assert write not in page.text, (path, write)
        assert 'method="post"' not in page.text.replace('method="post" action="/admin/logout"', ""), path
    evidence = await auditor.get(f"/admin/requests/{rid}/evidence.json")
    assert evidence.status == 200
    before = await _audit_actions(running)
    writes: list[tuple[str, dict[str, str]]] = [
        ("/admin/groups/new", {"name": "x", "kind": "internal"}),
        (f"/admin/groups/{sd.group_id}", {"name": "renamed", "kind": "internal"}),
        (f"/admin/groups/{sd.group_id}/delete", {}),
        ("/admin/users/new", {"group_id": sd.group_id, "name": "Eve", "email": "eve@example.com"}),
        (f"/admin/users/{sd.user_id}", {"name": "Renamed"}),
        (f"/admin/users/{sd.user_id}/delete", {}),
        ("/admin/reasons/new", {"label": "x"}),
        (f"/admin/reasons/{sd.reason_id}/delete", {}),
        ("/admin/targets/new", {"name": "x", "protocol": "http", "url": "http://x/"}),
        (f"/admin/targets/{sd.target_id}", {"name": "renamed", "protocol": "http", "url": "http://x/"}),
        (f"/admin/targets/{sd.target_id}/delete", {}),
        ("/admin/requests/new", {"kind": "internal", "step": "review", "action": "save"}),
        (f"/admin/requests/{rid}/forward", {}),
        (f"/admin/requests/{rid}/revoke", {}),
    ]
    for path, data in writes:
        res = await auditor.post(path, data)
        assert res.status == 403, path
        assert "read-only" in res.text
    for path in (
        "/admin/groups/new",
        f"/admin/groups/{sd.group_id}",
        f"/admin/groups/{sd.group_id}/delete",
        "/admin/users/new",
        "/admin/requests/new",
        f"/admin/requests/{rid}/forward",
        f"/admin/requests/{rid}/revoke",
    ):
        assert (await auditor.get(path)).status == 403, path
    # Nothing changed and nothing was audited (page reads are not audit events).
    assert await _audit_actions(running) == before
    req = await running.gateway.store.get_request(rid)
    assert req is not None and req.status is RequestStatus.SAVED
    assert len(running.mailbox.messages) == 0


async def test_auditor_may_terminate_a_live_session_as_in_the_api(running: Running, auditor: Console) -> None:
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    await login_direct(running, sd, link)
    live = await running.gateway.store.list_sessions(rid)
    assert len(live) == 1
    page = await auditor.get("/admin/sessions")
    assert live[0].id in page.text and "Alice Example" in page.text
    res = await auditor.post(f"/admin/sessions/{live[0].id}/terminate", {})
    assert res.status == 303
    assert await running.gateway.store.list_sessions(rid) == []
    ended = await running.gateway.store.get_session(live[0].id)
    assert ended is not None and ended.end_reason == "terminated"
    page = await auditor.get("/admin/sessions")
    assert "Session terminated." in page.text
    events = await running.gateway.store.list_audit(AuditFilter(type="session.terminated"))
    assert [e.actor for e in events.items] == ["console:auditor"]
    res = await auditor.post(f"/admin/sessions/{live[0].id}/terminate", {})
    assert "already ended" in (await auditor.get(res.location)).text


# field errors keep input ------------------------------------------------------
async def test_group_form_errors_sit_next_to_fields_and_keep_input(running: Running, admin: Console) -> None:
    res = await admin.post(
        "/admin/groups/new",
        [
            ("name", ""),
            ("kind", "internal"),
            ("allow_cidrs", "10.0.0.0/8\r\nnot-a-net"),
            ("deny_cidrs", ""),
            ("countries", "CH, Germany"),
            ("max_duration.value", "abc"),
            ("max_duration.unit", "days"),
            ("idle_timeout.value", "15"),
            ("idle_timeout.unit", "minutes"),
            ("max_sessions", "0"),
        ],
    )
    assert res.status == 422
    html = res.text
    assert 'id="error-summary"' in html
    assert re.search(r'id="f-name-error">\s*<p>Name is required\.</p>', html)
    assert re.search(r'id="f-allow-cidrs-error">\s*<p>Allowed networks \(entry 2\) must be', html)
    assert 'id="f-countries-error"' in html
    assert 'id="f-max-duration-error"' in html and "whole number" in html
    assert 'id="f-max-sessions-error"' in html
    assert 'id="f-channels-error"' in html
    assert "10.0.0.0/8\nnot-a-net</textarea>" in html
    assert _field_value(html, "countries") == "CH, Germany"
    assert _field_value(html, "max_duration.value") == "abc"
    assert _field_value(html, "max_sessions") == "0"
    assert 'aria-invalid="true"' in html
    assert await running.gateway.store.list_groups() == []


async def test_wizard_general_errors_keep_everything(running: Running, admin: Console) -> None:
    sd = await seed(running)
    res = await admin.post(
        "/admin/requests/new",
        {
            "kind": "internal",
            "step": "general",
            "action": "next",
            "group_id": sd.group_id,
            "user_id": sd.user_id,
            "justification": "   ",
            "reason_id": sd.reason_id,
            "governance_code": "CHG-<b>42</b>",
            "start_date": "2031-03-04",
            "start_time": "10:15",
            "tz": "+01:00",
        },
    )
    assert res.status == 422
    html = res.text
    assert 'data-step="general"' in html
    assert re.search(r'id="f-justification-error">\s*<p>Justification is required\.</p>', html)
    assert _selected(html, "group_id") == sd.group_id
    assert _selected(html, "user_id") == sd.user_id
    assert _selected(html, "reason_id") == sd.reason_id
    assert _field_value(html, "governance_code") == "CHG-<b>42</b>"
    assert "CHG-&lt;b&gt;42&lt;/b&gt;" in html
    # The next step's state travels along untouched.
    assert _field_value(html, "start_date") == "2031-03-04"
    assert _field_value(html, "tz") == "+01:00"


async def _wizard_post(c: Console, state: dict[str, str], step: str, action: str = "next") -> Page:
    return await c.post("/admin/requests/new", {**state, "step": step, "action": action})


def _general(sd: Seed, **over: str) -> dict[str, str]:
    return {
        "kind": "internal",
        "group_id": sd.group_id,
        "user_id": sd.user_id,
        "justification": "Patch the wiki",
        "reason_id": sd.reason_id,
        "governance_code": "CHG-1234",
        **over,
    }


async def test_wizard_limit_errors_keep_everything(running: Running, admin: Console) -> None:
    sd = await seed(running)
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    state = {
        **_general(sd),
        "start_date": tomorrow,
        "start_time": "09:00",
        "tz": "+02:00",
        "mode": "duration",
        "duration.value": "40",
        "duration.unit": "days",
    }
    res = await _wizard_post(admin, state, "limit")
    assert res.status == 422
    assert 'data-step="limit"' in res.text
    assert re.search(r'id="f-duration-value-error">\s*<p>Duration must not exceed the group', res.text)
    assert _field_value(res.text, "duration.value") == "40"
    assert _selected(res.text, "duration.unit") == "days"
    assert _selected(res.text, "tz") == "+02:00"
    assert _field_value(res.text, "justification") == "Patch the wiki"
    assert _field_value(res.text, "governance_code") == "CHG-1234"
    # Custom window off the quarter-hour grid: the error names the end.
    state.update({"mode": "custom", "end_date": tomorrow, "end_time": "10:07"})
    res = await _wizard_post(admin, state, "limit")
    assert res.status == 422
    assert re.search(r'id="f-end-error">\s*<p>End must be on the 15-minute grid', res.text)
    assert _field_value(res.text, "end_time") == "10:07"
    # Missing date: said in words, not as an ISO 8601 lecture.
    state.update({"mode": "duration", "duration.value": "2", "duration.unit": "hours", "start_date": ""})
    res = await _wizard_post(admin, state, "limit")
    assert res.status == 422
    assert "Start needs a date and a time." in res.text
    # An error in a general field found late sends the user back to that step, input intact.
    state.update({"start_date": tomorrow, "user_id": "usr_gone"})
    res = await _wizard_post(admin, state, "limit")
    assert res.status == 422 and 'data-step="general"' in res.text
    assert "No user" in res.text
    assert _field_value(res.text, "start_date") == tomorrow
    assert (await running.gateway.store.list_requests(_all())).items == []


def _all() -> Any:
    from domum_gateway.store.base import RequestFilter

    return RequestFilter(limit=500)


# the wizard end to end -------------------------------------------------------
async def test_wizard_reviews_with_the_computed_end_then_saves(running: Running, admin: Console) -> None:
    sd = await seed(running, policy={"max_duration": {"value": 2, "unit": "months"}})
    page = await admin.get(f"/admin/requests/new?kind=internal&group_id={sd.group_id}")
    assert page.status == 200 and 'data-step="general"' in page.text
    _no_inline_code(page.text)
    assert _selected(page.text, "group_id") == sd.group_id
    state = _general(sd)
    res = await _wizard_post(admin, state, "general")
    assert res.status == 200 and 'data-step="limit"' in res.text
    assert 'step="900"' in res.text
    state.update(
        {
            "start_date": "2031-01-31",
            "start_time": "10:00",
            "tz": "+01:00",
            "mode": "duration",
            "duration.value": "1",
            "duration.unit": "months",
        }
    )
    res = await _wizard_post(admin, state, "limit")
    assert res.status == 200 and 'data-step="review"' in res.text, res.text
    # Calendar month in the admin's offset, clamped to February's last day.
    assert "2031-02-28 10:00 UTC+01:00" in res.text and "2031-02-28 09:00 UTC" in res.text
    assert "wiki" in res.text and "alice@example.com" in res.text
    assert (await running.gateway.store.list_requests(_all())).items == [], "review must not save"
    back = await _wizard_post(admin, state, "review", "back")
    assert 'data-step="limit"' in back.text and _field_value(back.text, "start_date") == "2031-01-31"
    res = await _wizard_post(admin, state, "review", "save")
    assert res.status == 303 and res.location.startswith("/admin/requests/req_")
    rid = res.location.rsplit("/", 1)[1]
    req = await running.gateway.store.get_request(rid)
    assert req is not None and req.status is RequestStatus.SAVED
    assert req.start == datetime(2031, 1, 31, 9, 0, tzinfo=UTC)
    assert req.end == datetime(2031, 2, 28, 9, 0, tzinfo=UTC)
    assert req.governance_code == "CHG-1234" and req.created_by == "console:admin"
    detail = await admin.get(res.location)
    assert "saved. Forward the URL access" in detail.text
    events = await running.gateway.store.list_audit(AuditFilter(type="request.saved"))
    assert [(e.actor, e.origin) for e in events.items] == [("console:admin", "127.0.0.1")]


async def test_wizard_custom_window(running: Running, admin: Console) -> None:
    sd = await seed(running)
    day = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%d")
    state = {
        **_general(sd),
        "start_date": day,
        "start_time": "09:15",
        "tz": "+05:30",
        "mode": "custom",
        "end_date": day,
        "end_time": "17:45",
    }
    res = await _wizard_post(admin, state, "limit")
    assert res.status == 200 and 'data-step="review"' in res.text, res.text
    assert f"{day} 17:45 UTC+05:30" in res.text and f"{day} 12:15 UTC" in res.text
    assert "Custom window of 8 hours 30 minutes" in res.text
    res = await _wizard_post(admin, state, "review", "save")
    assert res.status == 303
    req = await running.gateway.store.get_request(res.location.rsplit("/", 1)[1])
    assert req is not None and (req.end - req.start) == timedelta(hours=8, minutes=30)


async def test_saving_the_same_wizard_twice_saves_one_request(running: Running, admin: Console) -> None:
    sd = await seed(running)
    page = await admin.get("/admin/requests/new?kind=internal")
    draft = _field_value(page.text, "draft")
    assert draft and len(draft) >= 20
    day = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    state = {
        **_general(sd),
        "draft": draft,
        "start_date": day,
        "start_time": "08:00",
        "tz": "+00:00",
        "mode": "duration",
        "duration.value": "1",
        "duration.unit": "hours",
    }
    first = await _wizard_post(admin, state, "review", "save")
    again = await _wizard_post(admin, state, "review", "save")
    assert first.status == again.status == 303 and first.location == again.location
    assert "already saved" in (await admin.get(again.location)).text
    assert len((await running.gateway.store.list_requests(_all())).items) == 1


async def test_wizard_third_party_inline_user(running: Running, admin: Console) -> None:
    sd = await seed(running, kind="third_party")
    page = await admin.get("/admin/requests/new?kind=third_party")
    assert 'name="user.email"' in page.text and 'name="user_id"' not in page.text.split("<form", 2)[-1]
    state = {
        "kind": "third_party",
        "group_id": sd.group_id,
        "user.name": "Vendor Vic",
        "user.email": "vic@",
        "justification": "Firmware update",
        "reason_id": sd.reason_id,
    }
    res = await _wizard_post(admin, state, "general")
    assert res.status == 422
    assert re.search(r'id="f-user-email-error">\s*<p>Third-party e-mail must be an e-mail address', res.text)
    assert _field_value(res.text, "user.name") == "Vendor Vic"
    assert _field_value(res.text, "user.email") == "vic@"
    state["user.email"] = "vic@vendor.example"
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    state.update({"start_date": tomorrow, "start_time": "08:00", "tz": "+00:00", "mode": "duration"})
    state.update({"duration.value": "3", "duration.unit": "hours"})
    res = await _wizard_post(admin, state, "limit")
    assert res.status == 200 and "third party, new" in res.text
    res = await _wizard_post(admin, state, "review", "save")
    assert res.status == 303
    req = await running.gateway.store.get_request(res.location.rsplit("/", 1)[1])
    assert req is not None
    user = await running.gateway.store.get_user(req.user_id)
    assert user is not None and user.ephemeral and user.email == "vic@vendor.example"


async def test_internal_wizard_refuses_a_user_of_another_group(running: Running, admin: Console) -> None:
    sd = await seed(running)
    other = await seed(
        running,
        email="bob@example.com",
        target={"name": "wiki2", "protocol": "http", "url": "http://127.0.0.1:9/"},
    )
    res = await _wizard_post(admin, _general(sd, user_id=other.user_id), "general")
    assert res.status == 422
    assert re.search(r'id="f-user-id-error">\s*<p>User: The user does not belong to this group\.', res.text)
    # Both groups' users are listed (grouped) so the script can filter; server decides.
    assert f'data-group="{sd.group_id}"' in res.text and f'data-group="{other.group_id}"' in res.text


# requests list and row actions -----------------------------------------------
async def test_forward_confirm_notice_and_link_then_revoke(running: Running, admin: Console) -> None:
    sd, rid = await _seeded_request(running)
    page = await admin.get("/admin/requests")
    assert rid in page.text and "Forward URL Access" in page.text and "saved" in page.text
    confirm = await admin.get(f"/admin/requests/{rid}/forward?back=/admin/requests")
    assert confirm.status == 200
    assert "a***@example.com" in confirm.text and ">Yes<" in confirm.text and ">No<" in confirm.text
    res = await admin.post(f"/admin/requests/{rid}/forward", {"back": "/admin/requests"})
    assert res.status == 303 and res.location == "/admin/requests"
    page = await admin.get("/admin/requests")
    assert "Personal link sent by e-mail to a***@example.com." in page.text
    assert "alice@example.com" not in page.text.split("<main", 1)[1].split("</div>", 1)[0]
    await running.mailbox.wait_count(1)
    assert "/a/" in running.mailbox.last_link("alice@example.com")
    # Filters.
    assert rid in (await admin.get("/admin/requests?status=forwarded")).text
    assert rid not in (await admin.get("/admin/requests?status=revoked")).text
    assert rid in (await admin.get(f"/admin/requests?group_id={sd.group_id}&user_id={sd.user_id}")).text
    assert rid not in (await admin.get("/admin/requests?user_id=usr_other")).text
    bad = await admin.get("/admin/requests?status=bogus")
    assert bad.status == 422 and "Status must be one of" in bad.text
    # Revoke, with its own confirmation.
    confirm = await admin.get(f"/admin/requests/{rid}/revoke?back=/admin/requests/{rid}")
    assert "Revoke the access of Alice Example" in confirm.text
    res = await admin.post(f"/admin/requests/{rid}/revoke", {"back": f"/admin/requests/{rid}"})
    assert res.status == 303 and res.location == f"/admin/requests/{rid}"
    detail = await admin.get(res.location)
    assert "Access revoked" in detail.text and "badge-revoked" in detail.text
    assert "request.revoked" in detail.text
    res = await admin.post(f"/admin/requests/{rid}/revoke", {"back": "https://evil.example/"})
    assert res.location == "/admin/requests"
    assert "already revoked" in (await admin.get("/admin/requests")).text
    res = await admin.post(f"/admin/requests/{rid}/forward", {})
    assert "The link was not sent" in (await admin.get(res.location)).text


async def test_forward_delivery_failure_is_a_notice(running: Running, admin: Console) -> None:
    _sd, rid = await _seeded_request(running)
    running.mailbox.refuse = True
    res = await admin.post(f"/admin/requests/{rid}/forward", {})
    page = await admin.get(res.location)
    assert "The link was not sent" in page.text and "notice-error" in page.text
    req = await running.gateway.store.get_request(rid)
    assert req is not None and req.status is RequestStatus.SAVED


async def test_explain_uses_the_decision(running: Running, admin: Console) -> None:
    sd = await seed(running, policy={"origins": {"allow_cidrs": ["10.0.0.0/8"]}})
    async with running.admin() as s:
        st, req = await call(s, "POST", "/api/v1/access-requests", request_body(sd))
    rid = req["id"]
    page = await admin.get(f"/admin/requests/{rid}/explain")
    assert page.status == 200 and "Refused" in page.text and "not_forwarded" in page.text
    async with running.admin() as s:
        await call(s, "POST", f"/api/v1/access-requests/{rid}/forward")
    page = await admin.get(f"/admin/requests/{rid}/explain")
    assert "Allowed" in page.text
    page = await admin.get(f"/admin/requests/{rid}/explain?address=203.0.113.9&target_id={sd.target_id}")
    assert "origin_denied" in page.text and "Your address is not allowed" in page.text
    later = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    page = await admin.get(f"/admin/requests/{rid}/explain", params={"at": later, "address": "10.1.2.3"})
    assert "expired" in page.text
    page = await admin.get(f"/admin/requests/{rid}/explain?address=nope&at=tomorrow")
    assert page.status == 422
    assert "Address must be an IPv4 or IPv6 address." in page.text and 'id="f-at-error"' in page.text


async def test_evidence_download(running: Running, admin: Console) -> None:
    _sd, rid = await _seeded_request(running)
    async with admin.s.get(f"/admin/requests/{rid}/evidence.json") as r:
        assert r.status == 200
        assert r.headers["Content-Disposition"] == f'attachment; filename="evidence-{rid}.json"'
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.headers["Cache-Control"] == "no-store"
        doc = json.loads(await r.text())
    assert doc["request"]["id"] == rid and doc["format"] == "domum-evidence/1"
    assert verify_bundle(doc, None) is None, "the console serves the same signed bundle as the API"
    timeline = [e["action"] for e in doc["chain"]["events"] if e["seq"] in doc["timeline"]]
    assert timeline == ["request.saved"]
    events = await running.gateway.store.list_audit(AuditFilter(type="request.evidence_exported"))
    assert [e.actor for e in events.items] == ["console:admin"]


# catalogue pages -------------------------------------------------------------
async def test_catalogue_create_edit_delete(running: Running, admin: Console) -> None:
    store = running.gateway.store
    res = await admin.post("/admin/targets/new", {"name": "db-01", "protocol": "ssh", "host": "10.0.0.5"})
    assert res.status == 303
    target = await store.get_target("db-01")
    assert target is not None and target.port == 22
    res = await admin.post(
        f"/admin/targets/{target.id}",
        {"name": "db-01", "protocol": "ssh", "host": "10.0.0.6", "port": "2222"},
    )
    assert res.status == 303
    target = await store.get_target("db-01")
    assert target is not None and (target.host, target.port) == ("10.0.0.6", 2222)
    res = await admin.post("/admin/targets/new", {"name": "Bad Name", "protocol": "tcp", "host": "x"})
    assert res.status == 422 and 'id="f-name-error"' in res.text and 'id="f-port-error"' in res.text
    assert _field_value(res.text, "name") == "Bad Name"
    res = await admin.post(
        "/admin/groups/new",
        [
            ("name", "Operations"),
            ("kind", "internal"),
            ("targets", target.id),
            ("allow_cidrs", "10.0.0.0/8"),
            ("countries", "ch de"),
            ("max_duration.value", "7"),
            ("max_duration.unit", "days"),
            ("idle_timeout.value", "20"),
            ("idle_timeout.unit", "minutes"),
            ("max_sessions", "2"),
            ("channels", "email"),
        ],
    )
    assert res.status == 303, res.text
    (group,) = await store.list_groups()
    assert group.policy.targets == (target.id,) and group.policy.origins.countries == ("CH", "DE")
    assert group.policy.max_sessions == 2 and [c.value for c in group.policy.channels] == ["email"]
    edit = await admin.get(f"/admin/groups/{group.id}")
    assert _field_value(edit.text, "name") == "Operations" and f'value="{target.id}" checked' in edit.text
    res = await admin.post(
        f"/admin/groups/{group.id}",
        [
            ("name", "Ops"),
            ("kind", "internal"),
            ("max_duration.value", "7"),
            ("max_duration.unit", "days"),
            ("idle_timeout.value", "20"),
            ("idle_timeout.unit", "minutes"),
            ("max_sessions", "2"),
            ("channels", "email"),
            ("channels", "sms"),
        ],
    )
    assert res.status == 303
    group2 = await store.get_group(group.id)
    assert group2 is not None and group2.name == "Ops" and group2.policy.targets == ()
    res = await admin.post(
        "/admin/users/new",
        {"group_id": group.id, "name": "Sam", "phone": "+41 79 123 45 67", "channel": "sms"},
    )
    assert res.status == 303
    (user,) = await store.list_users(group.id)
    assert user.phone == "+41791234567"
    res = await admin.post(
        f"/admin/users/{user.id}", {"name": "Sam Smith", "email": "sam@example.com", "channel": "email"}
    )
    assert res.status == 303
    user2 = await store.get_user(user.id)
    assert user2 is not None and user2.name == "Sam Smith" and user2.channel.value == "email"
    # A group with users is kept: the refusal is a notice, the group stays.
    confirm = await admin.get(f"/admin/groups/{group.id}/delete")
    assert "Delete the group \u201cOps\u201d?" in confirm.text
    res = await admin.post(f"/admin/groups/{group.id}/delete", {})
    assert "was not deleted" in (await admin.get(res.location)).text
    assert await store.get_group(group.id) is not None
    for path in (f"/admin/users/{user.id}/delete", f"/admin/groups/{group.id}/delete"):
        res = await admin.post(path, {})
        assert "was deleted" in (await admin.get(res.location)).text
    assert await store.list_groups() == []
    res = await admin.post("/admin/reasons/new", {"label": ""})
    assert res.status == 422 and "Label is required." in res.text
    assert (await admin.post(f"/admin/targets/{target.id}/delete", {})).status == 303
    assert await store.list_targets() == []
    assert (await admin.get("/admin/targets/tgt_missing")).status == 404


async def test_audit_log_filters_and_chain_verification(running: Running, admin: Console) -> None:
    _sd, rid = await _seeded_request(running)
    page = await admin.get("/admin/audit?type=request.saved")
    assert page.status == 200 and rid in page.text and "group.created" not in page.text.split("<table", 1)[1]
    page = await admin.get(f"/admin/audit?request_id={rid}")
    assert "request.saved" in page.text
    page = await admin.get("/admin/audit?since=2999-01-01")
    assert "No events match" in page.text
    page = await admin.get("/admin/audit?since=yesterday")
    assert page.status == 422 and 'id="f-since-error"' in page.text
    page = await admin.get("/admin/audit/verify")
    assert "Audit chain intact" in page.text
    await _tamper(running, "UPDATE audit_events SET actor = 'someone else' WHERE seq = 2")
    page = await admin.get("/admin/audit/verify")
    assert "BROKEN at event 2" in page.text


async def _tamper(run: Running, sql: str) -> None:
    """Change the database behind the gateway's back (either store)."""
    db = run.gateway.settings.storage.sqlite_path
    if db is None:
        conn = await asyncpg.connect(run.gateway.settings.storage.url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
        return
    lite = sqlite3.connect(db)
    try:
        with lite:
            lite.execute(sql)
    finally:
        lite.close()


# hostile input -----------------------------------------------------------------
async def test_hostile_forms_are_refused_as_pages(running: Running, admin: Console) -> None:
    big = await admin.post("/admin/reasons/new", {"label": "x" * (70 * 1024)})
    assert big.status == 413 and big.headers["Content-Type"].startswith("text/html")
    many = await admin.post("/admin/reasons/new", [(f"f{i}", "1") for i in range(700)])
    assert many.status == 413
    raw = f"csrf={admin.csrf}&label=%FF%FE".encode()
    bad = await admin.post(
        "/admin/reasons/new",
        raw,
        csrf=False,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert bad.status == 400 and "UTF-8" in bad.text
    form = aiohttp.FormData({"csrf": admin.csrf, "label": "x"})
    form.add_field("file", b"data", filename="a.txt")
    multi = await admin.post("/admin/reasons/new", form, csrf=False)
    assert multi.status == 415
    nul = await admin.post("/admin/reasons/new", {"label": "bad\x00label"})
    assert nul.status == 422 and "control characters" in nul.text
    assert await running.gateway.store.list_reasons() == []
    for page in (big, many, bad, multi):
        _assert_secure_page(page)
        assert "Traceback" not in page.text


async def test_script_in_names_is_escaped_everywhere(running: Running, admin: Console) -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    res = await admin.post(
        "/admin/groups/new",
        [
            ("name", evil),
            ("kind", "internal"),
            ("max_duration.value", "1"),
            ("max_duration.unit", "days"),
            ("idle_timeout.value", "5"),
            ("idle_timeout.unit", "minutes"),
            ("max_sessions", "1"),
            ("channels", "email"),
        ],
    )
    assert res.status == 303
    res = await admin.post("/admin/reasons/new", {"label": evil})
    assert res.status == 303
    for path in ("/admin/groups", "/admin/reasons", "/admin/requests/new", "/admin/audit", "/admin/requests"):
        page = await admin.get(path)
        assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
        _no_inline_code(page.text)
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in (await admin.get("/admin/groups")).text


async def test_console_errors_are_html_pages_not_problem_json(running: Running, admin: Console) -> None:
    for path in ("/admin/requests/req_missing", "/admin/nowhere", "/admin/groups/grp_x/delete"):
        page = await admin.get(path)
        assert page.status == 404, path
        assert page.headers["Content-Type"].startswith("text/html")
        _assert_secure_page(page)
        assert "problem" not in page.headers["Content-Type"]
    res = await admin.post("/admin/requests", {})
    assert res.status == 404 and res.headers["Content-Type"].startswith("text/html")
    # The API keeps answering problem+json and still needs its bearer token.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=running.ssl)) as s:
        async with s.get(
            running.admin_url + "/api/v1/groups", cookies=admin.jar.filter_cookies(URL(running.admin_url))
        ) as r:
            assert r.status == 401 and r.headers["Content-Type"].startswith("application/problem+json")
    css = await admin.get("/admin/static/console.css")
    assert css.status == 200 and css.headers["Content-Type"].startswith("text/css")
    assert (await admin.get("/admin/static/..%2Fconsole.py")).status == 404
    assert (await admin.get("/")).status == 404


async def test_console_sessions_live_in_the_store_keyed_by_hash(running: Running, admin: Console) -> None:
    ctx = running.gateway.admin_app[CONSOLE]
    cookie = next(m for m in admin.jar if m.key == "__Host-domum-admin").value
    assert cookie not in repr(vars(ctx.sessions))
    record = await running.gateway.store.find_console_session(hash_secret(cookie), datetime.now(UTC))
    assert record is not None and record.token_name == "admin"
    stored = await running.database_bytes()
    assert cookie.encode() not in stored and admin.csrf.encode() not in stored
