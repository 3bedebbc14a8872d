"""Raw bytes through the HTTP reverse proxy (``/t/{target}/``) with a valid session.

What ``test_public_wire`` does for the gateway's own routes, for the proxy's fast path,
against real upstreams that record everything they receive:

* malformed chunked request bodies (bare LF or CR in a chunk extension, chunk data
  without its CRLF, ``0\\n\\n``, sizes with garbage, a sign, ``0x``, or more than 64
  bits) are answered 400 at once and the connection closes; no request made of those
  bytes, nor one hidden behind them, ever completes at the target;
* a request body that never starts, stops, or trickles slower than the proxy's read
  timeout gets a 408 within about that timeout and the target never gets a whole
  request (trickled *heads* on ``/t/`` are in ``integration/test_http_proxy.py``);
* identity and forwarding headers a client forges, in any case, with underscores, or
  named in ``Connection`` to make the gateway drop its own, never reach the target:
  it sees exactly the gateway's ``X-Domum-*``, ``X-Forwarded-*`` and ``Forwarded``;
* a hostile target: endless response headers (a flood: 502; trickled: 504) end in
  bounded time and memory; a redirect to another internal server is passed back to
  the client, never followed.

Header names with underscores are dropped (``X_Domum_User`` is ``HTTP_X_DOMUM_USER`` to
a CGI, WSGI or PHP app, like ``X-Domum-User``), and a stalled body on a connection
aiohttp owns (``http_fallback``) is answered and closed like one on the fast path.
The gateway runs with ``proxy.read_timeout`` of one second so every timeout
case finishes in a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from ..conftest import Running
from ..peers.smtp import Mailbox
from ..peers.upstreams import ProxyEnv, gateway_with, grant_targets
from .raw import exchange, open_raw, rss_kib, status_of

pytestmark = pytest.mark.asyncio

READ_TIMEOUT = 1.0


@dataclass
class Received:
    """One request as a recording target saw it."""

    method: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    complete: bool = False  # the whole body arrived
    error: str = ""  # why it did not


@dataclass
class Recorder:
    """A real aiohttp target on 127.0.0.1 that keeps every request it receives."""

    url: str = ""
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    redirect_to: str = ""  # answer /redirect with a 302 to here

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def complete(self) -> list[Received]:
        return [r for r in self.requests if r.complete]


@asynccontextmanager
async def _recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()

    async def handle(request: web.Request) -> web.StreamResponse:
        seen = Received(request.method, request.raw_path, list(request.raw_headers))
        rec.requests.append(seen)
        try:
            seen.body = await request.read()
        except Exception as exc:  # a cut or malformed body, whatever aiohttp calls it
            seen.error = type(exc).__name__
            return web.Response(status=400)
        seen.complete = True
        if request.path == "/redirect" and rec.redirect_to:
            return web.Response(status=302, headers={"Location": rec.redirect_to})
        return web.Response(text=f"ok {len(seen.body)}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.port = int(runner.addresses[0][1])
    rec.url = f"http://127.0.0.1:{rec.port}"
    try:
        yield rec
    finally:
        await runner.cleanup()


@dataclass
class EndlessHead:
    """A raw TCP target that answers every request with a head that never ends."""

    port: int = 0
    line_delay: float = 0.0  # 0: as fast as the gateway reads
    max_bytes: int = 10 * 1024 * 1024
    max_seconds: float = 10.0
    connections: int = 0
    sent: list[int] = field(default_factory=list)  # bytes written, per connection
    cut: list[float] = field(default_factory=list)  # seconds until the gateway hung up
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.add(writer)
        sent = 0
        started = time.monotonic()
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n")
            block = b"X-a: b\r\n" * (1 if self.line_delay else 8192)
            while sent < self.max_bytes and time.monotonic() - started < self.max_seconds:
                writer.write(block)
                await writer.drain()
                sent += len(block)
                if self.line_delay:
                    await asyncio.sleep(self.line_delay)
                if reader.at_eof():
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.sent.append(sent)
            self.cut.append(time.monotonic() - started)
            self.writers.discard(writer)
            writer.close()


@asynccontextmanager
async def _endless_head() -> AsyncIterator[EndlessHead]:
    peer = EndlessHead()
    server = await asyncio.start_server(peer.serve, "127.0.0.1", 0)
    peer.port = int(server.sockets[0].getsockname()[1])
    try:
        yield peer
    finally:
        server.close()
        for writer in list(peer.writers):
            writer.transport.abort()
        await server.wait_closed()


@dataclass
class Env:
    run: Running
    user: ProxyEnv
    app: Recorder  # target "app"
    internal: Recorder  # a server on the same network that is no target
    evil: EndlessHead  # target "evil"

    @property
    def cookie(self) -> bytes:
        return b"Cookie: __Host-domum=" + self.user.cookie.encode() + b"\r\n"

    def head(self, method: bytes, path: bytes, extra: bytes = b"") -> bytes:
        return method + b" " + path + b" HTTP/1.1\r\nHost: gw.example\r\n" + self.cookie + extra + b"\r\n"

    async def send(self, data: bytes, timeout: float = 4.0) -> bytes:
        return await exchange(self.run.public_url, self.run.ssl, data, timeout=timeout)

    async def healthy(self) -> None:
        """A normal request on a new connection is proxied."""
        before = len(self.app.complete())
        got = await self.send(self.head(b"GET", b"/t/app/healthy", b"Connection: close\r\n"))
        assert status_of(got) == 200, got[:300]
        assert [r.path for r in self.app.complete()[before:]] == ["/healthy"]


@pytest.fixture
async def env(tmp_path: Path, mailbox: tuple[Mailbox, int]) -> AsyncIterator[Env]:
    async with (
        gateway_with(tmp_path, mailbox, proxy={"read_timeout": READ_TIMEOUT, "connect_timeout": 1.0}) as run,
        _recorder() as app,
        _recorder() as internal,
        _endless_head() as evil,
    ):
        user = await grant_targets(
            run, {"app": app.url + "/", "evil": f"http://127.0.0.1:{evil.port}/"}, email="framing@example.com"
        )
        yield Env(run, user, app, internal, evil)


# 1. malformed chunked bodies ----------------------------------------------------------

SMUGGLED = b"GET /t/app/smuggled HTTP/1.1\r\nHost: gw.example\r\n\r\n"
BAD_CHUNKS = [
    pytest.param(b"5;ext=a\nb\r\nhello\r\n0\r\n\r\n", id="bare-lf-in-extension"),
    pytest.param(b"5;ext=a\rb\r\nhello\r\n0\r\n\r\n", id="bare-cr-in-extension"),
    pytest.param(b"5\r\nhelloXX0\r\n\r\n", id="data-without-crlf"),
    pytest.param(b"5\r\nhello\n0\r\n\r\n", id="data-then-bare-lf"),
    pytest.param(b"5\r\nhello\r\n0\n\n", id="bare-lf-terminator"),
    pytest.param(b"5 x\r\nhello\r\n0\r\n\r\n", id="size-trailing-garbage"),
    pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="size-0x-prefix"),
    pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="negative-size"),
    pytest.param(b"+5\r\nhello\r\n0\r\n\r\n", id="signed-size"),
    pytest.param(b"10000000000000005\r\nhello\r\n0\r\n\r\n", id="size-overflows-64-bits"),
]


async def _post_bad_chunks(env: Env, body: bytes) -> list[Received]:
    """POST ``body`` as a chunked body with a request hidden behind it; assert the 400,
    answered at once and alone; return what the target received meanwhile."""
    before = len(env.app.requests)
    raw = env.head(b"POST", b"/t/app/chunked", b"Transfer-Encoding: chunked\r\n") + body + SMUGGLED
    started = time.monotonic()
    got = await env.send(raw)
    assert status_of(got) == 400, got[:300]
    assert got.count(b"HTTP/1.1 ") == 1, got[:600]
    assert b"\r\nConnection: close\r\n" in got.partition(b"\r\n\r\n")[0] + b"\r\n"
    assert time.monotonic() - started < READ_TIMEOUT / 2  # not left to the target's timeout
    await asyncio.sleep(0.2)
    assert "/smuggled" not in env.app.paths()
    return env.app.requests[before:]


@pytest.mark.parametrize("body", BAD_CHUNKS)
async def test_malformed_chunked_body_is_400_and_never_a_whole_request_upstream(
    env: Env, body: bytes
) -> None:
    """Sent twice. Cold (the session's first request, no pooled target connection): the
    bad framing is found while the cookie is looked up, so the target gets nothing at
    all. Warm (a keep-alive connection to the target): the head goes out as soon as it
    is parsed, since bodies stream, and the bad framing then cuts that connection, so
    the target sees its request break off, never a whole one."""
    assert await _post_bad_chunks(env, body) == []
    assert env.app.requests == []
    await env.healthy()
    late = await _post_bad_chunks(env, body)
    assert [(r.path, r.complete, bool(r.error)) for r in late] in ([], [("/chunked", False, True)]), late
    await env.healthy()


# 2. slow request bodies ----------------------------------------------------------------


async def _slow_body(env: Env, first: bytes, gap: float, pieces: int, page: bool) -> tuple[bytes, float]:
    """POST with ``Content-Length: 1000`` and ``first`` of its body, then ``pieces``
    single bytes ``gap`` seconds apart, then nothing; with ``page`` the connection starts
    with a gateway page (so aiohttp owns it). Return what came back and after how long
    the gateway closed (-1: it did not within 2.5 read timeouts)."""
    reader, writer = await open_raw(env.run.public_url, env.run.ssl)
    got = b""
    started = time.monotonic()
    closed = -1.0
    try:
        if page:
            writer.write(b"GET / HTTP/1.1\r\nHost: gw.example\r\n\r\n")
        writer.write(env.head(b"POST", b"/t/app/upload", b"Content-Length: 1000\r\n") + first)
        await writer.drain()
        sent = 0
        while time.monotonic() - started < READ_TIMEOUT * 2.5:
            if sent < pieces:
                with contextlib.suppress(ConnectionError):
                    writer.write(b"y")
                    await writer.drain()
                sent += 1
            try:
                chunk = await asyncio.wait_for(reader.read(65536), gap)
            except TimeoutError:
                continue
            except ConnectionError:
                chunk = b""
            got += chunk
            if not chunk:
                closed = time.monotonic() - started
                break
    finally:
        writer.close()
    return got, closed


@pytest.mark.parametrize(
    ("first", "gap", "pieces"),
    [
        pytest.param(b"", 0.2, 0, id="no-body-byte"),
        pytest.param(b"x" * 10, 0.2, 0, id="stopped"),
        pytest.param(b"x" * 10, READ_TIMEOUT * 1.5, 100, id="trickled"),
    ],
)
async def test_stalled_body_is_408_within_the_read_timeout(
    env: Env, first: bytes, gap: float, pieces: int
) -> None:
    """Head complete, then no body, a body that stops, or one byte per 1.5 read timeouts:
    the gateway answers 408 (the client stalled; the target is not blamed with a 504) and
    closes within about one read timeout, and the target, which got the head, never gets
    the whole body. The timeout restarts with every byte received (like nginx's
    ``client_body_timeout``), so a trickle faster than it is not cut by this timeout."""
    await env.healthy()
    got, closed = await _slow_body(env, first, gap, pieces, page=False)
    assert 0 < closed < READ_TIMEOUT * 2.2, (closed, got[:300])
    assert status_of(got) == 408, got[:300]
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head and body == b"", got
    await asyncio.sleep(0.2)
    upload = [r for r in env.app.requests if r.path == "/upload"]
    assert len(upload) == 1 and not upload[0].complete, upload
    await env.healthy()


async def test_stalled_body_on_a_connection_aiohttp_owns_is_cut_too(env: Env) -> None:
    """The same stall on ``/t/`` after a gateway page on the same connection (served by
    the aiohttp route, ``http_fallback``): answered 408 and closed."""
    await env.healthy()
    got, closed = await _slow_body(env, b"x" * 10, 0.2, 0, page=True)
    assert got.startswith(b"HTTP/1.1 200"), got[:300]
    assert b"HTTP/1.1 408" in got, got[-300:]
    assert 0 < closed < READ_TIMEOUT * 2.2, (closed, got[-300:])
    upload = [r for r in env.app.requests if r.path == "/upload"]
    assert len(upload) == 1 and not upload[0].complete, upload
    await env.healthy()


# 3. forged identity headers -----------------------------------------------------------


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param(b"X-Domum-User: admin\r\nX-Domum-Request: forged\r\n", id="as-named"),
        pytest.param(b"x-domum-user: admin\r\nx-domum-request: forged\r\n", id="lower-case"),
        pytest.param(
            b"X_Domum_User: admin\r\nX_Forwarded_For: 6.6.6.6\r\n",
            id="underscores",
        ),
        pytest.param(b"Connection: X-Domum-User\r\nX-Domum-User: admin\r\n", id="connection-names-user"),
        pytest.param(
            b"Connection: keep-alive, X-Forwarded-For, Forwarded, X-Forwarded-Host, X-Domum-Request\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\n",
            id="connection-names-forwarded-for",
        ),
    ],
)
async def test_target_sees_only_the_gateways_identity_headers(env: Env, forged: bytes) -> None:
    """Whatever the client forges, the target sees each of the gateway's identity and
    forwarding headers exactly once with the gateway's value, no ``Connection`` header,
    no header name with an underscore, and none of the client's values."""
    got = await env.send(env.head(b"GET", b"/t/app/who", forged + b"Connection: close\r\n"))
    assert status_of(got) == 200, got[:300]
    (seen,) = [r for r in env.app.requests if r.path == "/who"]
    user_id = env.run.gateway.public_ctx.sessions.live_sessions()[0].user_id
    expected = {
        b"x-domum-user": [user_id.encode()],
        b"x-domum-request": [env.user.request_id.encode()],
        b"x-forwarded-for": [b"127.0.0.1"],
        b"x-forwarded-proto": [b"https"],
        b"x-forwarded-host": [b"gw.example"],
        b"x-forwarded-prefix": [b"/t/app"],
        b"forwarded": [b'for=127.0.0.1;proto=https;host="gw.example"'],
    }
    identity: dict[bytes, list[bytes]] = {}
    for name, value in seen.headers:
        folded = name.lower().replace(b"_", b"-")
        if folded.startswith((b"x-domum", b"x-forwarded", b"forwarded")) or folded == b"connection":
            identity.setdefault(name.lower(), []).append(value)
    assert identity == expected
    assert all(b"_" not in name for name, _ in seen.headers), seen.headers
    assert not [v for _, v in seen.headers if b"admin" in v or b"6.6.6.6" in v or b"evil" in v]


# 4. hostile targets --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line_delay", "status"), [pytest.param(0.0, 502, id="flood"), pytest.param(0.05, 504, id="trickle")]
)
async def test_endless_response_head_is_a_gateway_error_in_bounded_time_and_memory(
    env: Env, line_delay: float, status: int
) -> None:
    """The target answers ``200 OK`` then header lines forever, as fast as the gateway
    reads (502: head too large, 64 KiB) or one line every 50 ms, which would take minutes
    to fill 64 KiB (504: the whole head must come within one read timeout; each line
    does not restart it). Either well within the test's 10 s and 10 MB bound, with the
    gateway's memory growing by less than a few MiB."""
    env.evil.line_delay = line_delay
    rss_before = rss_kib()
    started = time.monotonic()
    got = await env.send(env.head(b"GET", b"/t/evil/", b"Connection: close\r\n"), timeout=8)
    took = time.monotonic() - started
    assert status_of(got) == status, got[:300]
    assert b"X-a: b" not in got
    assert took < READ_TIMEOUT + 2.5, took
    for _ in range(50):
        if env.evil.sent:
            break
        await asyncio.sleep(0.05)
    assert env.evil.connections == 1 and env.evil.sent, env.evil
    # The gateway hung up long before the target's own bound (what it wrote counts what
    # the kernel buffered too, so only the bound is asserted).
    assert env.evil.sent[0] < env.evil.max_bytes and env.evil.cut[0] < READ_TIMEOUT + 2.5, env.evil
    assert rss_kib() - rss_before < 4 * 1024
    await env.healthy()


async def test_redirect_to_an_internal_server_is_returned_not_followed(env: Env) -> None:
    """README: redirects are returned, never followed. A Location on another origin than
    the target's is passed to the client as the target wrote it."""
    secret = f"http://127.0.0.1:{env.internal.port}/secret"
    env.app.redirect_to = secret
    got = await env.send(env.head(b"GET", b"/t/app/redirect", b"Connection: close\r\n"))
    assert status_of(got) == 302, got[:300]
    head = got.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert [line for line in head if line.lower().startswith(b"location:")] == [
        b"Location: " + secret.encode()
    ]
    await asyncio.sleep(0.3)
    assert env.internal.requests == []
    assert env.app.paths() == ["/redirect"]
