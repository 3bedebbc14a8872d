"""Host mode: each target on ``{name}.{public.domain}``, with a cookie only that host gets.

``/t/{name}/x`` on the main host hands a signed-in browser over with a one-time code;
``/__domum/enter`` on the target's host turns it into a host-only cookie that opens
that target and nothing else. Requests are written by hand so the ``Host`` header can
name each host while everything runs on 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from ..peers.smtp import Mailbox
from ..peers.upstreams import (
    ProxyEnv,
    Upstream,
    gateway_with,
    grant_targets,
    raw_exchange,
    start_upstream,
    status_of,
)

pytestmark = pytest.mark.asyncio

DOMAIN = "gw.test"


@dataclass
class Env:
    run: Any
    wiki: Upstream
    other: Upstream
    user: ProxyEnv


@pytest.fixture
async def env(tmp_path: Path, mailbox: tuple[Mailbox, int]) -> AsyncIterator[Env]:
    async with (
        gateway_with(tmp_path, mailbox, public={"domain": DOMAIN, "base_url": "https://gw.test:8443"}) as run,
        start_upstream() as wiki,
        start_upstream() as other,
    ):
        user = await grant_targets(run, {"wiki": wiki.url + "/app", "other": other.url + "/"})
        yield Env(run, wiki, other, user)


def _req(path: str, host: str, cookie: str | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if cookie is not None:
        lines.append(f"Cookie: __Host-domum={cookie}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _headers(response: bytes) -> dict[str, list[str]]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
    out: dict[str, list[str]] = {}
    for line in head:
        name, _, value = line.partition(":")
        out.setdefault(name.strip().lower(), []).append(value.strip())
    return out


async def _enter(env: Env, path: str = "/page?x=1") -> str:
    """Main host -> hand-over code -> target host cookie; returns that cookie's value."""
    out = await raw_exchange(env.user, _req(f"/t/wiki{path}", "gw.test:8443", env.user.cookie))
    assert status_of(out) == 303, out[:300]
    location = _headers(out)["location"][0]
    parts = urlsplit(location)
    assert parts.scheme == "https" and parts.netloc == "wiki.gw.test:8443"
    assert parts.path == "/__domum/enter"
    query = parse_qs(parts.query)
    assert query["next"] == [path]
    out = await raw_exchange(env.user, _req(f"/__domum/enter?{parts.query}", "wiki.gw.test:8443"))
    assert status_of(out) == 303, out[:300]
    headers = _headers(out)
    assert headers["location"] == [path]
    cookie = headers["set-cookie"][0]
    assert cookie.startswith("__Host-domum=")
    assert "Path=/" in cookie and "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "domain=" not in cookie.lower()
    value = cookie.split(";")[0].split("=", 1)[1]
    assert value != env.user.cookie
    # The code works once.
    again = await raw_exchange(env.user, _req(f"/__domum/enter?{parts.query}", "wiki.gw.test:8443"))
    assert status_of(again) == 401
    return value


async def test_hand_over_and_host_cookie(env: Env) -> None:
    host_cookie = await _enter(env)
    assert env.wiki.hits == []
    out = await raw_exchange(env.user, _req("/page?x=1", "wiki.gw.test:8443", host_cookie))
    assert status_of(out) == 200
    body = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert body["path"] == "/app/page?x=1"
    seen = {k.lower(): v for k, v in body["headers"]}
    assert seen["x-forwarded-host"] == "wiki.gw.test:8443"
    assert "x-forwarded-prefix" not in seen
    assert "cookie" not in seen


async def test_host_cookie_opens_only_its_own_host(env: Env) -> None:
    host_cookie = await _enter(env)
    out = await raw_exchange(env.user, _req("/", "other.gw.test:8443", host_cookie))
    assert status_of(out) == 401
    out = await raw_exchange(env.user, _req("/t/other/", "gw.test:8443", host_cookie))
    assert status_of(out) == 401
    assert env.other.hits == []


async def test_target_host_without_cookie_shows_a_page_not_a_loop(env: Env) -> None:
    out = await raw_exchange(env.user, _req("/deep/link", "wiki.gw.test"))
    assert status_of(out) == 401
    assert "location" not in _headers(out)
    assert b"https://gw.test:8443/t/wiki/" in out
    assert env.wiki.hits == []


async def test_main_cookie_works_on_a_target_host_for_scripts(env: Env) -> None:
    out = await raw_exchange(env.user, _req("/api", "other.gw.test", env.user.cookie))
    assert status_of(out) == 200
    assert env.other.hits == ["/api"]


async def test_redirects_and_cookies_in_host_mode(env: Env) -> None:
    host_cookie = await _enter(env, "/")
    up = env.wiki.url
    out = await raw_exchange(env.user, _req(f"/redirect?to={up}/app/next", "wiki.gw.test:8443", host_cookie))
    assert status_of(out) == 302
    assert _headers(out)["location"] == ["/next"]


async def test_hand_over_refuses_other_methods_and_websockets(env: Env) -> None:
    data = (
        b"POST /t/wiki/form HTTP/1.1\r\nHost: gw.test\r\nCookie: __Host-domum="
        + env.user.cookie.encode()
        + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    out = await raw_exchange(env.user, data)
    assert status_of(out) == 403
    assert b"https://wiki.gw.test:8443/" in out


async def test_session_end_kills_host_cookies(env: Env) -> None:
    host_cookie = await _enter(env)
    live = env.run.gateway.sessions.live_sessions()[0]
    await env.run.gateway.sessions.end(live, "signed out", actor="test")
    out = await raw_exchange(env.user, _req("/page", "wiki.gw.test", host_cookie))
    assert status_of(out) == 401
    assert env.wiki.hits == []
