"""``/t/`` requests that arrive on a connection aiohttp already owns.

A connection whose first request was a gateway page (login, portal) belongs to aiohttp
for the rest of its life; when the browser reuses it for a proxied request, the aiohttp
route lands here. The same :class:`~.http_front.Exchange` runs it (same admission, same
header rules, same target pool), with the response bytes written to the transport as
they come; aiohttp is then handed a response that says it was already sent, and closes
the connection, so the browser's next connection starts on the fast path again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from .http_front import CONNECTING, FINISHED, PENDING, READY, SENT, Exchange, FrontProtocol

if TYPE_CHECKING:
    from .http_proxy import HttpProxy

__all__ = ["serve_on_aiohttp"]

_HTTP_MODE = 1  # FrontProtocol's mode for "parsing HTTP" (bytes after a 101 are tunnelled)


class _Sent(web.StreamResponse):
    """What the aiohttp handler returns after writing the response itself."""

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class _TunnelReader:
    """Stands in for aiohttp's websocket reader: client bytes go straight to the target."""

    def __init__(self, front: _AioFront) -> None:
        self._front = front

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._front.data_received(data)
        return False, b""

    def feed_eof(self) -> None:
        self._front.close()


class _AioFront(FrontProtocol):
    """A :class:`FrontProtocol` for one exchange on an aiohttp-owned transport."""

    __slots__ = ("_admission", "_done", "_request", "_upstream_ready")

    def __init__(self, engine: HttpProxy, request: web.Request) -> None:
        super().__init__(engine, asyncio.Protocol)
        self._request = request
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._upstream_ready = asyncio.Event()
        self._upstream_ready.set()
        self._admission = asyncio.Event()
        transport = request.transport
        assert transport is not None
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer_host = str(peer[0]) if peer else "0.0.0.0"
        self.peer = engine.peer_of(self.peer_host)
        self.mode = _HTTP_MODE
        self.last_active = engine.now()

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(data)
        if t.get_write_buffer_size() > 256 * 1024 and not self.write_paused:
            self.pause_writing()
            self.engine.spawned(asyncio.ensure_future(self._drain()))

    def write_two(self, first: bytes, second: bytes) -> None:
        self.write(first)
        self.write(second)

    async def _drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._request.writer.drain()
        if self.write_paused:
            self.resume_writing()

    def pause(self, bit: int) -> None:
        # Stop pumping the request body (aiohttp's reader then pauses the socket itself).
        self.pause_bits |= bit
        self._upstream_ready.clear()

    def resume(self, bit: int) -> None:
        self.pause_bits &= ~bit
        if not self.pause_bits:
            self._upstream_ready.set()

    def admitted(self, ex: Exchange) -> None:
        self._admission.set()

    def finished(self, ex: Exchange) -> None:
        if not ex.req_done and not ex.client_close:
            return
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
            ex.state = FINISHED
            self.engine.record(ex)
        if not ex.req_done:
            # Answered (408, 400...) before the body ended: nothing more is read from this
            # client, so the connection ends here rather than when the client gives up.
            t = self.transport
            if t is not None and not t.is_closing():
                t.close()
        self._finish()

    def start_tunnel(self, ex: Exchange) -> None:
        super().start_tunnel(ex)
        # aiohttp holds what the client sends after an upgrade until a reader is set.
        self._request.protocol.set_parser(cast(Any, _TunnelReader(self)))

    def close(self) -> None:
        self._finish()

    def abort(self) -> None:
        t = self.transport
        if t is not None:
            t.abort()
        self._finish()

    def _finish(self) -> None:
        if self.tunnel is not None:
            t = self.transport
            if t is not None and not t.is_closing():
                t.close()
        self._teardown()
        if not self._done.done():
            self._done.set_result(None)

    async def run(self, ex: Exchange) -> None:
        """Admit and proxy ``ex``, pumping the request body from aiohttp's reader."""
        self.queue.append(ex)
        self.engine.admit(ex)
        if ex.state == PENDING:
            await self._admission.wait()
        if self._done.done():
            return
        self.begin(ex)
        if ex.state in (READY, CONNECTING, SENT) and not ex.websocket:
            with contextlib.suppress(ConnectionError):  # the client left, or was answered
                async for chunk in self._request.content.iter_any():
                    await self._upstream_ready.wait()
                    if self._done.done() or ex.state == FINISHED:
                        break
                    ex.client_body(chunk)
        if not self._done.done():
            ex.client_done()
        await self._done


async def serve_on_aiohttp(engine: HttpProxy, request: web.Request) -> web.StreamResponse:
    """Proxy one ``/t/`` request that aiohttp parsed; always closes the connection after."""
    if request.transport is None:
        raise web.HTTPBadRequest()
    front = _AioFront(engine, request)
    ex = Exchange(front, engine.now())
    ex.url = request.raw_path.encode("utf-8", "surrogateescape")
    ex.headers = list(request.raw_headers)
    ex.in_head = False
    ex.method = request.method.encode("ascii", "replace")
    ex.http11 = request.version >= (1, 1)
    ex.keep_alive = False  # Connection: close, so that the next connection is the fast path's
    try:
        await front.run(ex)
    except asyncio.CancelledError:
        front.abort()
        raise
    sent = _Sent()
    sent.force_close()
    return sent
