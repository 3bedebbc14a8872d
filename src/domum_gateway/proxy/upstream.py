"""Connections to HTTP targets: a keep-alive pool per target on plain asyncio protocols.

Why not ``aiohttp.ClientSession``: on this path it spent most of the ~470 us a proxied
request cost. A target connection here is an :class:`asyncio.Protocol` that writes a
request head the caller already serialised, reads the response head with one
``bytes.find``, checks it once (``http_wire.parse_response_head``) and hands the body
bytes to its :class:`Sink` as they arrive, without copying or re-framing them.

Flow control runs both ways through the sink: a full target socket pauses the client
(``sink_pause_client``), a full client socket pauses this connection's reading
(:meth:`UpstreamConnection.pause_reading`). Timeouts are deadlines checked by one sweep
(:class:`Upstreams`) instead of a timer per request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, cast

from ..errors import UpstreamError, UpstreamTimeout
from .http_wire import ChunkScanner, ResponseHead, WireError, parse_response_head

__all__ = [
    "DURATION_BUCKETS",
    "Route",
    "RouteCounts",
    "Sink",
    "UpstreamConnection",
    "UpstreamFailure",
    "UpstreamPool",
    "Upstreams",
    "upstream_ssl_context",
]

log = logging.getLogger("domum.proxy.upstream")

UpstreamFailure = UpstreamError | UpstreamTimeout
# The buckets of domum_proxy_request_duration_seconds (rendered by http_proxy's collector).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_MAX_HEAD = 65536
_INF = float("inf")


class Sink(Protocol):
    """Whoever waits for a target's answer (one proxied exchange)."""

    def on_response_head(self, head: ResponseHead, body: bytes) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_end(self) -> None: ...

    def on_upstream_error(self, exc: UpstreamFailure, retryable: bool) -> None: ...

    def on_tunnel_data(self, data: bytes) -> None: ...

    def on_tunnel_closed(self) -> None: ...

    def sink_pause_client(self) -> None: ...

    def sink_resume_client(self) -> None: ...


def upstream_ssl_context(verify: bool, extra_ca: Path | None) -> ssl.SSLContext:
    """A client context for targets: the system's CAs (plus ``extra_ca``), or no checks."""
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context()
    if extra_ca is not None and extra_ca.exists():
        try:
            ctx.load_verify_locations(cafile=str(extra_ca))
        except (OSError, ssl.SSLError) as exc:
            log.warning("proxy.extra_ca_unreadable path=%s detail=%s", extra_ca, exc)
    return ctx


@dataclass(eq=False, slots=True)
class RouteCounts:
    """Per-target totals for metrics (kept across route reloads)."""

    name: str
    # status class -> count per duration bucket (DURATION_BUCKETS, then +Inf), then the sum
    durations: dict[int, list[float]] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0

    def observe(self, status: int, seconds: float) -> None:
        cls = status // 100
        counts = self.durations.get(cls)
        if counts is None:
            counts = self.durations[cls] = [0.0] * (len(DURATION_BUCKETS) + 2)
        counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        counts[-1] += seconds


@dataclass(eq=False, slots=True)
class Route:
    """A registered HTTP target as the hot path needs it (built once per change)."""

    target_id: str
    name: str
    name_bytes: bytes
    scheme: str
    host: str
    port: int
    prefix: bytes  # the URL path without trailing slash; b"" for the root
    host_header: bytes  # "Host: ...\r\n"
    tls_verify: bool
    origins: tuple[bytes, ...]  # lower-cased spellings of the target's origin, for Location
    public_prefix: bytes  # b"/t/{name}"
    counts: RouteCounts
    pool: UpstreamPool = field(init=False)

    @property
    def key(self) -> tuple[str, str, int, bool]:
        return (self.scheme, self.host, self.port, self.tls_verify)


class UpstreamPool:
    """Idle keep-alive connections to one target, most recently used first."""

    __slots__ = ("_idle", "closed", "max_idle", "route", "upstreams")

    def __init__(self, upstreams: Upstreams, route: Route, max_idle: int = 128) -> None:
        self.upstreams = upstreams
        self.route = route
        self.max_idle = max_idle
        self._idle: collections.deque[UpstreamConnection] = collections.deque()
        self.closed = False

    def acquire(self) -> UpstreamConnection | None:
        """An idle connection, or None (then call :meth:`connect`)."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable():
                conn.idle = False
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self._idle) >= self.max_idle or not conn.usable():
            conn.close()
            return
        conn.idle = True
        conn.sink = None
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        if conn.idle:
            try:
                self._idle.remove(conn)
            except ValueError:
                pass

    def connect(self, done: Callable[[UpstreamConnection | None, UpstreamFailure | None], None]) -> None:
        """Open a new connection in the background; ``done`` gets it or the error."""
        task = asyncio.ensure_future(self._connect())
        self.upstreams.tasks.add(task)

        def finished(t: asyncio.Future[UpstreamConnection]) -> None:
            self.upstreams.tasks.discard(t)
            if t.cancelled():
                done(None, UpstreamError("cancelled"))
                return
            exc = t.exception()
            if exc is None:
                done(t.result(), None)
            elif isinstance(exc, UpstreamError | UpstreamTimeout):
                done(None, exc)
            else:
                done(None, UpstreamError(str(exc)))

        task.add_done_callback(finished)

    async def _connect(self) -> UpstreamConnection:
        route = self.route
        ups = self.upstreams
        loop = asyncio.get_running_loop()
        ctx = ups.ssl_context(route.tls_verify) if route.scheme == "https" else None
        try:
            async with asyncio.timeout(ups.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self),
                    route.host,
                    route.port,
                    ssl=ctx,
                    server_hostname=route.host if ctx is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout("connect timed out") from None
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamError(f"certificate not trusted: {exc.verify_message}") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(f"connect failed: {exc.__class__.__name__}") from None
        if self.closed:
            conn.close()
            raise UpstreamError("target removed")
        return conn

    def close(self) -> None:
        self.closed = True
        while self._idle:
            self._idle.pop().close()


_HEAD, _LENGTH, _CHUNKED, _EOF, _TUNNEL, _DONE = range(6)


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 connection to a target; serves one exchange at a time."""

    __slots__ = (
        "_buf",
        "_chunks",
        "_now",
        "_remaining",
        "_state",
        "_timeout",
        "_ups",
        "deadline",
        "got_bytes",
        "idle",
        "lost",
        "method",
        "paused",
        "pool",
        "reused",
        "sink",
        "transport",
        "write_paused",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        ups = self._ups = pool.upstreams
        self._now = ups.now
        self._timeout = ups.read_timeout
        self.transport: asyncio.Transport | None = None
        self.sink: Sink | None = None
        self.idle = False
        self.lost = False
        self.reused = False
        self.got_bytes = False
        self.paused = False
        self.write_paused = False
        self.deadline = _INF
        self.method = b"GET"
        self._state = _DONE
        self._buf = b""
        self._remaining = 0
        self._chunks: ChunkScanner | None = None

    # asyncio callbacks ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport is not an asyncio.Transport subclass, but behaves as one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=256 * 1024)
        self._ups.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget(self)
        self._ups.conns.discard(self)
        sink, self.sink = self.sink, None
        state, self._state = self._state, _DONE
        if sink is None:
            return
        if state == _TUNNEL:
            sink.on_tunnel_closed()
        elif state == _EOF:
            sink.on_response_end()
        else:
            retryable = self.reused and not self.got_bytes
            sink.on_upstream_error(UpstreamError("connection closed by the target"), retryable)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.sink is not None:
            self.sink.sink_pause_client()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.sink is not None:
            self.sink.sink_resume_client()

    def data_received(self, data: bytes) -> None:
        state = self._state
        sink = self.sink
        if state == _TUNNEL:
            if sink is not None:
                sink.on_tunnel_data(data)
            return
        if sink is None or state == _DONE:
            # Bytes nobody asked for (on an idle connection): never reuse it.
            self.close()
            return
        self.got_bytes = True
        if state == _HEAD:
            # The head keeps the deadline the request set: a target trickling header lines
            # must not hold the exchange for ever. Body bytes each restart it.
            self._on_head_bytes(data)
            if self.deadline != _INF and _HEAD < self._state < _TUNNEL:
                self.deadline = self._now() + self._timeout
            return
        if self.deadline != _INF:
            self.deadline = self._now() + self._timeout
        if state == _LENGTH:
            self._on_length_bytes(data)
        elif state == _CHUNKED:
            self._on_chunked_bytes(data)
        else:  # _EOF
            sink.on_response_body(data)

    # exchange --------------------------------------------------------------------
    def usable(self) -> bool:
        t = self.transport
        return not self.lost and t is not None and not t.is_closing()

    def start(self, sink: Sink, head: bytes, method: bytes) -> None:
        """Send a request head; responses go to ``sink`` from now on."""
        self.sink = sink
        self.method = method
        self._state = _HEAD
        self._buf = b""
        self.got_bytes = False
        self.deadline = self._now() + self._timeout
        assert self.transport is not None
        self.transport.write(head)
        if self.write_paused:
            sink.sink_pause_client()

    def write(self, data: bytes) -> None:
        """Request body bytes (already framed for the target)."""
        t = self.transport
        if t is not None and not self.lost:
            if self.deadline != _INF:
                self.deadline = self._now() + self._timeout
            t.write(data)

    def pause_reading(self) -> None:
        if not self.paused and self.transport is not None and not self.lost:
            self.paused = True
            self.deadline = _INF  # the client is slow, not the target
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.paused and self.transport is not None and not self.lost:
            self.paused = False
            if self._state != _TUNNEL:
                self.deadline = self._now() + self._timeout
            self.transport.resume_reading()

    def finish(self, reusable: bool) -> None:
        """The exchange is over: back to the pool, or closed."""
        self.deadline = _INF
        self.sink = None
        if self.paused:
            self.resume_reading()
        if reusable and self._state == _DONE:
            self.reused = True
            self.pool.release(self)
        else:
            self.close()

    def tunnel(self) -> None:
        """After a 101: pass bytes both ways with no deadline."""
        self._state = _TUNNEL
        self.deadline = _INF

    def close(self) -> None:
        self.pool.forget(self)
        self.sink = None
        self._state = _DONE
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.pool.forget(self)
        self.sink = None
        self._state = _DONE
        if self.transport is not None:
            self.transport.abort()

    def timed_out(self) -> None:
        sink = self.sink
        self.abort()
        if sink is not None:
            sink.on_upstream_error(UpstreamTimeout("no answer in time"), False)

    # response parsing ------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        sink = self.sink
        self.abort()
        if sink is not None:
            sink.on_upstream_error(UpstreamError(reason), False)

    def _on_head_bytes(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._fail("response head too large")
            else:
                self._buf = buf
            return
        self._buf = b""
        try:
            head = parse_response_head(buf[: end + 4], request_method=self.method)
        except WireError as exc:
            self._fail(str(exc))
            return
        sink = self.sink
        assert sink is not None
        status = head.status
        if status < 200 and status != 101:
            sink.on_response_head(head, b"")  # interim (100 Continue): another head follows
            rest = buf[end + 4 :]
            if rest and self.sink is sink:
                self._on_head_bytes(rest)
            return
        framing = head.framing
        if framing == "length":
            # The common small answer: head and whole body in one read, written at once.
            length = head.length
            body_end = end + 4 + length
            if len(buf) >= body_end:
                self._state = _DONE
                sink.on_response_head(head, buf[end + 4 : body_end])
                if self.sink is sink:
                    self._complete(buf[body_end:])
                return
            self._state = _LENGTH
            self._remaining = length
        elif framing == "chunked":
            self._state = _CHUNKED
            self._chunks = ChunkScanner()
        elif framing == "close":
            self._state = _EOF
        elif status == 101:
            self._state = _TUNNEL
        else:
            self._state = _DONE
        sink.on_response_head(head, b"")
        if self.sink is not sink:  # the sink gave up on us while handling the head
            return
        state = self._state
        rest = buf[end + 4 :]
        if state == _DONE:
            self._complete(rest)
        elif rest:
            if state == _TUNNEL:
                sink.on_tunnel_data(rest)
            elif state == _LENGTH:
                self._on_length_bytes(rest)
            elif state == _CHUNKED:
                self._on_chunked_bytes(rest)
            else:
                sink.on_response_body(rest)

    def _on_length_bytes(self, data: bytes) -> None:
        remaining = self._remaining
        n = len(data)
        sink = self.sink
        assert sink is not None
        if n < remaining:
            self._remaining = remaining - n
            sink.on_response_body(data)
            return
        if n == remaining:
            sink.on_response_body(data)
            self._remaining = 0
            self._complete(b"")
            return
        if remaining:
            sink.on_response_body(data[:remaining])
        self._remaining = 0
        self._complete(data[remaining:])

    def _on_chunked_bytes(self, data: bytes) -> None:
        scanner = self._chunks
        sink = self.sink
        assert scanner is not None and sink is not None
        try:
            used = scanner.feed(data)
        except WireError as exc:
            self._fail(str(exc))
            return
        if used:
            sink.on_response_body(data if used == len(data) else data[:used])
        if scanner.done:
            self._chunks = None
            self._complete(data[used:])

    def _complete(self, extra: bytes) -> None:
        self._state = _DONE
        sink = self.sink
        if extra:
            # The target sent more than the message: it cannot be trusted with another.
            self.abort()
        if sink is not None:
            sink.on_response_end()


class Upstreams:
    """Every target pool, the shared TLS contexts and the deadline sweep."""

    def __init__(self, connect_timeout: float, read_timeout: float, extra_ca: Path | None) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._extra_ca = extra_ca
        self._ssl: dict[bool, ssl.SSLContext] = {}
        self.conns: set[UpstreamConnection] = set()  # every open connection
        self.tasks: set[asyncio.Future[UpstreamConnection]] = set()
        self.now: Callable[[], float] = lambda: 0.0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = loop.time

    def ssl_context(self, verify: bool) -> ssl.SSLContext:
        ctx = self._ssl.get(verify)
        if ctx is None:
            ctx = self._ssl[verify] = upstream_ssl_context(verify, self._extra_ca)
        return ctx

    def sweep(self) -> None:
        """Time out every connection whose deadline has passed."""
        now = self.now()
        late = [c for c in self.conns if c.deadline < now and c.sink is not None]
        for conn in late:
            conn.timed_out()

    def close(self) -> None:
        for conn in list(self.conns):
            conn.abort()
        for task in list(self.tasks):
            task.cancel()
