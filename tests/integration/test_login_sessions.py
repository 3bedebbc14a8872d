"""Sessions after login: token and window expiry, idle timeout, session limit, address change.

These tests move time with a FakeClock handed to the Gateway (store, sessions, login and
pages all read it), so a 15-minute idle timeout takes no wall time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from domum_gateway.clock import FakeClock
from domum_gateway.proxy.context import COOKIE

from ..conftest import Running
from ..peers.public_client import ask_token, client_for, gateway_with, sign_in
from ..peers.smtp import Mailbox
from .helpers import call, create_forwarded, seed

pytestmark = pytest.mark.asyncio


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime.now(UTC))


@pytest.fixture
async def clocked(tmp_path: Path, mailbox: tuple[Mailbox, int], clock: FakeClock) -> AsyncIterator[Running]:
    async with gateway_with(tmp_path, mailbox, clock=clock) as run:
        yield run


async def _ended(run: Running, request_id: str) -> list[tuple[str, str | None]]:
    for _ in range(50):  # the end is recorded in the background, right after the cut
        sessions = await run.gateway.store.list_sessions(request_id, live=False)
        ended = [(s.id, s.end_reason) for s in sessions if s.ended_at is not None]
        if ended:
            return ended
        await asyncio.sleep(0.02)
    return []


async def _audit_types(run: Running, request_id: str) -> list[tuple[str, str, str]]:
    async with run.admin() as s:
        st, body = await call(s, "GET", f"/api/v1/audit?request_id={request_id}&limit=500")
        assert st == 200
    return [(e["type"], e["outcome"], str(e["details"].get("reason", ""))) for e in body["items"]]


async def test_token_expires_after_five_minutes(clocked: Running, clock: FakeClock) -> None:
    sd = await seed(clocked)
    _rid, link = await create_forwarded(clocked, sd)
    async with client_for(clocked) as user:
        token = await ask_token(clocked, user, link, sd.email)
        csrf = user.last.csrf if user.last else None
        clock.advance(minutes=5)
        page = await user.post(f"{link}/verify", {"token": token}, csrf=csrf)
        assert page.status == 403 and page.title == "Token expired"
        assert page.message == "This token has expired. Ask for a new one."
        assert f'href="{link}/token"' in page.text


async def test_token_still_works_just_before_five_minutes(clocked: Running, clock: FakeClock) -> None:
    sd = await seed(clocked)
    _rid, link = await create_forwarded(clocked, sd)
    async with client_for(clocked) as user:
        token = await ask_token(clocked, user, link, sd.email)
        csrf = user.last.csrf if user.last else None
        clock.advance(minutes=4, seconds=59)
        page = await user.post(f"{link}/verify", {"token": token}, csrf=csrf)
        assert page.url.endswith("/portal")


async def test_idle_timeout_ends_the_session(clocked: Running, clock: FakeClock) -> None:
    sd = await seed(clocked)
    rid, link = await create_forwarded(clocked, sd)
    async with client_for(clocked) as user:
        await sign_in(clocked, user, link, sd.email)
        clock.advance(minutes=14)
        assert (await user.get("/portal")).status == 200  # activity resets the idle clock
        clock.advance(minutes=14, seconds=59)
        assert (await user.get("/portal")).status == 200
        clock.advance(minutes=15)
        page = await user.get("/portal")
        assert page.status == 403 and page.title == "Signed out"
        assert "after 15 minutes without activity" in page.message
        assert not user.cookie(COOKIE)
    assert (await _ended(clocked, rid))[0][1] == "session_idle"
    assert ("session.ended", "denied", "session_idle") in await _audit_types(clocked, rid)


async def test_idle_timeout_comes_from_the_group_policy(tmp_path: Path, mailbox: tuple[Mailbox, int]) -> None:
    clock = FakeClock(datetime.now(UTC))
    async with gateway_with(tmp_path, mailbox, clock=clock) as run:
        sd = await seed(run, policy={"idle_timeout": {"value": 2, "unit": "minutes"}})
        _rid, link = await create_forwarded(run, sd)
        async with client_for(run) as user:
            portal = await sign_in(run, user, link, sd.email)
            assert "signed out after 2 min without activity" in portal.text
            clock.advance(minutes=2)
            page = await user.get("/portal")
            assert page.status == 403 and "after 2 minutes" in page.message


async def test_window_end_ends_the_session_and_the_link(clocked: Running, clock: FakeClock) -> None:
    sd = await seed(clocked)
    _rid, link = await create_forwarded(clocked, sd)  # opened 5 minutes ago, for 2 hours
    async with client_for(clocked) as user:
        await sign_in(clocked, user, link, sd.email)
        for _ in range(11):  # stay active so the idle timeout does not come first
            clock.advance(minutes=10)
            assert (await user.get("/portal")).status == 200
        clock.advance(minutes=6)  # past the end: 115 minutes after sign-in, 120 after the start
        page = await user.get("/portal")
        assert page.status == 403 and "ended at" in page.message
        page = await user.get(link)
        assert page.status == 403 and page.title == "Access has ended"
        assert "Ask your administrator for a new one" in page.message


async def test_session_limit_from_the_policy(tmp_path: Path, mailbox: tuple[Mailbox, int]) -> None:
    async with gateway_with(tmp_path, mailbox) as run:
        sd = await seed(run, policy={"max_sessions": 1})
        rid, link = await create_forwarded(run, sd)
        async with client_for(run) as first, client_for(run) as second:
            portal = await sign_in(run, first, link, sd.email)
            token = await ask_token(run, second, link, sd.email)
            csrf = second.last.csrf if second.last else None
            page = await second.post(f"{link}/verify", {"token": token}, csrf=csrf)
            assert page.status == 429
            assert "most sessions this access allows (1)" in page.message
            # The refused attempt did not spend the token: after the first signs out it works.
            await first.post("/logout", csrf=portal.csrf)
            page = await second.post(f"{link}/verify", {"token": token}, csrf=csrf)
            assert page.url.endswith("/portal")
        assert ("login.refused", "too_many_sessions", "") in await _audit_types(run, rid)


async def test_an_abandoned_idle_session_does_not_hold_the_limit(
    tmp_path: Path, mailbox: tuple[Mailbox, int]
) -> None:
    clock = FakeClock(datetime.now(UTC))
    async with gateway_with(tmp_path, mailbox, clock=clock) as run:
        sd = await seed(run, policy={"max_sessions": 1})
        rid, link = await create_forwarded(run, sd)
        async with client_for(run) as first, client_for(run) as second:
            await sign_in(run, first, link, sd.email)  # then the tab is closed: never used again
            clock.advance(minutes=16)
            await sign_in(run, second, link, sd.email)
            assert (await first.get("/portal")).status in (401, 403)
        reasons = [reason for _sid, reason in await _ended(run, rid)]
        assert reasons == ["session_idle"]


async def test_address_change_ends_the_session_and_is_audited(running: Running) -> None:
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    async with client_for(running) as home, client_for(running, local_addr="127.0.0.2") as cafe:
        await sign_in(running, home, link, sd.email)
        cookie = home.cookie(COOKIE)
        assert cookie
        cafe.set_cookie(COOKIE, cookie)  # the same cookie, carried to another network
        page = await cafe.get("/portal")
        assert page.status == 403 and "network address changed" in page.message
        # The session is over for the original address too.
        assert (await home.get("/portal")).status == 401
    assert (await _ended(running, rid))[0][1] == "address_changed"
    assert ("session.ended", "denied", "address_changed") in await _audit_types(running, rid)


async def test_session_lookup_is_served_from_memory(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        await sign_in(running, user, link, sd.email)
        cookie = user.cookie(COOKIE)
        assert cookie
        store = running.gateway.store
        calls: list[str] = []
        original = store.find_session

        async def counting(session_hash: str):  # type: ignore[no-untyped-def]
            calls.append(session_hash)
            return await original(session_hash)

        store.find_session = counting  # type: ignore[method-assign]
        try:
            for _ in range(5):
                assert await running.gateway.sessions.lookup(cookie) is not None
        finally:
            store.find_session = original  # type: ignore[method-assign]
        assert calls == []
