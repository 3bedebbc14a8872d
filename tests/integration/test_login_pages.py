"""The remote user's pages end to end, against a real gateway and a real SMTP server."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime, timedelta

import pytest

from domum_gateway.proxy.context import COOKIE
from domum_gateway.proxy.login import GENERIC_REFUSAL
from domum_gateway.proxy.pages import PRE_COOKIE

from ..conftest import Running
from ..peers.public_client import PublicClient, ask_token, client_for, sign_in
from .helpers import call, create_forwarded, seed

pytestmark = pytest.mark.asyncio


def _code(link: str) -> str:
    return link.rsplit("/", 1)[1]


async def _audit_actions(run: Running, request_id: str) -> list[tuple[str, str]]:
    async with run.admin() as s:
        st, body = await call(s, "GET", f"/api/v1/audit?request_id={request_id}&limit=500")
        assert st == 200, body
    return [(e["type"], e["outcome"]) for e in body["items"]]


async def _metrics(run: Running) -> str:
    async with run.admin() as s:
        st, text = await call(s, "GET", "/metrics")
        assert st == 200
    return str(text)


async def test_whole_flow_from_mail_to_portal_and_logout(running: Running) -> None:
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        page = await user.get(link)
        assert page.status == 200
        assert "Patch the wiki" in page.text
        assert "<dt>Token goes to</dt><dd>a***@example.com" in page.text
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", page.text)
        assert re.search(r'<time datetime="[^"]+Z" data-local>', page.text)
        assert ">Send token</button>" in page.text
        assert page.csrf and user.cookie(PRE_COOKIE)

        n = len(running.mailbox.messages)
        page = await user.post(f"{link}/token")
        assert page.status == 200 and page.history == (303,)
        assert page.url.endswith(f"{link}/token")
        assert 'name="token"' in page.text and "a***@example.com" in page.text
        await running.mailbox.wait_count(n + 1)
        token = running.mailbox.last_token(sd.email)

        async with user.session.post(
            f"{link}/verify", data={"token": token, "csrf": page.csrf}, allow_redirects=False
        ) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/portal"
            set_cookie = next(v for v in r.headers.getall("Set-Cookie") if v.startswith(f"{COOKIE}="))
        attrs = [a.strip().lower() for a in set_cookie.split(";")]
        assert "secure" in attrs and "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
        assert not any(a.startswith("domain") for a in attrs)
        max_age = int(next(a for a in attrs if a.startswith("max-age=")).split("=")[1])
        assert 0 < max_age <= 2 * 3600  # never beyond the window end

        portal = await user.get("/portal")
        assert portal.status == 200
        assert "wiki" in portal.text and 'href="/t/wiki/"' in portal.text
        assert "Time left" in portal.text and "Sign out" in portal.text
        assert token not in portal.text and _code(link) not in portal.text

        out = await user.post("/logout", csrf=portal.csrf)
        assert out.status == 200 and out.url.endswith("/signed-out")
        assert "You are signed out" in out.text
        assert not user.cookie(COOKIE)
        again = await user.get("/portal")
        assert again.status == 401 and again.title == "Not signed in"

    actions = await _audit_actions(running, rid)
    assert ("token.sent", "ok") in actions
    assert ("login.succeeded", "ok") in actions
    assert ("session.started", "ok") in actions
    assert ("session.ended", "ok") in actions
    metrics = await _metrics(running)
    assert 'domum_logins_total{outcome="ok"} 1.0' in metrics
    assert 'domum_tokens_sent_total{channel="email",outcome="ok"} 1.0' in metrics


async def test_security_headers_on_every_gateway_page(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        pages = [
            await user.get("/"),
            await user.get(link),
            await user.get("/a/AAAAAAAAAAAAAAAAAAAAAA"),
            await user.get("/portal"),
            await user.get("/no/such/page"),
            await user.get("/signed-out"),
        ]
        for page in pages:
            h = page.headers
            csp = h["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
            assert h["Cache-Control"] == "no-store"
            assert h["Referrer-Policy"] == "no-referrer"
            assert h["X-Frame-Options"] == "DENY"
            assert h["X-Content-Type-Options"] == "nosniff"
            assert h["Strict-Transport-Security"].startswith("max-age=")
            # No inline script or style anywhere: the CSP would block it.
            assert not re.search(r"<script(?![^>]*\bsrc=)", page.text)
            assert "<style" not in page.text and " style=" not in page.text
            assert re.search(r' on[a-z]+="', page.text) is None
        css = await user.get("/static/public/site.css")
        assert css.status == 200 and css.headers["Content-Type"].startswith("text/css")
        assert (
            css.headers["Cache-Control"] == "no-cache" and css.headers["X-Content-Type-Options"] == "nosniff"
        )
        js = await user.get("/static/public/site.js")
        assert js.status == 200 and "javascript" in js.headers["Content-Type"]
        missing = await user.get("/static/public/../../app.py")
        assert missing.status == 404


async def test_unknown_and_revoked_links_and_wrong_token_look_the_same(running: Running) -> None:
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    _rid2, link2 = await create_forwarded(running, sd)
    unknown = "/a/" + "Q" * 22
    async with client_for(running) as user:
        # A form for link2, kept from before it is revoked.
        await ask_token(running, user, link2, sd.email)
        old_form = user.last
        assert old_form is not None and old_form.csrf
        async with running.admin() as s:
            st, _ = await call(s, "POST", f"/api/v1/access-requests/{_rid2}/revoke")
            assert st == 200

        got_unknown = await user.get(unknown)
        got_revoked = await user.get(link2)
        assert got_unknown.status == got_revoked.status == 403
        assert got_unknown.message == got_revoked.message == GENERIC_REFUSAL
        assert got_unknown.shape(_code(unknown)) == got_revoked.shape(_code(link2))

        token = await ask_token(running, user, link, sd.email)
        wrong = f"{(int(token) + 1) % 10**8:08d}"
        wrong_page = await user.post(f"{link}/verify", {"token": wrong})
        revoked_page = await user.post(f"{link2}/verify", {"token": wrong}, csrf=old_form.csrf)
        unknown_page = await user.post(f"{unknown}/verify", {"token": wrong})  # no valid form exists
        assert wrong_page.status == revoked_page.status == unknown_page.status == 403
        assert wrong_page.message == revoked_page.message == GENERIC_REFUSAL
        shapes = {
            wrong_page.shape(_code(link)),
            revoked_page.shape(_code(link2)),
            unknown_page.shape(_code(unknown)),
        }
        assert len(shapes) == 1
    assert ("login.refused", "wrong") in await _audit_actions(running, rid)


async def test_token_typed_with_spaces_or_a_dash_is_accepted(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        token = await ask_token(running, user, link, sd.email)
        page = await user.post(f"{link}/verify", {"token": f" {token[:4]} {token[4:]} "})
        assert page.url.endswith("/portal") and page.status == 200
    async with client_for(running) as user:
        token = await ask_token(running, user, link, sd.email)
        page = await user.post(f"{link}/verify", {"token": f"{token[:4]}-{token[4:]}"})
        assert page.url.endswith("/portal")


async def test_full_width_digits_are_refused_without_costing_a_try(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        token = await ask_token(running, user, link, sd.email)
        form = user.last
        assert form is not None
        full_width = "".join(chr(0xFF10 + int(d)) for d in token)
        arabic_indic = "".join(chr(0x0660 + int(d)) for d in token)
        for typed in (full_width, arabic_indic, full_width[:4] + " " + token[4:]) * 2:
            page = await user.post(f"{link}/verify", {"token": typed}, csrf=form.csrf)
            assert page.status == 403 and page.message == GENERIC_REFUSAL
        # Six malformed attempts: more than the 5 tries, yet the real token still works.
        page = await user.post(f"{link}/verify", {"token": token}, csrf=form.csrf)
        assert page.url.endswith("/portal")


async def test_five_wrong_tries_kill_the_token(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        token = await ask_token(running, user, link, sd.email)
        csrf = user.last.csrf if user.last else None
        wrong = f"{(int(token) + 7) % 10**8:08d}"
        for _ in range(5):
            page = await user.post(f"{link}/verify", {"token": wrong}, csrf=csrf)
            assert page.status == 403 and page.message == GENERIC_REFUSAL
            assert f'href="{link}/token"' in page.text  # "Enter the token again"
        page = await user.post(f"{link}/verify", {"token": token}, csrf=csrf)
        assert page.status == 403 and page.title == "Token no longer valid"
        assert "Ask for a new one" in page.message
        # A new token works again.
        token = await ask_token(running, user, link, sd.email)
        page = await user.post(f"{link}/verify", {"token": token})
        assert page.url.endswith("/portal")


async def test_fifty_concurrent_wrong_guesses_through_the_pages(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        token = await ask_token(running, user, link, sd.email)
        csrf = user.last.csrf if user.last else None
        wrong = f"{(int(token) + 1) % 10**8:08d}"
        pages = await asyncio.gather(
            *(user.post(f"{link}/verify", {"token": wrong}, csrf=csrf) for _ in range(50))
        )
        assert {p.status for p in pages} == {403}
        assert sum(p.message == GENERIC_REFUSAL for p in pages) == 5  # the other 45: token used up
        page = await user.post(f"{link}/verify", {"token": token}, csrf=csrf)
        assert page.status == 403 and page.title == "Token no longer valid"


async def test_two_concurrent_correct_posts_open_exactly_one_session(running: Running) -> None:
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        token = await ask_token(running, user, link, sd.email)
        csrf = user.last.csrf if user.last else None
        pages = await asyncio.gather(
            user.post(f"{link}/verify", {"token": token}, csrf=csrf, allow_redirects=False),
            user.post(f"{link}/verify", {"token": token}, csrf=csrf, allow_redirects=False),
        )
        assert sorted(p.status for p in pages) == [303, 403]
    sessions = await running.gateway.store.list_sessions(rid)
    assert len(sessions) == 1


async def test_replay_after_success_is_refused(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        token = await ask_token(running, user, link, sd.email)
        csrf = user.last.csrf if user.last else None
        page = await user.post(f"{link}/verify", {"token": token}, csrf=csrf)
        assert page.url.endswith("/portal")
    async with client_for(running) as replayer:
        form = await replayer.get(f"{link}/token")  # a fresh form of its own: CSRF passes
        replay = await replayer.post(f"{link}/verify", {"token": token}, csrf=form.csrf)
        assert replay.status == 403 and replay.title == "Token no longer valid"


async def test_token_of_another_link_is_refused(running: Running) -> None:
    sd = await seed(running)
    _rid, link_a = await create_forwarded(running, sd)
    _rid2, link_b = await create_forwarded(running, sd)
    async with client_for(running) as user:
        token_a = await ask_token(running, user, link_a, sd.email)
        await ask_token(running, user, link_b, sd.email)
        page = await user.post(f"{link_b}/verify", {"token": token_a})
        assert page.status == 403 and page.message == GENERIC_REFUSAL
    async with client_for(running) as other:
        # Link A never had a session opened with its token being spent elsewhere.
        await other.get(link_a)
        await other.post(f"{link_a}/token")  # a fresh token replaces token_a
        page = await other.post(f"{link_a}/verify", {"token": token_a})
        assert page.status == 403


async def test_a_new_token_replaces_the_previous_one(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        first = await ask_token(running, user, link, sd.email)
        second = await ask_token(running, user, link, sd.email)
        csrf = user.last.csrf if user.last else None
        if first == second:  # one chance in 10^8
            pytest.skip("the two random tokens collided")
        page = await user.post(f"{link}/verify", {"token": first}, csrf=csrf)
        assert page.status == 403 and page.message == GENERIC_REFUSAL
        page = await user.post(f"{link}/verify", {"token": second}, csrf=csrf)
        assert page.url.endswith("/portal")


async def test_sixth_send_in_an_hour_is_429_with_retry_after(running: Running) -> None:
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        for _ in range(5):
            await ask_token(running, user, link, sd.email)
        n = len(running.mailbox.messages)
        page = await user.post(f"{link}/token", allow_redirects=False)
        assert page.status == 429
        retry = int(page.headers["Retry-After"])
        assert 3000 < retry <= 3601
        assert "Too many tokens" in page.message and "minute" in page.message
        assert f'href="{link}"' in page.text
        await asyncio.sleep(0.2)
        assert len(running.mailbox.messages) == n  # nothing was sent
    assert ("token.limited", "denied") in await _audit_actions(running, rid)
    assert 'domum_tokens_sent_total{channel="email",outcome="limited"} 1.0' in await _metrics(running)


async def test_per_client_address_limit_on_link_endpoints(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    limit = running.gateway.login.ip_limiter.limit
    async with client_for(running) as user:
        for _ in range(limit):
            assert (await user.get("/a/" + "Z" * 22)).status == 403
        page = await user.get(link)
        assert page.status == 429 and int(page.headers["Retry-After"]) >= 1
        assert "Too many attempts from your address" in page.message
        assert (await user.post(f"{link}/verify", {"token": "12345678"})).status == 429
    async with client_for(running, local_addr="127.0.0.2") as elsewhere:
        assert (await elsewhere.get(link)).status == 200
    assert 'domum_denied_total{reason="rate_limited"}' in await _metrics(running)


async def test_forms_without_a_valid_csrf_token_are_refused(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    n = len(running.mailbox.messages)
    async with client_for(running) as user:
        page = await user.get(link)
        good = page.csrf
        assert good
        missing = await user.post(f"{link}/token", csrf=None)
        assert missing.status == 403 and "did not come from this site" in missing.message
        forged = await user.post(f"{link}/token", csrf=good[:-4] + "AAAA")
        assert forged.status == 403
        cross = await user.post(f"{link}/token", csrf=good, headers={"Sec-Fetch-Site": "cross-site"})
        assert cross.status == 403
        foreign = await user.post(f"{link}/token", csrf=good, headers={"Origin": "https://evil.example"})
        assert foreign.status == 403
        _rid2, link2 = await create_forwarded(running, sd)
        other_link = await user.post(f"{link2}/token", csrf=good)  # bound to one link
        assert other_link.status == 403
    async with client_for(running) as attacker:
        # Same token, another browser (no pre-login cookie): login CSRF is refused.
        stolen = await attacker.post(f"{link}/token", csrf=good)
        assert stolen.status == 403
    await asyncio.sleep(0.2)
    assert len(running.mailbox.messages) == n + 1  # only link2's forward: no token sent
    async with client_for(running) as user:
        await user.get(link)
        ok = await user.post(f"{link}/token", headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"})
        assert ok.status == 200


async def test_logout_needs_the_session_bound_csrf_token(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        portal = await sign_in(running, user, link, sd.email)
        page = await user.post("/logout", csrf=None)
        assert page.status == 403
        page = await user.post("/logout", csrf=portal.csrf, headers={"Sec-Fetch-Site": "cross-site"})
        assert page.status == 403
        assert (await user.get("/portal")).status == 200  # still signed in
        page = await user.post("/logout", csrf=portal.csrf)
        assert page.url.endswith("/signed-out")
        assert (await user.get("/portal")).status == 401


async def test_delivery_failure_is_a_page_and_the_send_is_not_counted(running: Running) -> None:
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        await user.get(link)
        running.mailbox.refuse = True
        page = await user.post(f"{link}/token", allow_redirects=False)
        assert page.status == 502 and page.title == "Could not send your token"
        assert "try again" in page.message
        running.mailbox.refuse = False
        for _ in range(5):  # the failed send did not use up one of the five
            await ask_token(running, user, link, sd.email)
    assert ("token.send_failed", "error") in await _audit_actions(running, rid)


async def test_store_failure_fails_closed_with_a_page(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        await running.gateway.store.close()
        page = await user.get(link)
        assert page.status == 503 and page.title == "Temporarily unavailable"
        assert "Retry-After" in page.headers
        await running.gateway.store.open()


async def test_revoke_signs_the_user_out(running: Running) -> None:
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        await sign_in(running, user, link, sd.email)
        async with running.admin() as s:
            st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
            assert st == 200
        # The contract: every session of the grant ends within one second of the revoke.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while (page := await user.get("/portal")).status == 200 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert page.status == 401
        page = await user.get(link)
        assert page.status == 403 and page.message == GENERIC_REFUSAL


async def test_not_yet_open_says_when(running: Running) -> None:
    sd = await seed(running)
    start = (datetime.now(UTC) + timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
    _rid, link = await create_forwarded(
        running, sd, start=start.isoformat(), duration={"value": 1, "unit": "hours"}
    )
    async with client_for(running) as user:
        page = await user.get(link)
        assert page.status == 403 and page.title == "Not open yet"
        assert f"opens at {start:%Y-%m-%d %H:%M} UTC" in page.message
        page = await user.post(f"{link}/verify", {"token": "12345678"}, csrf=None)
        assert page.status == 403


async def test_portal_explains_how_to_use_each_kind_of_target(running: Running) -> None:
    async with running.admin() as s:
        ids = []
        for body in (
            {"name": "db01", "protocol": "ssh", "host": "db01.internal", "port": 22},
            {"name": "build", "protocol": "ssh", "host": "10.1.2.3", "port": 2200},
            {"name": "desk", "protocol": "rdp", "host": "desk.internal", "port": 3389},
            {"name": "pg", "protocol": "tcp", "host": "pg.internal", "port": 5432},
        ):
            st, t = await call(s, "POST", "/api/v1/targets", body)
            assert st == 201, t
            ids.append(t["id"])
    sd = await seed(running)
    async with running.admin() as s:
        st, g = await call(s, "GET", f"/api/v1/groups/{sd.group_id}")
        policy = g["policy"]
        policy["targets"] = [*policy["targets"], *ids]
        st, g = await call(s, "PATCH", f"/api/v1/groups/{sd.group_id}", {"policy": policy})
        assert st == 200, g
    _rid, link = await create_forwarded(running, sd)
    ssh_port = 2222
    running.gateway.public_ctx.ssh_port = ssh_port
    async with client_for(running) as user:
        portal = await sign_in(running, user, link, sd.email)
        text = portal.text.replace("&lt;", "<").replace("&gt;", ">")
        assert 'href="/t/wiki/"' in text
        assert 'href="/ssh/db01"' in text and 'href="/ssh/build"' in text
        assert f"ssh -J alice@example.com@localhost:{ssh_port} user@db01.internal" in text
        assert f"ssh -J alice@example.com@localhost:{ssh_port} -p 2200 user@10.1.2.3" in text
        base = running.gateway.settings.public.base_url
        assert (
            f"domum-gateway connect {base}/a/<your personal link> --target desk --listen 127.0.0.1:13389"
            in text
        )
        assert "--target pg --listen 127.0.0.1:15432" in text
        assert _code(link) not in text


async def test_links_and_tokens_never_reach_logs_or_metrics(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        token = await ask_token(running, user, link, sd.email)
        await user.post(f"{link}/verify", {"token": "00000000" if token != "00000000" else "11111111"})
        running.mailbox.refuse = True
        await user.post(f"{link}/token")
        running.mailbox.refuse = False
        await user.get(f"{link}/nope")
        page = await user.post(f"{link}/verify", {"token": token}, csrf=None)
        assert page.status == 403
        token2 = await ask_token(running, user, link, sd.email)
        await user.post(f"{link}/verify", {"token": token2})
        await user.post("/logout")
    # Every logger but the test's own SMTP server (aiosmtpd logs what it receives).
    logged = "\n".join(r.getMessage() + str(r.args) for r in caplog.records if not r.name.startswith("mail"))
    for secret in (_code(link), token, token2):
        assert secret not in logged
        assert secret not in await _metrics(running)


async def test_pages_fit_a_phone(running: Running) -> None:
    async with PublicClient(running.public_url, running.ssl) as user:
        page = await user.get("/")
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page.text
        css = await user.get("/static/public/site.css")
        assert "@media (max-width: 520px)" in css.text
