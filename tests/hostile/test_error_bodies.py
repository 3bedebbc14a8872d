"""No response body anywhere carries a stack trace, a file path or an internal exception name.

Each error status the gateway emits is provoked for real, on the listener that emits it
(public pages, the HTTP proxy's fast path, tunnels, the control API), including an
unexpected exception inside a handler (a store method made to fail with a message full
of internals). Every body is checked against the same patterns; the statuses seen are
checked too, so a case that stops producing its status fails instead of passing empty.

408 is provoked by clients that stall: a head that never ends (a page route and ``/t/``,
cut by the head timeout) and a ``/t/`` request body that stops (cut by the proxy's read
timeout, shortened here). The gateway answers those with an empty 408 and closes.
"""

from __future__ import annotations

import inspect
import io
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

import domum_gateway.errors
from domum_gateway.proxy import http_proxy
from domum_gateway.proxy.http_proxy import HTTP_PROXY

from ..conftest import Running
from ..integration.helpers import call, create_forwarded, seed
from ..peers.tcp import closed_port
from ..peers.upstreams import ProxyEnv, grant_targets, start_upstream
from .raw import exchange, status_of

pytestmark = pytest.mark.asyncio

SECRET = "/srv/secret/domum_gateway/store/sqlite.py line 42 in _tx: KeyError('sk-live-internal')"

_EXCEPTION_NAMES = sorted(
    {
        name
        for name, obj in inspect.getmembers(domum_gateway.errors, inspect.isclass)
        # One-word names (Forbidden, Conflict) are also the problem titles users see.
        if issubclass(obj, BaseException) and re.fullmatch(r"(?:[A-Z][a-z]+){2,}", name)
    }
    | {"ValueError", "KeyError", "RuntimeError", "TypeError", "AssertionError", "CancelledError"}
    | {"OSError", "ConnectionResetError", "TimeoutError", "IntegrityError", "OperationalError"}
)
_LEAKS = [
    re.compile(rb"Traceback \(most recent call last\)"),
    re.compile(rb'File "[^"]+", line \d+'),
    re.compile(rb"[\w/.-]+\.py\b"),
    re.compile(rb"/(?:work|srv|home|root|usr|tmp|var/lib)/"),
    re.compile(rb"site-packages|domum_gateway|aiohttp\.|asyncio\.|asyncpg|aiosqlite"),
    re.compile(rb"\bHTTP(?:Bad|Not|Forbidden|Unauthorized|Request|Internal|Method)\w*"),
    re.compile(rb"sk-live-internal|/srv/secret"),
    re.compile(rb"\b(?:" + b"|".join(n.encode() for n in _EXCEPTION_NAMES) + rb")\b"),
    re.compile(rb"<(?:[\w.]+ )?object at 0x[0-9a-f]+>"),
]


def _leaks(body: bytes) -> list[str]:
    return [m.group(0).decode(errors="replace") for p in _LEAKS for m in [p.search(body)] if m]


class Seen:
    def __init__(self) -> None:
        self.statuses: dict[str, set[int]] = {}

    def check(self, where: str, status: int, body: bytes) -> None:
        assert status >= 400 or status == 0, (where, status)
        found = _leaks(body)
        assert not found, (where, status, found, body[:500])
        self.statuses.setdefault(where, set()).add(status)


def _body(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in response else b""


def _host(run: Running) -> bytes:
    return run.public_url.split("//", 1)[1].encode()


@pytest.fixture
async def user(running: Running) -> AsyncIterator[ProxyEnv]:
    async with start_upstream() as up:
        env = await grant_targets(
            running,
            {"wiki": up.url + "/", "down": f"http://127.0.0.1:{closed_port()}/"},
            email="errors@example.com",
        )
        yield env


async def _public(run: Running, seen: Seen, raw: bytes, where: str = "public", timeout: float = 3) -> int:
    got = await exchange(run.public_url, run.ssl, raw, timeout=timeout)
    status = status_of(got) or 0
    seen.check(where, status, _body(got))
    return status


async def test_public_listener_error_bodies(
    running: Running, user: ProxyEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = Seen()
    host = _host(running)
    cookie = b"Cookie: __Host-domum=" + user.cookie.encode() + b"\r\n"
    # Short head and read timeouts for the 408 cases (set before any target connection
    # exists: a connection keeps the read timeout it was made with).
    monkeypatch.setattr(http_proxy, "_HEAD_TIMEOUT", 1.0)
    monkeypatch.setattr(running.gateway.public_app[HTTP_PROXY].upstreams, "read_timeout", 1.0)

    def get(path: bytes, extra: bytes = b"", method: bytes = b"GET") -> bytes:
        return (
            method
            + b" "
            + path
            + b" HTTP/1.1\r\nHost: "
            + host
            + b"\r\n"
            + extra
            + b"Connection: close\r\n\r\n"
        )

    cases: list[tuple[bytes, set[int]]] = [
        (get(b"/no/such/page"), {404}),
        (get(b"/portal"), {401}),
        (get(b"/a/" + b"Q" * 22), {403}),
        (get(b"/portal", method=b"DELETE"), {405}),
        (get(b"/ws/tcp/echo"), {426}),
        (
            get(b"/ws/ssh/x", b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\n"),
            {400, 403},
        ),
        (get(b"/portal", b"X-Big: " + b"a" * 70000 + b"\r\n"), {400, 431}),
        (get(b"/portal", b"Content-Length: 5\r\nContent-Length: 6\r\n"), {400}),
        (get(b"/portal", b"Bad\x00Header: 1\r\n"), {400}),
        (b"GARBAGE\r\n\r\n", {400}),
        (get(b"/a/" + b"Q" * 22 + b"/verify", b"Content-Length: 5000000\r\n", b"POST"), {400, 403, 413}),
        # the proxy's fast path
        (get(b"/t/wiki/../x", cookie), {400}),
        (get(b"/t/nope/", cookie), {404}),
        (get(b"/t/wiki/"), {401}),
        (get(b"/t/wiki/", b"Cookie: __Host-domum=forged\r\n"), {401, 403}),
        (get(b"/t/down/", cookie), {502}),
        (get(b"/t/wiki/x", cookie + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"), {400}),
        (get(b"/t/wiki/x", cookie + b"X-Big: " + b"a" * 70000 + b"\r\n"), {400, 431}),
        (get(b"/t/wiki/x", cookie + b"Host: other\r\n"), {400}),
    ]
    for raw, expected in cases:
        status = await _public(running, seen, raw)
        assert status in expected, (raw[:120], status)

    # 408: clients that stall in a head (page route, /t/) or in a proxied request body.
    for raw in (
        b"GET /portal HTTP/1.1\r\nHost: " + host + b"\r\n",
        b"GET /t/wiki/x HTTP/1.1\r\nHost: " + host + b"\r\n" + cookie,
        get(b"/t/wiki/upload", cookie + b"Content-Length: 1000\r\n", b"POST") + b"x" * 10,
    ):
        status = await _public(running, seen, raw, "stalled", timeout=5)
        assert status == 408, (raw[:120], status)

    # 500: an unexpected exception deep inside a page handler, with internals in its text.
    store = running.gateway.store

    async def broken(*_a: Any, **_k: Any) -> Any:
        raise KeyError(SECRET)

    monkeypatch.setattr(store, "find_request_by_link", broken)
    monkeypatch.setattr(store, "get_user", broken)
    status = await _public(running, seen, get(b"/a/" + b"S" * 22, b"", b"GET"), "public-crash")
    assert status >= 500, status
    monkeypatch.undo()

    # 429: the per-address limit on the login routes.
    for _ in range(running.gateway.login.ip_limiter.limit + 1):
        status = await _public(running, seen, get(b"/a/" + b"R" * 22))
    assert status == 429

    statuses = set().union(*seen.statuses.values())
    assert {400, 401, 403, 404, 405, 408, 426, 429, 502} <= statuses, statuses


@pytest.fixture
async def admin_raw(running: Running) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base_url=running.admin_url, connector=aiohttp.TCPConnector(ssl=running.ssl)
    ) as s:
        yield s


async def test_control_api_error_bodies(
    running: Running, admin_raw: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = Seen()
    sd = await seed(running)
    rid, _link = await create_forwarded(running, sd)
    admin = {"Authorization": f"Bearer {running.admin_token}"}
    auditor = {"Authorization": f"Bearer {running.auditor_token}"}
    json_ct = {"Content-Type": "application/json"}

    async def hit(method: str, path: str, expected: set[int], where: str = "admin", **kw: Any) -> None:
        async with admin_raw.request(method, path, **kw) as r:
            body = await r.read()
        seen.check(where, r.status, body)
        assert r.status in expected, (method, path, r.status, body[:300])

    await hit("GET", "/api/v1/groups", {401})
    await hit("GET", "/api/v1/groups", {401}, headers={"Authorization": "Bearer nope"})
    await hit("POST", "/api/v1/groups", {403}, headers=auditor, json={"name": "x"})
    await hit("GET", "/api/v1/groups/nope", {404}, headers=admin)
    await hit("GET", "/api/v1/nothing-here", {404}, headers=admin)
    await hit("PUT", "/api/v1/groups", {405}, headers=admin)
    await hit("POST", "/api/v1/groups", {400}, headers={**admin, **json_ct}, data=b"{not json")
    await hit(
        "POST",
        "/api/v1/groups",
        {400},
        headers={**admin, **json_ct},
        data=io.BytesIO(b"[" * 10000 + b"]" * 10000),
    )
    await hit("POST", "/api/v1/groups", {400, 422}, headers={**admin, **json_ct}, data=b'{"name": "\xff"}')
    await hit(
        "POST", "/api/v1/groups", {400, 415}, headers={**admin, "Content-Type": "text/plain"}, data=b"x"
    )
    await hit("POST", "/api/v1/groups", {422}, headers=admin, json={"name": "", "kind": "weird", "evil": 1})
    await hit(
        "POST",
        "/api/v1/groups",
        {413},
        headers={**admin, **json_ct},
        data=io.BytesIO(b" " * (2 * 1024 * 1024)),
    )
    await hit("DELETE", f"/api/v1/groups/{sd.group_id}", {409}, headers=admin)
    async with running.admin() as s:
        st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
        assert st == 200
    await hit("POST", f"/api/v1/access-requests/{rid}/forward", {409, 422}, headers=admin)
    await hit("GET", "/api/v1/audit", {400, 422}, headers=admin, params={"since": "yesterday"})
    await hit("GET", "/admin/nothing", {401, 403, 404}, "console")

    store = running.gateway.store

    async def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(store, "list_groups", broken)
    await hit("GET", "/api/v1/groups", {500, 503}, "admin-crash", headers=admin)
    statuses = set().union(*seen.statuses.values())
    assert {400, 401, 403, 404, 405, 413, 422, 500} <= statuses | {500 if 503 in statuses else 0}, statuses
    async with running.admin() as s:
        st, _ = await call(s, "GET", "/api/v1/reasons")
        assert st == 200  # the listener lives on
