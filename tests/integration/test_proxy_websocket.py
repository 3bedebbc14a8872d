"""Websockets through the proxy: frames both ways, close codes, and the session's cut-off.

The gateway does not re-frame websocket traffic: after the target's 101 the bytes pass
through untouched, so subprotocols, extensions and close codes are the endpoints' own.
When the session ends (revoke, logout, terminate) the gateway sends the client a close
frame (1008 and the reason) and drops the target connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from ..conftest import Running
from ..integration.helpers import call
from ..peers.upstreams import ProxyEnv, Upstream, grant_targets, raw_exchange, start_upstream, status_of

pytestmark = pytest.mark.asyncio


@dataclass
class Env:
    run: Running
    up: Upstream
    user: ProxyEnv

    def session(self, cookie: bool = True) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            base_url=self.run.public_url,
            headers=self.user.headers() if cookie else {},
            connector=aiohttp.TCPConnector(ssl=self.run.ssl),
        )


@pytest.fixture
async def env(running: Running) -> AsyncIterator[Env]:
    async with start_upstream() as up:
        user = await grant_targets(running, {"chat": up.url + "/"})
        yield Env(running, up, user)


async def _audit(run: Running, action: str) -> list[dict[str, object]]:
    async with run.admin() as s:
        st, page = await call(s, "GET", f"/api/v1/audit?type={action}")
    assert st == 200, page
    items: list[dict[str, object]] = page["items"]
    return items


async def test_frames_both_ways_and_subprotocol(env: Env) -> None:
    async with env.session() as s, s.ws_connect("/t/chat/ws", protocols=("chat",)) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "echo:hello"
        payload = bytes(range(256)) * 300  # 75 KiB: several TCP reads, one frame
        await ws.send_bytes(payload)
        assert await ws.receive_bytes(timeout=5) == payload
        for i in range(50):
            await ws.send_str(f"m{i}")
        for i in range(50):
            assert await ws.receive_str(timeout=5) == f"echo:m{i}"
    assert env.up.ws_open == 1


async def test_close_code_from_target_reaches_client(env: Env) -> None:
    async with env.session() as s, s.ws_connect("/t/chat/ws") as ws:
        await ws.send_str("close:4001:done here")
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001
        assert msg.extra == "done here"


async def test_close_code_from_client_reaches_target(env: Env) -> None:
    async with env.session() as s:
        ws = await s.ws_connect("/t/chat/ws")
        await ws.send_str("x")
        await ws.receive_str(timeout=5)
        await ws.close(code=4002, message=b"bye")
    for _ in range(50):
        if env.up.ws_closed:
            break
        await asyncio.sleep(0.05)
    assert env.up.ws_closed[0][0] == 4002


async def test_revoke_cuts_the_websocket_within_a_second(env: Env) -> None:
    async with env.session() as s, s.ws_connect("/t/chat/ws") as ws:
        await ws.send_str("ping")
        assert await ws.receive_str(timeout=5) == "echo:ping"
        async with env.run.admin() as a:
            st, body = await call(a, "POST", f"/api/v1/access-requests/{env.user.request_id}/revoke")
            assert st == 200, body
        started = time.monotonic()
        msg = await ws.receive(timeout=5)
        elapsed = time.monotonic() - started
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            assert msg.data == 1008
            assert "revoked" in (msg.extra or "")
        assert elapsed < 1.0
    # Later requests on the same cookie are refused.
    async with env.session() as s:
        r = await s.get("/t/chat/")
        assert r.status == 401
    for _ in range(50):
        if env.up.ws_closed:
            break
        await asyncio.sleep(0.05)
    assert env.up.ws_closed, "the target's side of the websocket was not closed"


async def test_session_end_cuts_websocket(env: Env) -> None:
    async with env.session() as s, s.ws_connect("/t/chat/ws") as ws:
        await ws.send_str("a")
        await ws.receive_str(timeout=5)
        live = env.run.gateway.sessions.live_sessions()[0]
        await env.run.gateway.sessions.end(live, "signed out", actor="test")
        msg = await ws.receive(timeout=2)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_websocket_audited_open_and_close_not_per_message(env: Env) -> None:
    async with env.session() as s, s.ws_connect("/t/chat/ws") as ws:
        for i in range(5):
            await ws.send_str(str(i))
            await ws.receive_str(timeout=5)
    for _ in range(50):
        closed = await _audit(env.run, "proxy.websocket.closed")
        if closed:
            break
        await asyncio.sleep(0.05)
    opened = await _audit(env.run, "proxy.websocket.opened")
    assert len(opened) == 1 and len(closed) == 1
    details = closed[0]["details"]
    assert isinstance(details, dict)
    assert details["target"] == "chat"
    assert int(details["bytes_up"]) > 0 and int(details["bytes_down"]) > 0


async def test_websocket_needs_a_session_and_a_grant(env: Env) -> None:
    async with env.session(cookie=False) as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await s.ws_connect("/t/chat/ws")
        assert exc.value.status == 401
    async with start_upstream() as other:
        async with env.run.admin() as a:
            st, _ = await call(
                a, "POST", "/api/v1/targets", {"name": "other", "protocol": "http", "url": other.url}
            )
            assert st == 201
        async with env.session() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await s.ws_connect("/t/other/ws")
            assert exc.value.status == 403
        assert other.hits == []


async def test_websocket_on_a_connection_that_began_with_a_page(env: Env) -> None:
    """aiohttp owns the connection (first request was a gateway page): the upgrade still works."""
    connector = aiohttp.TCPConnector(ssl=env.run.ssl, limit=1)
    async with aiohttp.ClientSession(
        base_url=env.run.public_url, headers=env.user.headers(), connector=connector
    ) as s:
        r = await s.get("/")
        await r.read()
        async with s.ws_connect("/t/chat/ws") as ws:
            await ws.send_str("via aiohttp")
            assert await ws.receive_str(timeout=5) == "echo:via aiohttp"
            await ws.send_bytes(b"\x00" * 70000)
            assert await ws.receive_bytes(timeout=5) == b"\x00" * 70000


async def test_upgrade_refused_by_target_closes_after_answer(env: Env) -> None:
    out = await raw_exchange(
        env.user,
        b"GET /t/chat/not-a-socket HTTP/1.1\r\nHost: g\r\nCookie: __Host-domum="
        + env.user.cookie.encode()
        + b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        + b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    assert status_of(out) == 200  # the echo answered as plain HTTP; then the gateway closed


async def test_websocket_in_live_registry_and_cut_alone(env: Env) -> None:
    async with env.session() as s, s.ws_connect("/t/chat/ws") as ws:
        await ws.send_str("count me")
        assert await ws.receive_str(timeout=5) == "echo:count me"
        async with env.run.admin(env.run.auditor_token) as a:
            st, page = await call(a, "GET", "/api/v1/sessions")
            assert st == 200
            (conn,) = page["items"][0]["connections"]
            assert conn["protocol"] == "websocket" and conn["target"] == "chat"
            assert conn["bytes_in"] > 0 and conn["bytes_out"] > 0
            st, _ = await call(a, "DELETE", f"/api/v1/sessions/{conn['id']}")
            assert st == 204
        msg = await ws.receive(timeout=2)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == 1008
        assert msg.extra == "terminated by an administrator"
    # The session itself lives on: plain requests still pass.
    async with env.session() as s:
        r = await s.get("/t/chat/still-here")
        assert r.status == 200
    assert env.run.gateway.sessions.connections() == []
