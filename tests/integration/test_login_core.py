"""The shared login core (link -> token -> session) against a real SMTP server."""

from __future__ import annotations

import asyncio

import pytest

from domum_gateway.auth.origin import normalise_address
from domum_gateway.proxy.login import LoginRefused

from ..conftest import Running
from .helpers import call, create_forwarded, login_direct, seed

pytestmark = pytest.mark.asyncio


async def test_login_then_revoke_cuts_session(running: Running) -> None:
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    cookie = await login_direct(running, sd, link)
    live = await running.gateway.sessions.lookup(cookie)
    assert live is not None
    cut: list[str] = []
    running.gateway.sessions.attach(live, cut.append)
    assert running.gateway.sessions.check(live, normalise_address("127.0.0.1")).allowed
    async with running.admin() as s:
        st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
        assert st == 200
    for _ in range(50):
        if cut:
            break
        await asyncio.sleep(0.02)
    assert cut == ["access revoked"]
    assert await running.gateway.sessions.lookup(cookie) is None


async def test_two_concurrent_correct_redemptions_give_one_session(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    login = running.gateway.login
    info = await login.resolve_link(link)
    peer = normalise_address("127.0.0.1")
    await login.send_token(info, peer, "127.0.0.1")
    await running.mailbox.wait_count(2)
    token = running.mailbox.last_token(sd.email)
    results = await asyncio.gather(
        login.verify(info, token, peer, "t1"), login.verify(info, token, peer, "t2"), return_exceptions=True
    )
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, LoginRefused)]
    assert len(ok) == 1 and len(refused) == 1


async def test_fifty_concurrent_wrong_guesses_kill_the_token(running: Running) -> None:
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    login = running.gateway.login
    info = await login.resolve_link(link)
    peer = normalise_address("127.0.0.1")
    await login.send_token(info, peer, "127.0.0.1")
    await running.mailbox.wait_count(2)
    token = running.mailbox.last_token(sd.email)
    wrong = f"{(int(token) + 1) % 10**8:08d}"
    results = await asyncio.gather(
        *(login.verify(info, wrong, peer, "x") for _ in range(50)), return_exceptions=True
    )
    reasons = [r.reason for r in results if isinstance(r, LoginRefused)]
    assert len(reasons) == 50
    assert reasons.count("wrong_token") == 5
    with pytest.raises(LoginRefused) as exc:
        await login.verify(info, token, peer, "x")
    assert exc.value.reason == "token_exhausted"
