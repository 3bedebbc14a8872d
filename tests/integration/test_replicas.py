"""Two gateway replicas (in-process) on one real PostgreSQL database.

What one replica changes, the other hears over LISTEN/NOTIFY and enforces within 2 s; a
replica that loses its notification connection fails closed, re-reads everything when
it is back, and reports itself not ready meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from domum_gateway.app import Gateway
from domum_gateway.audit import AuditEntry, verify_chain
from domum_gateway.auth.origin import normalise_address
from domum_gateway.clock import SystemClock
from domum_gateway.model import Role
from domum_gateway.pki import client_ssl_context
from domum_gateway.proxy.login import LoginRefused
from domum_gateway.store.postgres import PostgresStore

from ..conftest import Running, _token, make_settings
from ..peers.postgres import PostgresServer
from ..peers.smtp import Mailbox
from .helpers import call, create_forwarded, login_direct, seed

PEER = normalise_address("127.0.0.1")


@pytest.fixture
async def replicas(
    tmp_path: Path, mailbox: tuple[Mailbox, int], pg_url: str, pg_server: PostgresServer
) -> AsyncIterator[tuple[Running, Running]]:
    box, port = mailbox
    gateways: list[Gateway] = []
    try:
        for name in ("a", "b"):
            settings = make_settings(tmp_path / name, smtp_port=port, storage={"url": pg_url})
            gw = Gateway(settings, grace=1.0)
            await gw.start()
            gateways.append(gw)
        a, b = gateways
        # One database: a token made on one replica works on both.
        admin = await _token(a, "admin", Role.ADMIN)
        auditor = await _token(a, "auditor", Role.AUDITOR)
        yield tuple(  # type: ignore[misc]
            Running(
                gw,
                gw.url("admin"),
                gw.url("public"),
                admin,
                auditor,
                client_ssl_context(gw.settings.tls.ca),
                box,
                pg=pg_server,
            )
            for gw in gateways
        )
    finally:
        for gw in gateways:
            await gw.stop()


async def _until(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Seconds until ``predicate`` holds; fails after ``within`` seconds."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"{what} did not happen within {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _ready(run: Running) -> int:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=run.ssl)) as s,
        s.get(run.admin_url + "/readyz") as r,
    ):
        return r.status


async def _until_ready(run: Running, status: int, within: float) -> None:
    started = time.monotonic()
    while (got := await _ready(run)) != status:
        if time.monotonic() - started > within:
            raise AssertionError(f"/readyz stayed {got}, expected {status} within {within} s")
        await asyncio.sleep(0.1)


def _pg(run: Running) -> PostgresStore:
    store = run.gateway.store
    assert isinstance(store, PostgresStore)
    return store


async def test_revoke_and_terminate_on_one_replica_cut_sessions_cached_on_the_other(
    replicas: tuple[Running, Running],
) -> None:
    a, b = replicas
    sd = await seed(a)
    rid, link = await create_forwarded(a, sd)
    cookie = await login_direct(a, sd, link)
    live = await a.gateway.sessions.lookup(cookie)
    assert live is not None and a.gateway.sessions.check(live, PEER).allowed
    cut: list[str] = []
    a.gateway.sessions.attach(live, cut.append)

    async with b.admin() as s:
        st, body = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
        assert st == 200, body
    took = await _until(lambda: bool(cut), 2.0, "cutting the session on replica A")
    assert cut == ["access revoked"], cut
    assert await a.gateway.sessions.lookup(cookie) is None
    print(f"\nrevocation reached the other replica in {took * 1000:.0f} ms")

    # An administrator ending one session on B ends it on A too.
    rid2, link2 = await create_forwarded(a, sd)
    cookie2 = await login_direct(a, sd, link2)
    live2 = await a.gateway.sessions.lookup(cookie2)
    assert live2 is not None
    cut2: list[str] = []
    a.gateway.sessions.attach(live2, cut2.append)
    async with b.admin() as s:
        st, _ = await call(s, "DELETE", f"/api/v1/sessions/{live2.id}")
        assert st in (200, 204)
    await _until(lambda: bool(cut2), 2.0, "ending the terminated session on replica A")
    assert await a.gateway.sessions.lookup(cookie2) is None
    # Replica B's own publications are not echoed back to it.
    assert rid2 != rid


async def test_wrong_tokens_spread_over_replicas_kill_the_token_at_the_fifth(
    replicas: tuple[Running, Running],
) -> None:
    """Tries are counted in the database, so guessing through both replicas gains nothing."""
    a, b = replicas
    sd = await seed(a)
    _rid, link = await create_forwarded(a, sd)
    info_a = await a.gateway.login.resolve_link(link)
    info_b = await b.gateway.login.resolve_link(link)
    await a.gateway.login.send_token(info_a, PEER, "127.0.0.1")
    await a.mailbox.wait_count(2)
    token = a.mailbox.last_token(sd.email)
    wrong = f"{(int(token) + 1) % 10**8:08d}"
    reasons: list[str] = []
    for i in range(10):
        gw, info = (a, info_a) if i % 2 == 0 else (b, info_b)
        with pytest.raises(LoginRefused) as exc:
            await gw.gateway.login.verify(info, wrong, PEER, "127.0.0.1")
        reasons.append(exc.value.reason)
    assert reasons == ["wrong_token"] * 5 + ["token_exhausted"] * 5
    with pytest.raises(LoginRefused) as exc:
        await b.gateway.login.verify(info_b, token, PEER, "127.0.0.1")
    assert exc.value.reason == "token_exhausted"


async def test_lost_listener_fails_closed_then_rereads_state(replicas: tuple[Running, Running]) -> None:
    """A change A never heard (written behind the bus's back) is caught when A's
    notification connection drops: A re-checks every cached session against the database."""
    a, b = replicas
    sd = await seed(a)
    rid, link = await create_forwarded(a, sd)
    cookie = await login_direct(a, sd, link)
    live = await a.gateway.sessions.lookup(cookie)
    assert live is not None
    cut: list[str] = []
    a.gateway.sessions.attach(live, cut.append)
    # Revoke in the database only: no notification is sent.
    revoked = await b.gateway.store.revoke_request(
        rid, SystemClock().now(), "test", AuditEntry(actor="test", action="request.revoked", subject=rid)
    )
    assert revoked is not None
    await asyncio.sleep(0.3)
    assert not cut and a.gateway.sessions.check(live, PEER).allowed, "A only knows what it heard"

    store_a = _pg(a)
    conn = await asyncpg.connect(a.gateway.settings.storage.url)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            store_a.listener_name,
        )
    finally:
        await conn.close()
    assert killed == 1
    await _until(lambda: bool(cut), 2.0, "re-checking sessions after the listener was lost")
    assert cut == ["access was revoked"], cut
    await _until(lambda: store_a.listening, 5.0, "reconnecting the listener")
    assert await _ready(a) == 200 and await _ready(b) == 200


async def test_database_down_makes_both_replicas_unready_and_they_recover(
    replicas: tuple[Running, Running], pg_server: PostgresServer
) -> None:
    a, b = replicas
    sd = await seed(a)
    _rid, link = await create_forwarded(a, sd)
    cookie = await login_direct(a, sd, link)
    live = await a.gateway.sessions.lookup(cookie)
    assert live is not None
    cut: list[str] = []
    a.gateway.sessions.attach(live, cut.append)
    assert await _ready(a) == 200 and await _ready(b) == 200

    await asyncio.to_thread(pg_server.stop)
    try:
        assert await _ready(a) == 503 and await _ready(b) == 503
        # Fail closed: A cannot confirm the grant any more, so its session ends.
        await _until(lambda: bool(cut), 3.0, "cutting sessions while the database is down")
        async with a.admin() as s:
            st, _ = await call(s, "GET", "/api/v1/access-requests")
            assert st in (401, 503)  # the token cannot be checked either
    finally:
        await asyncio.to_thread(pg_server.start)
    await _until_ready(a, 200, 10.0)
    await _until_ready(b, 200, 10.0)

    # After recovery notifications flow again: a revoke on B cuts a fresh session on A.
    rid2, link2 = await create_forwarded(a, sd)
    cookie2 = await login_direct(a, sd, link2)
    live2 = await a.gateway.sessions.lookup(cookie2)
    assert live2 is not None
    cut2: list[str] = []
    a.gateway.sessions.attach(live2, cut2.append)
    async with b.admin() as s:
        st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid2}/revoke")
        assert st == 200
    await _until(lambda: bool(cut2), 2.0, "cutting the session after recovery")
    store = a.gateway.store
    assert verify_chain(await store.all_audit(), await store.audit_head()) is None


def test_notification_payloads_round_trip_and_reject_garbage() -> None:
    from domum_gateway.bus import Change, ChangeKind
    from domum_gateway.store.pg_notify import decode_change, encode_change

    change = Change(ChangeKind.REQUEST, "req_1", "access revoked ✓" + "x" * 10_000)
    sender, back = decode_change(encode_change("abc", change)) or ("", None)
    assert sender == "abc" and back is not None
    assert (back.kind, back.id) == (change.kind, change.id) and len(back.reason) == 500
    assert len(encode_change("abc", change).encode()) < 8000
    for junk in ("", "null", "[]", '{"i": "x", "k": "nope", "id": "1"}', '{"k": "group"}'):
        assert decode_change(junk) is None
