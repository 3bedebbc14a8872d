"""Real HTTP targets for the proxy tests: small aiohttp apps on 127.0.0.1, plain or TLS.

One app answers everything the proxy has to carry: an echo that reports exactly what
arrived (method, raw path, header lines, body size), big bodies both ways, a slow and a
stalling answer, redirects and cookies to rewrite, server-sent events and a websocket
echo that can close with a chosen code. Every app counts its hits, so a test can prove a
request never reached it. ``signed_by`` makes a server certificate from a CA on disk
(the gateway's own test CA, or a separate one the gateway does not trust).

``grant_targets`` registers targets, grants them and signs a user in through the real
login service; ``raw_exchange`` writes hand-made bytes on a TLS socket (clients
normalise paths and headers, so tricks must be written by hand); ``gateway_with`` starts
a gateway with settings overrides (short proxy timeouts, host mode).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from domum_gateway.pki import ensure_ca, ensure_leaf

__all__ = [
    "ProxyEnv",
    "Upstream",
    "ca_pair",
    "gateway_with",
    "grant_targets",
    "raw_exchange",
    "signed_by",
    "start_upstream",
    "status_of",
]


@dataclass
class Upstream:
    url: str  # scheme://127.0.0.1:port
    port: int
    hits: list[str] = field(default_factory=list)  # raw paths, in arrival order
    ws_closed: list[tuple[int | None, str]] = field(default_factory=list)
    ws_open: int = 0
    last_headers: list[tuple[str, str]] = field(default_factory=list)
    stall: asyncio.Event = field(default_factory=asyncio.Event)


def ca_pair(folder: Path) -> tuple[Path, Path]:
    """A CA (cert, key) under ``folder`` (created once)."""
    cert, key = folder / "ca.crt", folder / "ca.key"
    ensure_ca(cert, key)
    return cert, key


def signed_by(ca_cert: Path, ca_key: Path, folder: Path, name: str = "127.0.0.1") -> ssl.SSLContext:
    """A server TLS context whose certificate (for ``name``, 127.0.0.1, localhost) ``ca`` signed."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "upstream.crt", folder / "upstream.key"
    ensure_leaf(cert, key, ca_cert, ca_key, name)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _app(up: Upstream) -> web.Application:
    app = web.Application(client_max_size=1024**3 * 2)

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        up.hits.append(request.raw_path)
        up.last_headers = [(k, v) for k, v in request.headers.items()]
        result: web.StreamResponse = await handler(request)
        return result

    app.middlewares.append(count)

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "chunked": request.headers.get("Transfer-Encoding", ""),
            },
            headers={
                "X-Upstream": "echo",
                "Connection": "X-Hop",
                "X-Hop": "must-go",
                "Keep-Alive": "timeout=5",
            },
        )

    async def upload(request: web.Request) -> web.Response:
        total = 0
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if request.query.get("hash"):
                digest.update(chunk)
        return web.json_response({"received": total, "sha256": digest.hexdigest()})

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("n", "1048576"))
        block = int(request.query.get("block", "65536"))
        chunked = request.query.get("chunked") == "1"
        resp = web.StreamResponse()
        resp.content_type = "application/octet-stream"
        if not chunked:
            resp.content_length = size
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        piece = bytes(range(256)) * (block // 256 + 1)
        piece = piece[:block]
        sent = 0
        while sent < size:
            n = min(block, size - sent)
            await resp.write(piece[:n] if n < block else piece)
            sent += n
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "5")))
        return web.Response(text="finally")

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 100
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        await up.stall.wait()
        return resp

    async def redirect(request: web.Request) -> web.Response:
        to = request.query.get("to", "/landing")
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": to, "Content-Location": to})

    async def cookies(request: web.Request) -> web.Response:
        resp = web.Response(text="cookies")
        resp.headers.add("Set-Cookie", "app=1; Path=/; HttpOnly")
        resp.headers.add("Set-Cookie", "scoped=2; Path=/app/area; Domain=127.0.0.1")
        resp.headers.add("Set-Cookie", "__Host-domum=evil; Path=/; Secure")
        resp.headers.add("Set-Cookie", "plain=3")
        return resp

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        count = int(request.query.get("count", "3"))
        interval = float(request.query.get("interval", "0.3"))
        try:
            for i in range(count):
                await resp.write(f"id: {i}\ndata: event {i}\n\n".encode())
                await asyncio.sleep(interval)
            await resp.write_eof()
        except ConnectionError:
            pass  # the gateway cut the stream (revoked session): expected in some tests
        return resp

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(protocols=("chat", "other"))
        await sock.prepare(request)
        up.ws_open += 1
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    _, code, reason = msg.data.split(":", 2)
                    await sock.close(code=int(code), message=reason.encode())
                    break
                await sock.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        up.ws_closed.append((sock.close_code, ""))
        return sock

    async def head_check(request: web.Request) -> web.Response:
        return web.Response(body=b"0123456789", headers={"X-Len": "10"})

    async def no_length(request: web.Request) -> web.StreamResponse:
        # HTTP/1.0-style body delimited by closing the connection.
        resp = web.StreamResponse()
        resp.force_close()
        await resp.prepare(request)
        await resp.write(b"until-close " * 100)
        await resp.write_eof()
        return resp

    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/download", download)
    app.router.add_get("/slow", slow)
    app.router.add_get("/stall", stall)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/app/redirect", redirect)
    app.router.add_get("/cookies", cookies)
    app.router.add_get("/sse", sse)
    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/head", head_check)
    app.router.add_get("/noclen", no_length)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


@asynccontextmanager
async def start_upstream(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Upstream]:
    """An upstream app on 127.0.0.1 (TLS when ``ssl_context`` is given)."""
    up = Upstream(url="", port=0)
    runner = web.AppRunner(_app(up), access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = int(runner.addresses[0][1])
    up.port = port
    up.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
    try:
        yield up
    finally:
        up.stall.set()
        await runner.cleanup()


@dataclass
class ProxyEnv:
    """A signed-in remote user whose grant reaches the named targets."""

    public_url: str
    ssl: ssl.SSLContext
    cookie: str
    request_id: str
    target_ids: dict[str, str]

    @property
    def host_port(self) -> tuple[str, int]:
        rest = self.public_url.split("://", 1)[1]
        host, _, port = rest.rpartition(":")
        return host, int(port)

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Cookie": f"__Host-domum={self.cookie}", **extra}


async def grant_targets(
    run: Any, targets: dict[str, str], *, tls_verify: dict[str, bool] | None = None, email: str = ""
) -> ProxyEnv:
    """Register ``targets`` (name -> URL), grant them all, log in; return the session."""
    from ..integration.helpers import call, create_forwarded, login_direct, seed

    names = list(targets)
    verify = tls_verify or {}
    ids: dict[str, str] = {}
    async with run.admin() as s:
        for name in names[1:]:
            body: dict[str, Any] = {"name": name, "protocol": "http", "url": targets[name]}
            if name in verify:
                body["tls_verify"] = verify[name]
            st, t = await call(s, "POST", "/api/v1/targets", body)
            assert st == 201, t
            ids[name] = t["id"]
    first: dict[str, Any] = {"name": names[0], "protocol": "http", "url": targets[names[0]]}
    if names[0] in verify:
        first["tls_verify"] = verify[names[0]]
    sd = await seed(run, email=email or f"{names[0]}@example.com", target=first, policy={"targets": names})
    ids[names[0]] = sd.target_id
    request_id, link = await create_forwarded(run, sd)
    cookie = await login_direct(run, sd, link)
    return ProxyEnv(run.public_url, run.ssl, cookie, request_id, ids)


async def raw_exchange(env: ProxyEnv, data: bytes, timeout: float = 5.0) -> bytes:
    """Write ``data`` on a fresh TLS connection to the gateway; read until it closes."""
    host, port = env.host_port
    reader, writer = await asyncio.open_connection(host, port, ssl=env.ssl, server_hostname=host)
    try:
        writer.write(data)
        await writer.drain()
        chunks: list[bytes] = []
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def status_of(response: bytes) -> int:
    """The status code of the first response in ``response`` (0 when there is none)."""
    line = response.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def gateway_with(tmp: Path, mailbox: Any, **overrides: Any) -> AbstractAsyncContextManager[Any]:
    """A gateway like the ``running`` fixture, with settings overrides (``proxy=...``)."""
    from .public_client import gateway_with as with_overrides

    return with_overrides(tmp, mailbox, **overrides)
