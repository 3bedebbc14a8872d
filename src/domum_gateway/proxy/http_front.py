"""The public listener's connection protocol: proxied requests on a fast path, the rest to aiohttp.

Each TLS connection of the public listener starts here. At every request boundary the
first bytes are peeked: a request for a target (``/t/...`` on the main host, or any path
on a ``{target}.{domain}`` host) is parsed with httptools (llhttp) and proxied by an
:class:`Exchange` straight between two transports; anything else hands the connection,
with the bytes read so far, to aiohttp's own ``RequestHandler`` for good (login pages,
portal, terminals, tunnels). A later ``/t/`` request on such a connection is served by
the slower aiohttp route in ``http_proxy``, which answers with ``Connection: close`` so
the browser's next connection comes back here.

Responses leave in request order: exchanges queue in :attr:`FrontProtocol.queue` and
only the first writes. Reading pauses while a pipelined request waits, while a target
cannot take the request body as fast as it comes, and while a request body arrives
before the target connection is ready; each pause keeps the buffered data bounded.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import httptools
from aiohttp import web

from ..auth.origin import IPAddress
from ..errors import UpstreamError, UpstreamTimeout
from .http_wire import ChunkScanner, RequestScan, ResponseHead
from .sessions import Connection, LiveSession
from .upstream import Route, UpstreamConnection, UpstreamFailure

if TYPE_CHECKING:
    from .http_proxy import HttpProxy

__all__ = ["Exchange", "FrontProtocol", "FrontSite", "LocalResponse", "WsFrames"]

log = logging.getLogger("domum.proxy.front")

# Connection modes: peeking at a request boundary, parsing HTTP, tunnelling a websocket,
# holding (reading nothing more, answering what is queued), closed.
_PEEK, _HTTP, _TUNNEL, _CLOSED, _HOLD = range(5)
# Why reading is paused (bits): a pipelined request waits, the target's socket is full,
# a request body arrives before the target connection is ready.
_P_PIPELINE, _P_UPSTREAM, _P_BODY = 1, 2, 4
_MAX_PEEK = 65536
_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_MAX_PENDING_BODY = 256 * 1024
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Exchange states
NEW, PENDING, READY, LOCAL, CONNECTING, SENT, FINISHED = range(7)


class LocalResponse:
    """A response the gateway writes itself (error pages, redirects, the host-mode handoff)."""

    __slots__ = ("body", "headers", "status", "status_line")

    def __init__(self, status: int, reason: str, headers: list[bytes], body: bytes) -> None:
        self.status = status
        self.status_line = f"HTTP/1.1 {status} {reason}".encode()
        self.headers = headers
        self.body = body

    def encode(self, head_only: bool, close: bool, date: bytes) -> bytes:
        lines = [self.status_line, date, *self.headers, b"Content-Length: %d" % len(self.body)]
        if close:
            lines.append(b"Connection: close")
        out = b"\r\n".join(lines) + b"\r\n\r\n"
        return out if head_only else out + self.body


class WsFrames:
    """Tracks websocket frame boundaries in one direction, so a close frame can be injected."""

    __slots__ = ("_head", "_remaining")

    def __init__(self) -> None:
        self._remaining = 0
        self._head = b""

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and not self._head

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self._remaining:
                take = min(self._remaining, n - pos)
                pos += take
                self._remaining -= take
                continue
            head = self._head + data[pos : pos + 14]
            if len(head) < 2:
                self._head = head
                return
            b1 = head[1]
            size = b1 & 0x7F
            need = 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if b1 & 0x80 else 0)
            if len(head) < need:
                self._head = head
                return
            if size == 126:
                size = struct.unpack_from("!H", head, 2)[0]
            elif size == 127:
                size = struct.unpack_from("!Q", head, 2)[0]
            pos += need - len(self._head)
            self._head = b""
            self._remaining = size


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked websocket close frame (server to client)."""
    payload = struct.pack("!H", code) + reason.encode()[:123]
    return bytes((0x88, len(payload))) + payload


class Exchange:
    """One proxied request and its response.

    Attributes that most requests never change are class-level defaults (no ``__slots__``):
    a new exchange then costs two assignments, not forty.
    """

    state = NEW
    admit_flags = 0  # store lookups already done: 1 session, 2 routes
    url = b""
    in_head = True
    method = b"GET"
    http11 = True
    keep_alive = True
    websocket = False
    host_mode = False
    route: Route | None = None
    live: LiveSession | None = None
    client: IPAddress | None = None  # the address decided on (X-Forwarded-For behind a proxy)
    local: LocalResponse | None = None
    upstream_head = b""
    body_framing = 0  # 0: none, 1: as sent (Content-Length), 2: re-chunked
    conn: UpstreamConnection | None = None
    pending: list[bytes] | None = None
    pending_size = 0
    req_done = False
    resp_started = False
    resp_done = False
    client_close = False
    retried = False
    rechunk = False
    dechunk: ChunkScanner | None = None
    head: ResponseHead | None = None
    status = 0
    bytes_in = 0
    bytes_out = 0
    early_data = b""
    ws_frames: WsFrames | None = None
    ws_last_touch = 0.0
    registry: Connection | None = None  # the websocket in the session's live registry

    def __init__(self, front: FrontProtocol, now: float) -> None:
        self.front = front
        self.started = now
        self.headers: list[tuple[bytes, bytes]] = []

    # client side ---------------------------------------------------------------
    def client_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        state = self.state
        if state == SENT:
            conn = self.conn
            if conn is not None:
                if self.body_framing == 2:
                    conn.write(b"%x\r\n" % len(data) + data + b"\r\n")
                else:
                    conn.write(data)
        elif state in (LOCAL, FINISHED):
            return  # answered already; the body is read and dropped
        else:
            if self.pending is None:
                self.pending = []
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > _MAX_PENDING_BODY:
                self.front.pause(_P_BODY)

    def client_done(self) -> None:
        self.req_done = True
        if self.state == SENT and self.conn is not None and self.body_framing == 2:
            self.conn.write(b"0\r\n\r\n")
        if self.resp_done:
            self.front.finished(self)

    def attach(self, conn: UpstreamConnection) -> None:
        """Send the request on ``conn`` (the exchange is first in the queue)."""
        self.conn = conn
        self.state = SENT
        conn.start(self, self.upstream_head, self.method)
        if self.pending:
            chunks, self.pending, self.pending_size = self.pending, None, 0
            for data in chunks:
                conn.write(b"%x\r\n" % len(data) + data + b"\r\n" if self.body_framing == 2 else data)
            self.front.resume(_P_BODY)
        if self.req_done and self.body_framing == 2:
            conn.write(b"0\r\n\r\n")
        if self.early_data:
            conn.write(self.early_data)
            self.early_data = b""
        if self.front.write_paused:
            conn.pause_reading()

    def connected(self, conn: UpstreamConnection | None, error: UpstreamFailure | None) -> None:
        if self.state != CONNECTING or self.front.transport is None:
            if conn is not None:
                conn.close()
            return
        if conn is None:
            self.on_upstream_error(error or UpstreamError("connect failed"), False)
        else:
            self.attach(conn)

    def cancel(self) -> None:
        """The client went away: drop the target connection."""
        conn, self.conn = self.conn, None
        self.state = FINISHED
        if conn is not None:
            conn.abort()

    # Sink: target side -----------------------------------------------------------
    def on_response_head(self, head: ResponseHead, body: bytes) -> None:
        """The target's head (and, for a small answer, its whole ``body``): one write."""
        front = self.front
        status = head.status
        block = head.block
        if status < 200 and status != 101:
            if self.http11:
                front.write(block + b"\r\n")
            return
        self.head = head
        self.status = status
        self.resp_started = True
        route = self.route
        assert route is not None
        if head.rewrite:
            block = front.engine.rewrite_head(block, route, self.host_mode)
        if status == 101:
            if not self.websocket or head.upgrade != b"websocket":
                self._fail_upstream(UpstreamError("unexpected 101 from the target"))
                return
            front.write(block + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            front.start_tunnel(self)
            return
        framing = head.framing
        if framing != "length" and framing != "none":
            if framing == "chunked":
                if self.http11:
                    block += b"Transfer-Encoding: chunked\r\n"
                else:
                    self.dechunk = ChunkScanner(decode=True)
                    self.client_close = True
            elif self.http11 and self.keep_alive:  # "close": re-framed as chunked
                self.rechunk = True
                block += b"Transfer-Encoding: chunked\r\n"
            else:
                self.client_close = True
        if self.websocket:
            self.client_close = True  # the parser stopped at the upgrade: nothing can follow
        if self.client_close or not self.keep_alive or front.doomed:
            self.client_close = True
            block += b"Connection: close\r\n"
        if not body:
            front.write(block + b"\r\n")
            return
        self.bytes_out += len(body)
        if len(body) <= 16384:
            front.write(block + b"\r\n" + body)
        else:
            front.write_two(block + b"\r\n", body)  # one flush, no copy of the body

    def on_response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        front = self.front
        if self.rechunk:
            front.write(b"%x\r\n" % len(data) + data + b"\r\n")
        elif self.dechunk is not None:
            self.dechunk.feed(data)
            if self.dechunk.out:
                front.write(b"".join(self.dechunk.out))
                self.dechunk.out.clear()
        else:
            front.write(data)

    def on_response_end(self) -> None:
        if self.rechunk:
            self.front.write(b"0\r\n\r\n")
        conn, self.conn = self.conn, None
        head = self.head
        if conn is not None:
            conn.finish(self.req_done and head is not None and head.keep_alive)
        self.resp_done = True
        if not self.req_done:
            # The target answered before the whole request arrived: close after this.
            self.client_close = True
        self.front.finished(self)

    def on_upstream_error(self, exc: UpstreamFailure, retryable: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        if self.state == FINISHED:
            return
        route = self.route
        if (
            retryable
            and not self.retried
            and route is not None
            and self.req_done
            and self.bytes_in == 0
            and self.method in _IDEMPOTENT
        ):
            # A pooled connection the target had closed: try once on a fresh one.
            self.retried = True
            self.state = CONNECTING
            route.pool.connect(self.connected)
            return
        self._fail_upstream(exc)

    def _fail_upstream(self, exc: UpstreamFailure) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        front = self.front
        route = self.route
        timeout = isinstance(exc, UpstreamTimeout)
        if (
            timeout
            and self.state == SENT
            and not (self.req_done or self.resp_started or front.pause_bits & _P_UPSTREAM)
        ):
            # The target waits for the rest of a body the client stopped sending (and the
            # target was not holding it back): the client's timeout, not the target's.
            self.local = LocalResponse(408, "Request Timeout", [], b"")
            front.write_local(self)
            return
        front.engine.upstream_failed(self, exc)
        if self.resp_started:
            # Part of the answer is on its way: the client must see a broken message.
            self.status = self.status or 502
            self.state = FINISHED
            front.abort()
            return
        self.local = front.engine.gateway_error_page(route, timeout, self)
        self.status = self.local.status
        self.state = LOCAL
        front.write_local(self)

    def on_tunnel_data(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.registry is not None:
            self.registry.bytes_out += len(data)
        frames = self.ws_frames
        if frames is not None:
            frames.feed(data)
        self.front.write(data)

    def on_tunnel_closed(self) -> None:
        self.front.close()

    def sink_pause_client(self) -> None:
        self.front.pause(_P_UPSTREAM)

    def sink_resume_client(self) -> None:
        self.front.resume(_P_UPSTREAM)


class FrontProtocol(asyncio.Protocol):
    """One client connection of the public listener."""

    __slots__ = (
        "_aio",
        "_in_message",
        "_loop_time",
        "_peek",
        "boundary",
        "closing",
        "doomed",
        "engine",
        "handoff_data",
        "head_started",
        "last_active",
        "last_scan",
        "mode",
        "parser",
        "parsing",
        "pause_bits",
        "peer",
        "peer_host",
        "queue",
        "suffix",
        "suffix_key",
        "transport",
        "tunnel",
        "watched",
        "write_paused",
        "write_paused_at",
    )

    def __init__(self, engine: HttpProxy, aio_factory: Callable[[], asyncio.Protocol]) -> None:
        self.engine = engine
        self._aio = aio_factory
        self._loop_time = engine.now
        self.transport: asyncio.Transport | None = None
        self.closing: asyncio.Transport | None = None
        self.mode = _PEEK
        self._peek = b""
        self.parser: httptools.HttpRequestParser | None = None
        self.queue: collections.deque[Exchange] = collections.deque()
        self.parsing: Exchange | None = None
        self.pause_bits = 0
        self.write_paused = False
        self.write_paused_at = 0.0
        self.boundary = True
        self._in_message = False
        self.doomed = False
        self.handoff_data: bytes | None = None
        self.head_started = 0.0
        self.last_active = 0.0
        self.peer: IPAddress | None = None
        self.peer_host = "0.0.0.0"
        self.tunnel: Exchange | None = None
        self.watched: dict[str, Callable[[], None]] = {}
        # The last target's closing head lines (X-Forwarded-*, identity) and what they were for.
        self.suffix_key: tuple[object, ...] | None = None
        self.suffix = b""
        self.last_scan: tuple[list[tuple[bytes, bytes]], RequestScan] | None = None

    # asyncio callbacks ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but behaves as one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=256 * 1024)
        peer = transport.get_extra_info("peername")
        self.peer_host = str(peer[0]) if peer else "0.0.0.0"
        self.peer = self.engine.peer_of(self.peer_host)
        self.last_active = self._loop_time()
        self.engine.fronts.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown()
        self.closing = None
        self.engine.fronts.discard(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = self._loop_time()
        ex = self.tunnel or (self.queue[0] if self.queue else None)
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.tunnel or (self.queue[0] if self.queue else None)
        if ex is not None and ex.conn is not None:
            ex.conn.resume_reading()

    def data_received(self, data: bytes) -> None:
        mode = self.mode
        if mode == _HTTP:
            self._feed(data)
        elif mode == _PEEK:
            self._peek_data(data)
        elif mode == _TUNNEL:
            ex = self.tunnel
            if ex is not None and ex.conn is not None:
                ex.bytes_in += len(data)
                if ex.registry is not None:
                    ex.registry.bytes_in += len(data)
                ex.conn.write(data)
                self.touch(ex)

    # routing at a request boundary -------------------------------------------------
    def _peek_data(self, data: bytes) -> None:
        buf = self._peek + data if self._peek else data
        while buf.startswith(b"\r\n"):
            buf = buf[2:]
        nl = buf.find(b"\n")
        if nl >= 0 and not self.engine.domain:
            sp = buf.find(b" ", 0, nl)
            proxied = sp > 0 and buf.startswith(b"/t/", sp + 1)
        else:
            proxied = False
        if not proxied:
            # Hand a request to aiohttp only with its whole head: aiohttp has no timeout for
            # a head that trickles in, this protocol has (the sweep's head timeout).
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_PEEK:
                    self._handoff(buf)  # aiohttp answers 431
                    return
                self._peek = buf
                if buf and not self.head_started and not self.queue:
                    self.head_started = self._loop_time()
                return
            if self.engine.domain:
                proxied = self.engine.is_proxied_head(buf, end)
        self._peek = b""
        if not proxied:
            self.head_started = 0.0
            self._handoff(buf)
            return
        self.mode = _HTTP
        if self.parser is None:
            self.parser = httptools.HttpRequestParser(self)
        self.last_active = self._loop_time()
        self._feed(buf)

    def _handoff(self, buf: bytes) -> None:
        """Give the connection to aiohttp, once nothing of ours is in flight."""
        if self.queue:
            self.handoff_data = buf
            self.mode = _HOLD  # read nothing more until the queue drains
            self.pause(_P_PIPELINE)
            return
        transport = self.transport
        if transport is None:
            return
        self.engine.fronts.discard(self)
        self._unwatch()
        self.mode = _CLOSED
        self.transport = None
        if self.pause_bits:
            self.pause_bits = 0
            transport.resume_reading()
        handler = self._aio()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if buf:
            handler.data_received(buf)

    def _feed(self, data: bytes) -> None:
        parser = self.parser
        assert parser is not None
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = int(exc.args[0]) if exc.args else len(data)
            self._upgrade(data[offset:])
            return
        except httptools.HttpParserCallbackError:
            log.exception("proxy.callback_failed")
            self.abort()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        if self.boundary and self.mode == _HTTP:
            self.mode = _PEEK

    # httptools callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        now = self._loop_time()
        ex = Exchange(self, now)
        self.parsing = ex
        self.boundary = False
        self._in_message = True
        self.head_started = self.head_started or now  # from the first byte seen, if peeked
        if self.queue:
            self.pause(_P_PIPELINE)
        self.queue.append(ex)

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.url = ex.url + url if ex.url else url

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        if ex is not None and ex.in_head:
            ex.headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.parsing
        parser = self.parser
        assert ex is not None and parser is not None
        ex.in_head = False
        self.head_started = 0.0
        ex.method = parser.get_method()
        ex.http11 = parser.get_http_version() == "1.1"
        ex.keep_alive = parser.should_keep_alive()
        self.engine.admit(ex)
        if self.queue and self.queue[0] is ex:
            self.begin(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.client_body(body)

    def on_message_complete(self) -> None:
        ex = self.parsing
        self.parsing = None
        self.boundary = True
        self._in_message = False
        if ex is not None:
            ex.client_done()

    # exchanges -----------------------------------------------------------------------
    def begin(self, ex: Exchange) -> None:
        """Start ``ex``, which is first in the queue, once its admission is known."""
        state = ex.state
        if state == READY:
            route = ex.route
            assert route is not None
            conn = route.pool.acquire()
            if conn is not None:
                ex.attach(conn)
            else:
                ex.state = CONNECTING
                route.pool.connect(ex.connected)
        elif state == LOCAL:
            self.write_local(ex)

    def admitted(self, ex: Exchange) -> None:
        """An admission that needed the store has finished."""
        if self.transport is None:
            return
        if self.queue and self.queue[0] is ex:
            self.begin(ex)

    def write_local(self, ex: Exchange) -> None:
        local = ex.local
        assert local is not None
        ex.state = LOCAL
        ex.status = local.status
        ex.resp_started = True
        if not ex.req_done or not ex.keep_alive or self.doomed:
            ex.client_close = True
        self.write(local.encode(ex.method == b"HEAD", ex.client_close, self.engine.date_line))
        ex.resp_done = True
        self.finished(ex)

    def finished(self, ex: Exchange) -> None:
        """``ex`` has been answered in full (or given up)."""
        if not self.queue or self.queue[0] is not ex:
            return
        if not ex.req_done and not ex.client_close:
            return  # still reading the request body
        self.queue.popleft()
        ex.state = FINISHED
        self.engine.record(ex)
        if ex.client_close or self.doomed:
            self.close()
            return
        self.last_active = self._loop_time()
        if self.queue:
            nxt = self.queue[0]
            if len(self.queue) == 1:
                self.resume(_P_PIPELINE)
            if not nxt.in_head:
                self.begin(nxt)
            return
        if self.handoff_data is not None:
            data, self.handoff_data = self.handoff_data, None
            self._handoff(data)
            return
        self.resume(_P_PIPELINE)

    # websockets ----------------------------------------------------------------------
    def _upgrade(self, rest: bytes) -> None:
        """The parser stopped after an upgrade request; ``rest`` is what followed it."""
        ex = self.queue[-1] if self.queue else None
        if ex is None or not ex.websocket or ex.state in (LOCAL, FINISHED):
            # An upgrade we do not pass on (h2c, or one already refused): answer, then close.
            self.doomed = True
            self.mode = _HOLD
            if not self.queue:
                self.close()
            return
        ex.early_data = rest
        self.mode = _HOLD  # nothing is parsed any more; bytes wait for the tunnel
        self.pause(_P_PIPELINE)
        if ex.conn is not None and rest:
            ex.conn.write(rest)
            ex.early_data = b""

    def start_tunnel(self, ex: Exchange) -> None:
        conn = ex.conn
        assert conn is not None and ex.live is not None
        conn.tunnel()
        self.tunnel = ex
        ex.ws_frames = WsFrames()
        self.mode = _TUNNEL
        self.pause_bits &= ~_P_PIPELINE
        if self.transport is not None and not self.pause_bits:
            self.transport.resume_reading()
        self.engine.tunnel_opened(ex, self.cut_tunnel)

    def cut_tunnel(self, reason: str, code: int = 1008) -> None:
        """End a websocket now: a close frame when the stream allows it, then close."""
        ex = self.tunnel
        transport = self.transport
        if ex is None or transport is None:
            return
        frames = ex.ws_frames
        if frames is not None and frames.at_boundary and not transport.is_closing():
            transport.write(close_frame(code, reason))
        conn, ex.conn = ex.conn, None
        if conn is not None:
            conn.abort()
        self.close()

    def touch(self, ex: Exchange) -> None:
        """The user sent bytes on a proxied websocket: activity (the upstream's alone is not)."""
        live = ex.live
        if live is None:
            return
        live.active()
        now = self._loop_time()
        if now - ex.ws_last_touch >= 1.0:
            ex.ws_last_touch = now
            self.engine.touch(live)

    # sessions ------------------------------------------------------------------------
    def watch(self, live: LiveSession) -> None:
        """Close this connection when ``live`` ends (once per session and connection)."""
        if live.id not in self.watched:
            self._watch_with(live, self._session_ended)

    def _watch_with(self, live: LiveSession, closer: Callable[[str], None]) -> None:
        self.watched[live.id] = self.engine.sessions.attach(live, closer)

    def _session_ended(self, reason: str) -> None:
        if self.engine.admitting is self:
            # Ended by the request being admitted: it still gets its page, then we close.
            self.doomed = True
            return
        if self.tunnel is not None:
            self.cut_tunnel(reason)
        elif self.queue:
            self.abort()
        else:
            self.close()

    def _unwatch(self) -> None:
        watched, self.watched = self.watched, {}
        for detach in watched.values():
            detach()

    # output and teardown -------------------------------------------------------------
    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None:
            t.write(data)

    def write_two(self, first: bytes, second: bytes) -> None:
        t = self.transport
        if t is not None:
            t.writelines((first, second))

    def pause(self, bit: int) -> None:
        if not self.pause_bits and self.transport is not None:
            self.transport.pause_reading()
        self.pause_bits |= bit

    def resume(self, bit: int) -> None:
        if self.pause_bits & bit:
            self.pause_bits &= ~bit
            if not self.pause_bits and self.transport is not None and self.mode < _CLOSED:
                self.transport.resume_reading()

    def _bad_request(self) -> None:
        """The parser refused the bytes: answer 400 and close, after what is queued."""
        self.mode = _HOLD
        if self.transport is None:
            return  # closed while the same read was being parsed
        ex = self.queue[-1] if self.queue else None
        if ex is not None and ex.req_done:
            self.doomed = True  # bytes after a whole request: answer that one, then close
            return
        if ex is None:
            ex = Exchange(self, self._loop_time())
            self.queue.append(ex)
        elif not ex.in_head:
            # A malformed body: the target must never get the rest of it (it would wait
            # for the read timeout, then the client would see the target blamed).
            conn, ex.conn = ex.conn, None
            if conn is not None:
                conn.abort()
            if ex.resp_started:
                self.abort()
                return
        ex.in_head = False
        ex.req_done = True
        ex.keep_alive = False
        ex.local = self.engine.bad_request_page()
        ex.state = LOCAL
        if self.queue[0] is ex:
            self.write_local(ex)

    def close(self) -> None:
        """Close after what is already written has been sent."""
        t = self.transport
        self.mode = _CLOSED
        if t is not None and not t.is_closing():
            t.close()
        self._teardown()

    def abort(self) -> None:
        t = self.transport
        self.mode = _CLOSED
        if t is not None:
            t.abort()
        self._teardown()

    def _teardown(self) -> None:
        if self.transport is None and not self.queue and self.tunnel is None:
            return
        self.mode = _CLOSED
        # A closed TLS transport may still be waiting for the peer's close_notify: the
        # engine aborts what is left at shutdown (it stays in ``fronts`` until then).
        self.closing = self.transport
        self.transport = None
        self._unwatch()
        queue, self.queue = self.queue, collections.deque()
        for ex in queue:
            if ex.state != FINISHED:
                ex.cancel()
                if ex.status == 0:
                    ex.status = 499
                self.engine.record(ex)
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            conn, tunnel.conn = tunnel.conn, None
            if conn is not None:
                conn.close()
            self.engine.tunnel_closed(tunnel)

    def sweep(self, now: float, head_timeout: float, idle_timeout: float, write_timeout: float) -> None:
        """Close the connection if a client has stalled past a deadline."""
        if self.tunnel is not None or self.transport is None:
            return
        if self.write_paused and now - self.write_paused_at > write_timeout:
            self.abort()
        elif self.head_started and now - self.head_started > head_timeout:
            if not self.queue or (len(self.queue) == 1 and self.queue[0].in_head):
                self.queue.clear()
                self.write(_REQUEST_TIMEOUT)
                self.close()
            else:
                self.abort()
        elif not self.queue and not self._in_message and now - self.last_active > idle_timeout:
            self.close()


class FrontSite(web.TCPSite):
    """The public listener's TCP site: connections start in :class:`FrontProtocol`."""

    __slots__ = ("_engine",)

    def __init__(self, runner: web.BaseRunner, engine: HttpProxy, **kwargs: object) -> None:
        super().__init__(runner, **kwargs)  # type: ignore[arg-type]
        self._engine = engine

    async def start(self) -> None:
        self._runner._reg_site(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        engine = self._engine

        def factory() -> asyncio.Protocol:
            return FrontProtocol(engine, server)

        self._server = await loop.create_server(
            factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
