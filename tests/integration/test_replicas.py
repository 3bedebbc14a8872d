"""Two gateway replicas (in-process) on one real PostgreSQL database.

What one replica changes, the other hears over LISTEN/NOTIFY and enforces within 2 s; a
replica that loses its notification connection fails closed, re-reads everything when
it is back, and reports itself not ready meanwhile. Credentials minted on one replica
work on the other (a load balancer without stickiness may send any request anywhere):
tunnel tickets, host-mode hand-over codes (redeemed once across both) and host cookies,
and admin console sessions with their CSRF token and notices. Every replica lists the live
connections of all of them and cuts one wherever it is held (issue 7).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
from domum_gateway.store.base import ConnectionRecord
from domum_gateway.store.postgres import PostgresStore

from ..conftest import Running, _token, make_settings
from ..peers.postgres import PostgresServer
from ..peers.smtp import Mailbox
from ..peers.tcp import EchoServer
from ..peers.upstreams import ProxyEnv, grant_targets, raw_exchange, start_upstream, status_of
from .helpers import call, create_forwarded, login_direct, seed
from .test_tunnel import (
    cli_login,
    echo_roundtrip,
    handshake_status,
    own_origin,
    service_of,
    tcp_seed,
    ws_open,
)

PEER = normalise_address("127.0.0.1")
DOMAIN = "gw.test"


@pytest.fixture
async def replicas(
    tmp_path: Path, mailbox: tuple[Mailbox, int], pg_url: str, pg_server: PostgresServer
) -> AsyncIterator[tuple[Running, Running]]:
    box, port = mailbox
    gateways: list[Gateway] = []
    try:
        for name in ("a", "b"):
            settings = make_settings(
                tmp_path / name,
                smtp_port=port,
                storage={"url": pg_url},
                # Host mode on, so hand-over codes and host cookies can be tried across them.
                public={"domain": DOMAIN, "base_url": f"https://{DOMAIN}:8443"},
            )
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


# credentials minted on one replica, used on the other (issue 9) ---------------------------


async def _until_async(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise AssertionError(f"{what} did not happen within {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def _cli(run: Running, path: str, ticket: str) -> tuple[int, object]:
    async with aiohttp.ClientSession(
        base_url=own_origin(run), connector=aiohttp.TCPConnector(ssl=run.ssl)
    ) as s:
        return await call(s, "POST", path, {}, headers={"Authorization": f"Bearer {ticket}"})


async def test_tunnel_ticket_from_a_works_on_b_and_logout_on_b_kills_it_on_a(
    replicas: tuple[Running, Running],
) -> None:
    a, b = replicas
    async with EchoServer() as echo:
        sd = await tcp_seed(a, echo.port)
        _rid, link = await create_forwarded(a, sd)
        granted = await cli_login(a, sd, link)
        bearer = {"Authorization": f"Bearer {granted['ticket']}"}
        assert b.gateway.sessions.get(str(granted["session_id"])) is None, "B never saw this session"
        async with ws_open(b, "echo", bearer) as ws:
            await echo_roundtrip(ws)
        # A renewal on B gives a ticket that A accepts.
        st, renewed = await _cli(b, "/cli/v1/renew", granted["ticket"])
        assert st == 200 and isinstance(renewed, dict), renewed
        async with ws_open(a, "echo", {"Authorization": f"Bearer {renewed['ticket']}"}) as ws:
            await echo_roundtrip(ws)

        # A holds the ticket in its cache and a tunnel open on it; signing out on B ends both.
        async with ws_open(a, "echo", bearer) as ws:
            await echo_roundtrip(ws)
            st, _ = await _cli(b, "/cli/v1/logout", granted["ticket"])
            assert st == 204
            started = time.monotonic()

            async def refused_on_a() -> bool:
                try:  # until A hears of the logout the upgrade still succeeds: not refused yet
                    async with ws_open(a, "echo", bearer):
                        return False
                except aiohttp.WSServerHandshakeError as exc:
                    return exc.status == 401

            took = await _until_async(refused_on_a, 2.0, "refusing the ticket on replica A")
            async with asyncio.timeout(2.0 - (time.monotonic() - started) + 0.5):
                while (msg := await ws.receive()).type is aiohttp.WSMsgType.BINARY:
                    pass
            assert ws.close_code == 1008, (ws.close_code, msg)
        print(f"\nlogout on B made the ticket worthless on A after {took * 1000:.0f} ms")
        for run in (a, b):
            for ticket in (granted["ticket"], renewed["ticket"]):
                assert await handshake_status(run, "echo", {"Authorization": f"Bearer {ticket}"}) == 401


def _host_req(path: str, host: str, cookie: str | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if cookie is not None:
        lines.append(f"Cookie: __Host-domum={cookie}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _header(response: bytes, name: str) -> str:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    m = re.search(rf"^{name}:\s*(.*?)\r?$", head, re.I | re.M)
    assert m, head
    return m.group(1)


async def _code(env: ProxyEnv) -> str:
    """A hand-over code from the main host (the replica ``env`` points at): the query."""
    out = await raw_exchange(env, _host_req("/t/wiki/page?x=1", f"{DOMAIN}:8443", env.cookie))
    assert status_of(out) == 303, out[:300]
    location = urlsplit(_header(out, "Location"))
    assert (location.netloc, location.path) == (f"wiki.{DOMAIN}:8443", "/__domum/enter")
    return location.query


async def test_host_mode_code_from_a_is_redeemed_on_b_once_and_its_cookie_works_on_both(
    replicas: tuple[Running, Running],
) -> None:
    a, b = replicas
    host = f"wiki.{DOMAIN}:8443"
    async with start_upstream() as wiki:
        env_a = await grant_targets(a, {"wiki": wiki.url + "/app"})
        env_b = dataclasses.replace(env_a, public_url=b.public_url, ssl=b.ssl)
        query = await _code(env_a)
        out = await raw_exchange(env_b, _host_req(f"/__domum/enter?{query}", host))
        assert status_of(out) == 303, out[:300]
        assert _header(out, "Location") == "/page?x=1"
        cookie = _header(out, "Set-Cookie").split(";")[0].split("=", 1)[1]
        # Spent: neither replica takes it again.
        for env in (env_a, env_b):
            assert status_of(await raw_exchange(env, _host_req(f"/__domum/enter?{query}", host))) == 401
        # The host cookie minted on B opens the target on A (loaded from the store) and on B.
        for env in (env_a, env_b):
            out = await raw_exchange(env, _host_req("/page?x=1", host, cookie))
            assert status_of(out) == 200, out[:300]
        # Its own host only, on either replica.
        for env in (env_a, env_b):
            out = await raw_exchange(env, _host_req("/", f"other.{DOMAIN}:8443", cookie))
            assert status_of(out) in (401, 404)

        # Codes raced at both replicas at once: exactly one redemption wins each time.
        for _ in range(5):
            query = await _code(env_b)
            outs = await asyncio.gather(
                *(raw_exchange(env, _host_req(f"/__domum/enter?{query}", host)) for env in (env_a, env_b) * 3)
            )
            assert sorted(status_of(o) for o in outs) == [303, 401, 401, 401, 401, 401]
        # Nothing secret is stored in the clear.
        stored = await a.database_bytes()
        assert cookie.encode() not in stored and query.split("&")[0].split("=", 1)[1].encode() not in stored

        # Revoke on B: the host cookie A has cached stops working on A within 2 s.
        async with b.admin() as s:
            st, body = await call(s, "POST", f"/api/v1/access-requests/{env_a.request_id}/revoke")
            assert st == 200, body

        async def refused_on_a() -> bool:
            return status_of(await raw_exchange(env_a, _host_req("/page", host, cookie))) == 401

        took = await _until_async(refused_on_a, 2.0, "refusing the host cookie on replica A")
        print(f"\nrevoke on B made the host cookie worthless on A after {took * 1000:.0f} ms")
        assert status_of(await raw_exchange(env_b, _host_req("/page", host, cookie))) == 401


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def test_console_session_signed_in_on_a_serves_b_with_the_same_cookie_and_csrf(
    replicas: tuple[Running, Running],
) -> None:
    a, b = replicas

    def client(run: Running, cookie: str | None = None) -> aiohttp.ClientSession:
        headers = {"Cookie": f"__Host-domum-admin={cookie}"} if cookie else {}
        return aiohttp.ClientSession(
            base_url=run.admin_url, headers=headers, connector=aiohttp.TCPConnector(ssl=run.ssl)
        )

    async with client(a) as s:
        async with s.get("/admin/login") as r:
            form = _CSRF.search(await r.text())
            assert form, "sign-in form"
            pre = r.cookies["__Host-domum-admin-login"].value
        async with s.post(
            "/admin/login",
            data={"csrf": form.group(1), "token": a.admin_token, "next": "/admin/reasons"},
            headers={"Cookie": f"__Host-domum-admin-login={pre}"},
            allow_redirects=False,
        ) as r:
            assert r.status == 303, await r.text()
            cookie = r.cookies["__Host-domum-admin"].value
    async with client(a, cookie) as on_a, client(b, cookie) as on_b:
        async with on_a.get("/admin/reasons", allow_redirects=False) as r:
            assert r.status == 200
            m = _CSRF.search(await r.text())
            assert m
            csrf = m.group(1)
        # B serves the next page, with the same CSRF token, and accepts a form A rendered.
        async with on_b.get("/admin/reasons", allow_redirects=False) as r:
            assert r.status == 200
            m = _CSRF.search(await r.text())
            assert m and m.group(1) == csrf
        async with on_b.post(
            "/admin/reasons/new", data={"csrf": csrf, "label": "Cross-replica"}, allow_redirects=False
        ) as r:
            assert r.status == 303, await r.text()
        # The notice B set is shown by A, once.
        async with on_a.get("/admin/reasons", allow_redirects=False) as r:
            text = await r.text()
            assert r.status == 200 and "Reason Cross-replica created." in text, text
        async with on_b.get("/admin/reasons", allow_redirects=False) as r:
            assert "Reason Cross-replica created." not in await r.text()
        # Signing out on B ends the session on A.
        async with on_b.post("/admin/logout", data={"csrf": csrf}, allow_redirects=False) as r:
            assert r.status == 303 and "signed_out" in r.headers["Location"]
        async with on_a.get("/admin/reasons", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"].startswith("/admin/login")


# one registry of live connections (issue 7) -----------------------------------------------


async def _sessions_page(run: Running) -> list[dict[str, Any]]:
    async with run.admin(run.auditor_token) as s:
        st, page = await call(s, "GET", "/api/v1/sessions")
    assert st == 200, page
    return list(page["items"])


async def _listed(run: Running, connection_id: str) -> dict[str, Any] | None:
    for item in await _sessions_page(run):
        for conn in item["connections"]:
            if conn["id"] == connection_id:
                return dict(conn)
    return None


async def test_a_tunnel_on_a_is_listed_with_its_bytes_on_b_and_cut_from_b(
    replicas: tuple[Running, Running],
) -> None:
    a, b = replicas
    flush = 0.2
    for run in (a, b):
        run.gateway.sessions.flush_interval = flush
        run.gateway.sessions.flush_soon()
    tunnels = service_of(a)
    tunnels.tick_interval = 0.05  # the tunnel hands its byte counts to the registry each tick
    tunnels._arm_tick()
    async with EchoServer() as echo:
        sd = await tcp_seed(a, echo.port)
        _rid, link = await create_forwarded(a, sd)
        bearer = {"Authorization": f"Bearer {(await cli_login(a, sd, link))['ticket']}"}
        async with ws_open(a, "echo", bearer) as ws:
            await echo_roundtrip(ws, b"x" * 1000)
            (conn,) = a.gateway.sessions.connections()
            assert b.gateway.sessions.connections() == []
            found: dict[str, Any] = {}

            async def listed_on_b() -> bool:
                got = await _listed(b, conn.id)
                if got is None or (got["bytes_in"], got["bytes_out"]) != (1000, 1000):
                    return False
                found.update(got)
                return True

            took = await _until_async(listed_on_b, 2 * flush + 0.5, "listing A's tunnel on B")
            print(f"\nA's tunnel and its bytes listed on B after {took * 1000:.0f} ms")
            assert found["replica"] == a.gateway.sessions.replica != b.gateway.sessions.replica
            assert (found["protocol"], found["target"]) == ("tcp", "echo")
            assert found["session_id"] == conn.session.id
            (item,) = [i for i in await _sessions_page(b) if i["id"] == conn.session.id]
            assert (item["bytes_in"], item["bytes_out"]) == (1000, 1000)

            # A quiet tunnel stays listed: its holder refreshes the row without traffic.
            row = await b.gateway.store.get_connection(conn.id)
            assert row is not None
            a.gateway.sessions.heartbeat = 0.3

            async def refreshed() -> bool:
                again = await b.gateway.store.get_connection(conn.id)
                return again is not None and again.updated_at > row.updated_at

            await _until_async(refreshed, 2.0, "A's heartbeat refreshing its quiet tunnel")

            # B cuts it; A holds it and closes it with 1008, before B answers.
            async with b.admin(b.auditor_token) as s:
                st, _ = await call(s, "DELETE", f"/api/v1/sessions/{conn.id}")
            answered = time.monotonic()
            assert st == 204
            async with asyncio.timeout(1.0):
                while (msg := await ws.receive()).type is aiohttp.WSMsgType.BINARY:
                    pass
            assert ws.close_code == 1008, (ws.close_code, msg)
            assert msg.extra == "terminated by an administrator", msg
            print(f"closed {(time.monotonic() - answered) * 1000:.0f} ms after B's answer")
        assert await b.gateway.store.get_connection(conn.id) is None
        for run in (a, b):
            assert await _listed(run, conn.id) is None
        # The session lives on (only the connection was cut), and the cut is audited once.
        assert a.gateway.sessions.get(conn.session.id) is not None
        async with b.admin(b.auditor_token) as s:
            st, _ = await call(s, "DELETE", f"/api/v1/sessions/{conn.id}")
            assert st == 404
            st, events = await call(s, "GET", "/api/v1/audit?type=connection.terminated")
        (event,) = events["items"]
        assert event["subject"] == conn.id
        assert event["details"]["replica"] == a.gateway.sessions.replica


async def test_a_dead_replicas_connections_are_not_listed_and_are_swept(
    replicas: tuple[Running, Running],
) -> None:
    """A replica that died leaves rows nobody refreshes: hidden after the staleness bound
    (90 s), deleted by the next sweep. A row whose holder does not answer a cut gets 202."""
    a, b = replicas
    sd = await seed(a)
    rid, link = await create_forwarded(a, sd)
    cookie = await login_direct(a, sd, link)
    live = await a.gateway.sessions.lookup(cookie)
    assert live is not None
    now = SystemClock().now()
    dead = ConnectionRecord(
        id="con_0000000000000dead",
        session_id=live.id,
        request_id=rid,
        user_id=live.user_id,
        protocol="tcp",
        target="echo",
        origin="127.0.0.1",
        since=now - timedelta(minutes=10),
        bytes_in=123,
        bytes_out=456,
        replica="crashed",
        updated_at=now - timedelta(seconds=120),  # its heartbeat stopped two minutes ago
    )
    quiet = dataclasses.replace(
        dead, id="con_000000000000quiet", replica="unreachable", updated_at=now - timedelta(seconds=45)
    )
    await b.gateway.store.upsert_connections([dead, quiet])
    for run in (a, b):
        (item,) = await _sessions_page(run)
        assert [c["id"] for c in item["connections"]] == [quiet.id]
        assert (item["bytes_in"], item["bytes_out"]) == (123, 456)
    async with b.admin(b.auditor_token) as s:
        st, _ = await call(s, "DELETE", f"/api/v1/sessions/{dead.id}")
        assert st == 404
        # Fresh, but no replica holds it to confirm the cut: accepted, not confirmed.
        started = time.monotonic()
        st, _ = await call(s, "DELETE", f"/api/v1/sessions/{quiet.id}")
        assert st == 202
        assert 1.5 < time.monotonic() - started < 4.0
    scheduler = b.gateway.scheduler
    scheduler.sweep_every = 0.0
    await scheduler.tick()
    assert await a.gateway.store.get_connection(dead.id) is None
    assert await a.gateway.store.get_connection(quiet.id) is not None
