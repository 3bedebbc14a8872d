"""The HTTP reverse proxy end to end: a real gateway on TLS loopback, real aiohttp targets.

What a remote user's browser sends reaches the target with the gateway's own headers
(and without the gateway's cookie); what the target answers reaches the browser mapped
under ``/t/{name}``. Requests without a session, for a target outside the grant or for an
unknown name never leave the gateway.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from yarl import URL

from ..conftest import Running
from ..peers.upstreams import ProxyEnv, Upstream, grant_targets, raw_exchange, start_upstream, status_of

pytestmark = pytest.mark.asyncio


@dataclass
class Env:
    run: Running
    wiki: Upstream
    other: Upstream
    user: ProxyEnv

    def client(self, cookie: bool = True, **kw: Any) -> aiohttp.ClientSession:
        headers = self.user.headers() if cookie else {}
        return aiohttp.ClientSession(
            base_url=self.run.public_url,
            headers=headers,
            connector=aiohttp.TCPConnector(ssl=self.run.ssl),
            **kw,
        )


@pytest.fixture
async def env(running: Running) -> AsyncIterator[Env]:
    async with start_upstream() as wiki, start_upstream() as other:
        user = await grant_targets(running, {"wiki": wiki.url + "/", "app": other.url + "/app"})
        yield Env(running, wiki, other, user)


async def test_get_reaches_target_with_gateway_headers(env: Env) -> None:
    async with env.client() as c:
        r = await c.get(
            URL("/t/wiki/some/path?q=1&r=%2F", encoded=True),
            headers={
                "Cookie": f"__Host-domum={env.user.cookie}; theme=dark; sid=app-session",
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Host": "evil.example",
                "Forwarded": "for=6.6.6.6",
                "X-Domum-User": "mallory",
                "X-Real-IP": "6.6.6.6",
                "Remote-User": "root",
                "Authorization": "Basic YWxpY2U6cw==",
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "drop me",
                "Proxy-Authorization": "Basic Zm9v",
            },
        )
        assert r.status == 200
        data = await r.json()
    assert data["method"] == "GET"
    assert data["path"] == "/some/path?q=1&r=%2F"
    headers: dict[str, list[str]] = {}
    for k, v in data["headers"]:
        headers.setdefault(k.lower(), []).append(v)
    assert headers["host"] == [env.wiki.url.split("://")[1]]
    assert headers["cookie"] == ["theme=dark; sid=app-session"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["https"]
    assert headers["x-forwarded-host"] == [env.run.public_url.split("://")[1]]
    assert headers["forwarded"][0].startswith("for=127.0.0.1;proto=https")
    assert headers["x-forwarded-prefix"] == ["/t/wiki"]
    assert headers["x-domum-user"] == [env.run.gateway.public_ctx.sessions.live_sessions()[0].user_id]
    assert headers["x-domum-request"] == [env.user.request_id]
    assert headers["authorization"] == ["Basic YWxpY2U6cw=="]
    for gone in ("x-real-ip", "remote-user", "x-secret-hop", "proxy-authorization", "connection"):
        assert gone not in headers, gone
    assert "__Host-domum" not in json.dumps(data)


async def test_response_hop_by_hop_headers_are_dropped(env: Env) -> None:
    async with env.client() as c:
        r = await c.get("/t/wiki/echo")
        await r.read()
    assert r.headers["X-Upstream"] == "echo"
    assert "X-Hop" not in r.headers
    assert "Keep-Alive" not in r.headers
    # The proxied answer keeps the target's own headers: no gateway CSP on it.
    assert "Content-Security-Policy" not in r.headers


async def test_target_prefix_replaces_t_name(env: Env) -> None:
    async with env.client() as c:
        r = await c.get("/t/app/x/y")
        data = await r.json()
        r2 = await c.get("/t/app/")
        data2 = await r2.json()
    assert data["path"] == "/app/x/y"
    assert data2["path"] == "/app/"
    assert env.other.hits == ["/app/x/y", "/app/"]


async def test_missing_slash_redirects_to_target_root(env: Env) -> None:
    async with env.client() as c:
        r = await c.get("/t/wiki?a=1", allow_redirects=False)
    assert r.status == 308
    assert r.headers["Location"] == "/t/wiki/?a=1"
    assert env.wiki.hits == []


async def test_post_bodies_fixed_and_chunked(env: Env) -> None:
    body = b"x" * 300_000

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"y" * 10_000

    async with env.client() as c:
        r = await c.post("/t/wiki/form", data=body)
        fixed = await r.json()
        r = await c.post("/t/wiki/stream", data=gen())
        chunked = await r.json()
    assert fixed["body_len"] == 300_000 and fixed["method"] == "POST"
    assert chunked["body_len"] == 100_000
    assert chunked["chunked"] == "chunked"


async def test_keep_alive_many_requests_one_connection(env: Env) -> None:
    connector = aiohttp.TCPConnector(ssl=env.run.ssl, limit=1)
    async with aiohttp.ClientSession(
        base_url=env.run.public_url, headers=env.user.headers(), connector=connector
    ) as c:
        for i in range(50):
            r = await c.get(f"/t/wiki/n/{i}")
            assert (await r.json())["path"] == f"/n/{i}"
    assert len(env.wiki.hits) == 50


async def test_head_and_no_length_bodies(env: Env) -> None:
    async with env.client() as c:
        r = await c.head("/t/wiki/head")
        assert r.status == 200
        assert r.headers["Content-Length"] == "10"
        assert await r.read() == b""
        r = await c.get("/t/wiki/head")
        assert await r.read() == b"0123456789"
        r = await c.get("/t/wiki/noclen")
        assert await r.read() == b"until-close " * 100


async def test_redirects_are_returned_and_mapped(env: Env) -> None:
    up = env.wiki.url
    cases = {
        "/landing": "/t/wiki/landing",
        f"{up}/deep/x?y=1": "/t/wiki/deep/x?y=1",
        "relative/page": "relative/page",
        "https://elsewhere.example/x": "https://elsewhere.example/x",
    }
    async with env.client() as c:
        for to, expected in cases.items():
            r = await c.get("/t/wiki/redirect", params={"to": to}, allow_redirects=False)
            assert r.status == 302
            assert r.headers["Location"] == expected, to
            assert r.headers["Content-Location"] == expected, to
        # Prefix targets: /app/... maps to /t/app/...; outside the prefix is left alone.
        other = env.other.url
        for to, expected in {
            "/app/in": "/t/app/in",
            "/app": "/t/app/",
            f"{other}/app/x": "/t/app/x",
            "/outside": "/outside",
        }.items():
            r = await c.get("/t/app/redirect", params={"to": to}, allow_redirects=False)
            assert r.headers["Location"] == expected, to
    assert env.wiki.hits.count("/redirect?to=/landing") == 1


async def test_set_cookie_path_and_domain_rewritten(env: Env) -> None:
    async with env.client() as c:
        r = await c.get("/t/wiki/cookies")
        await r.read()
    cookies = r.headers.getall("Set-Cookie")
    assert "app=1; Path=/t/wiki/; HttpOnly" in cookies
    assert "plain=3" in cookies
    scoped = [c for c in cookies if c.startswith("scoped=")]
    assert scoped == ["scoped=2; Path=/t/wiki/app/area"]
    assert not [c for c in cookies if c.startswith("__Host-domum")]


async def test_no_cookie_gets_login_page_not_a_redirect(env: Env) -> None:
    async with env.client(cookie=False) as c:
        r = await c.get("/t/wiki/private", headers={"Accept": "text/html"}, allow_redirects=False)
        text = await r.text()
        r2 = await c.get("/t/wiki/x", headers={"Accept": "application/json"})
        plain = await r2.text()
    assert r.status == 401
    assert "Location" not in r.headers
    assert "Sign-in required" in text and "wiki" in text
    assert r.headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert r2.status == 401 and r2.headers["Content-Type"].startswith("text/plain")
    assert "Sign-in required" in plain
    assert env.wiki.hits == []


async def test_bad_cookie_and_unknown_target(env: Env) -> None:
    async with env.client(cookie=False) as c:
        r = await c.get("/t/wiki/", headers={"Cookie": "__Host-domum=not-a-session"})
        assert r.status == 401
        r = await c.get("/t/nope/", headers=env.user.headers())
        assert r.status == 404
        # Without a session an unknown name looks like any other target: sign in first.
        r = await c.get("/t/nope/")
        assert r.status == 401
    assert env.wiki.hits == []


async def test_ungranted_target_is_refused(env: Env) -> None:
    async with start_upstream() as secret:
        async with env.run.admin() as s:
            r = await s.post(
                "/api/v1/targets", json={"name": "secret", "protocol": "http", "url": secret.url}
            )
            assert r.status == 201
        async with env.client() as c:
            r = await c.get("/t/secret/", headers={"Accept": "text/html"})
            text = await r.text()
        assert r.status == 403
        assert "does not include" in text
        assert secret.hits == []


async def test_pipelined_requests_answered_in_order(env: Env) -> None:
    cookie = f"Cookie: __Host-domum={env.user.cookie}\r\n".encode()
    req = b"GET /t/wiki/p/%d HTTP/1.1\r\nHost: gw\r\n" + cookie + b"\r\n"
    data = b"".join(req % i for i in range(5))
    data += b"GET /t/wiki/p/last HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n" + cookie + b"\r\n"
    out = await raw_exchange(env.user, data)
    assert out.count(b"HTTP/1.1 200") == 6
    paths = [
        json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])["path"]
        for part in out.split(b"HTTP/1.1 200")[1:]
    ]
    assert paths == [f"/p/{i}" for i in range(5)] + ["/p/last"]


async def test_page_request_then_proxy_on_same_connection(env: Env) -> None:
    """A connection that began with a gateway page still proxies (then closes)."""
    connector = aiohttp.TCPConnector(ssl=env.run.ssl, limit=1)
    async with aiohttp.ClientSession(
        base_url=env.run.public_url, headers=env.user.headers(), connector=connector
    ) as c:
        r = await c.get("/")
        await r.read()
        r = await c.get("/t/wiki/after-page?x=1")
        data = await r.json()
        assert data["path"] == "/after-page?x=1"
        assert r.headers.get("Connection", "").lower() == "close"
        r = await c.post("/t/wiki/again", data=b"z" * 70_000)
        assert (await r.json())["body_len"] == 70_000
    assert env.wiki.hits == ["/after-page?x=1", "/again"]


async def test_raw_status_helpers(env: Env) -> None:
    out = await raw_exchange(env.user, b"GET /t/wiki/ HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    assert status_of(out) == 401


@pytest.mark.parametrize(
    ("first", "drip"),
    [
        (b"GET /por", b"t"),
        (b"GET /portal HTTP/1.1\r\nHost: gw\r\n", b"X-Slow: 1\r\n"),
        (b"GET /t/wiki/x HTTP/1.1\r\nHost: gw\r\n", b"X-Slow: 1\r\n"),
    ],
    ids=["page-request-line", "page-headers", "proxied-headers"],
)
async def test_trickled_head_gets_408_and_is_closed(
    env: Env, monkeypatch: pytest.MonkeyPatch, first: bytes, drip: bytes
) -> None:
    """A head that never ends is cut by the head timeout, for pages as for proxied requests."""
    import asyncio
    import time

    from domum_gateway.proxy import http_proxy

    monkeypatch.setattr(http_proxy, "_HEAD_TIMEOUT", 1.0)
    host, port = env.user.host_port
    reader, writer = await asyncio.open_connection(host, port, ssl=env.run.ssl, server_hostname=host)
    started = time.monotonic()
    got = b""
    try:
        writer.write(first)
        while time.monotonic() - started < 5:
            writer.write(drip)
            await writer.drain()
            try:
                got = await asyncio.wait_for(reader.read(4096), 0.3)
            except TimeoutError:
                continue
            break
    except ConnectionError:
        pass
    finally:
        writer.close()
    assert got.startswith(b"HTTP/1.1 408"), got[:100]
    assert time.monotonic() - started < 4
