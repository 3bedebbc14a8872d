"""``GET /ws/tcp/{target}``: a binary websocket bridged to a TCP target (RDP, SSH, any TCP).

Who may open one (checked in this order, all before the target is contacted):

1. a well-formed websocket upgrade (else 400/426, never upgraded);
2. credentials: ``Authorization: Bearer <tunnel ticket>`` (the ``connect`` client, see
   ``tunnel_tickets``), or the session cookie from a browser page, which must then carry
   an ``Origin`` equal to the public ``base_url`` origin or to the request's own
   ``https://`` host: cross-site websocket hijacking rides on cookies, so a cookie
   without a same-site Origin (``null``, foreign, missing) is refused with 403 before
   any upgrade. A foreign Origin is refused with a ticket too. Unknown, expired or
   ended credentials are 401;
3. the grant: ``SessionManager.check`` with the target's id (window, origin rules,
   session binding and idle time, target list). A refusal here is a policy decision the
   user should read, so the upgrade completes and the websocket closes with 1008 and
   the sentence from ``auth.decide.explain`` (browsers cannot read a refused
   handshake's body);
4. the target's TCP connection; when it fails the websocket closes with 1011.

While the tunnel is open the grant keeps being enforced: the tunnel registers a closer
with its session (revoke, window end, logout, terminate, idle all end it with 1008 and
the reason, immediately), a service-wide tick re-runs the check every few seconds (a
policy edit that drops the target), counts traffic as session activity (at most once
per tick, not per chunk), pings quiet clients and closes tunnels idle for the grant's
idle timeout. A change to the target itself closes its tunnels.

Bytes: after the 101 the connection is taken over from aiohttp for good (``_take_over``:
aiohttp forgets it and the handler returns, so an idle tunnel costs its two sockets and
a few small objects, not a suspended request) and bridged by :mod:`.tunnel_wire`. This
service keeps the open tunnels: it tells them when the gateway shuts down (1001) and
records their end. Nothing of the payload is logged or stored; one audit event marks
each tunnel's open and one its close (duration, bytes each way, close code), both
written in the background (the hot path never waits on the database).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from yarl import URL

from ..audit import AuditEntry
from ..auth.decide import Deny, DenyReason, explain
from ..auth.origin import IPAddress
from ..auth.secrets import new_id
from ..bus import Change, ChangeKind
from ..errors import DomumError
from ..model import Protocol, Target
from .context import CTX, PublicContext, client_of, session_of
from .sessions import Connection, LiveSession
from .tunnel_tickets import TicketStore
from .tunnel_wire import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    Scratch,
    TcpEnd,
    WsEnd,
    accept_key,
)

__all__ = [
    "SHUTTING_DOWN",
    "TUNNELS",
    "TUNNEL_PROTOCOLS",
    "TargetCache",
    "TunnelService",
    "add_tunnel_routes",
]

log = logging.getLogger("domum.tunnel")

TUNNEL_PROTOCOLS = frozenset({Protocol.RDP, Protocol.TCP, Protocol.SSH})
"""Targets a tunnel may reach: anything with a host and a port (SSH end to end, too)."""

SHUTTING_DOWN = "the gateway is shutting down"
_MAX_TARGET_KEY = 128

_NOT_GRANTED = explain(DenyReason.TARGET_NOT_GRANTED)
_UNREACHABLE = (
    "The resource could not be reached just now. Try again in a moment; "
    "if it keeps failing, tell your administrator."
)


class TargetCache:
    """Targets by id and by name, loaded from the store on first use, dropped on change."""

    def __init__(self, ctx: PublicContext) -> None:
        self._store = ctx.store
        self._by_key: dict[str, Target] = {}

    async def get(self, key: str) -> Target | None:
        target = self._by_key.get(key)
        if target is None and 0 < len(key) <= _MAX_TARGET_KEY:
            target = await self._store.get_target(key)
            if target is not None:
                self._by_key[target.id] = target
                self._by_key[target.name] = target
        return target

    def clear(self) -> None:
        self._by_key.clear()


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int | None


def _origin_of(text: str) -> _Origin | None:
    """An ``Origin`` (or base URL) as scheme, host and effective port; None if malformed."""
    try:
        url = URL(text)
    except (ValueError, TypeError):
        return None
    if url.scheme not in ("http", "https") or not url.host or url.user or url.query_string or url.fragment:
        return None
    if url.path not in ("", "/"):
        return None
    return _Origin(url.scheme, url.host.lower().rstrip("."), url.port)


def _accept_key_of(request: web.Request) -> str | None:
    """The client's ``Sec-WebSocket-Key`` when the request is a valid RFC 6455 upgrade."""
    headers = request.headers
    upgrade = {t.strip().lower() for t in headers.get("Upgrade", "").split(",")}
    connection = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    if "websocket" not in upgrade or "upgrade" not in connection or request.version < (1, 1):
        return None
    key = headers.get("Sec-WebSocket-Key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    return key


def _problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    slug = title.lower().replace(" ", "-")
    return web.json_response(
        {"type": f"https://domum.dev/problems/{slug}", "title": title, "status": status, "detail": detail},
        status=status,
        content_type="application/problem+json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def _unauthorized(detail: str) -> web.Response:
    return _problem(401, "Authentication required", detail, {"WWW-Authenticate": 'Bearer realm="domum"'})


class _TailCatcher:
    """Stands in for aiohttp's websocket reader just long enough to collect the bytes a
    client sent right behind its upgrade request."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.data += data
        return False, b""

    def feed_eof(self) -> None:
        return None


class _Refused(WsEnd):
    """A websocket accepted only to be closed with a reason the user can read."""

    __slots__ = ()

    def __init__(self, scratch: Scratch) -> None:
        super().__init__(scratch, TcpEnd(), client=False)


class _ServerEnd(WsEnd):
    """One open tunnel, server side: the pump plus what enforcement needs."""

    __slots__ = (
        "_last_data",
        "_last_rx",
        "_ping_at",
        "_seen_bytes",
        "_seen_frames",
        "auth",
        "conn",
        "detach",
        "flushed_rx",
        "flushed_tx",
        "id",
        "live",
        "opened",
        "opened_audit",
        "peer",
        "service",
        "target",
    )

    def __init__(
        self,
        service: TunnelService,
        live: LiveSession,
        target: Target,
        peer: IPAddress,
        tcp: TcpEnd,
    ) -> None:
        super().__init__(service.scratch, tcp, client=False, max_frame=service.max_frame)
        self.service = service
        self.live = live
        self.target = target
        self.peer = peer
        self.id = new_id("tun")
        self.opened = time.monotonic()
        self.detach: Callable[[], None] | None = None
        self.conn: Connection | None = None
        self.auth = ""  # "ticket" or "cookie"
        self.opened_audit: asyncio.Task[None] | None = None
        self._seen_bytes = 0
        self._seen_frames = 0
        self._last_data = self.opened
        self._last_rx = self.opened
        self._ping_at = 0.0
        self.flushed_rx = 0
        self.flushed_tx = 0

    def tcp_lost_reason(self, exc: Exception | None) -> tuple[int, str]:
        return CLOSE_NORMAL, "the resource closed the connection"

    def buffer_updated(self, nbytes: int) -> None:
        rx = self.rx
        self.feed(self.scratch.view[:nbytes])
        if self.rx != rx:  # payload from the user: activity for the session's idle timer
            self.live.active()

    def closed(self) -> None:
        self.service.ended(self)

    def audit_details(self) -> dict[str, Any]:
        return {
            "request_id": self.live.request_id,
            "session_id": self.live.id,
            "tunnel_id": self.id,
            "target": self.target.name,
            "protocol": self.target.protocol.value,
            "auth": self.auth,
        }

    def cut_alone(self, reason: str, cause: str) -> None:
        """Cut this tunnel only (its session lives on), timed for ``domum_cutoff_seconds``."""
        if self.conn is not None:
            self.conn.cut(reason, cause)  # calls ``cut`` once
        else:
            self.cut(reason)

    def cut(self, reason: str) -> None:
        """The session or grant ended: 1008 with ``reason``, nothing more to the target."""
        tcp = self.tcp.transport
        if tcp is not None:
            tcp.abort()
        self.close(CLOSE_POLICY, reason)

    def tick(self, now: float) -> None:
        service = self.service
        moved = self.rx + self.tx
        if moved != self._seen_bytes:
            self._seen_bytes = moved
            self._last_data = now
            service.flush_bytes(self)
        service.ctx.sessions.sync(self.live)  # the user's activity, stamped as it arrived
        if self.rx_frames != self._seen_frames:
            self._seen_frames = self.rx_frames
            self._last_rx = now
            self.ping_outstanding = False
        elif self.ping_outstanding:
            if now - self._ping_at >= service.pong_timeout:
                self.close_code, self.close_reason = CLOSE_GOING_AWAY, "no answer to keepalive pings"
                self.abort()
                return
        elif now - self._last_rx >= service.ping_interval:
            self._ping_at = now
            self.ping()
        if self.close_sent:
            return
        live = self.live
        decision = service.ctx.sessions.check(live, self.peer, self.target.id, activity=False)
        if isinstance(decision, Deny):
            # Terminal reasons already cut us through the session's closers.
            self.cut_alone(explain(decision.reason, live.grant), "policy")
            return
        idle = service.idle_timeout if service.idle_timeout is not None else live.grant.idle_timeout_seconds
        if now - self._last_data >= idle:
            self.close(CLOSE_NORMAL, f"closed after {idle:g} seconds without traffic")


class TunnelService:
    """Owns the open tunnels of one public app: the route, the tick, shutdown."""

    def __init__(self, ctx: PublicContext) -> None:
        self.ctx = ctx
        self.tickets = TicketStore(ctx.sessions, ctx.store, ctx.clock)
        self.targets = TargetCache(ctx)
        self.scratch = Scratch()
        self.max_frame = 1024 * 1024
        self.tick_interval = 5.0
        self.ping_interval = 20.0
        self.pong_timeout = 20.0
        self.idle_timeout: float | None = None  # None: the grant's idle timeout
        self.connect_timeout = ctx.settings.proxy.connect_timeout
        self.open: set[_ServerEnd] = set()
        self._none_open = asyncio.Event()
        self.waiters: set[Callable[[str], None]] = set()  # the client API's long polls
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._last_prune = 0.0
        self._base = _origin_of(ctx.settings.public.base_url)
        metrics = ctx.metrics
        self._active = {p: metrics.sessions_active.labels(p.value) for p in TUNNEL_PROTOCOLS}
        self._up = {p: metrics.tunnel_bytes.labels(p.value, "up") for p in TUNNEL_PROTOCOLS}
        self._down = {p: metrics.tunnel_bytes.labels(p.value, "down") for p in TUNNEL_PROTOCOLS}

    # lifecycle ------------------------------------------------------------------------
    async def on_startup(self, _: web.Application) -> None:
        self.ctx.bus.subscribe(self._on_change)
        self._arm_tick()

    async def on_shutdown(self, _: web.Application) -> None:
        """Tell every tunnel the gateway is going away (before aiohttp waits for handlers)."""
        for end in list(self.open):
            end.close(CLOSE_GOING_AWAY, SHUTTING_DOWN)
        for waiter in list(self.waiters):
            waiter(SHUTTING_DOWN)
        await self._drain(1.0)  # let the closing handshakes finish

    async def on_cleanup(self, _: web.Application) -> None:
        self.ctx.bus.unsubscribe(self._on_change)
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for end in list(self.open):
            end.abort()
        await self._drain(1.0)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)

    async def _drain(self, seconds: float) -> None:
        """Wait (bounded) until every tunnel has ended."""
        if self.open:
            self._none_open.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_open.wait(), seconds)

    def _on_change(self, change: Change) -> None:
        if change.kind is not ChangeKind.TARGET:
            return
        self.targets.clear()
        for end in list(self.open):
            if end.target.id == change.id:
                end.cut_alone(
                    "This resource was changed or removed by an administrator. Connect again.", "policy"
                )

    def _arm_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._ticker = loop.call_later(self.tick_interval, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        for end in list(self.open):
            try:
                end.tick(now)
            except Exception:
                log.exception("tunnel.tick_failed tunnel=%s", end.id)
        if now - self._last_prune >= 60.0:
            self._last_prune = now
            self.tickets.prune()
        self._arm_tick()

    # metrics and audit ----------------------------------------------------------------
    def flush_bytes(self, end: _ServerEnd) -> None:
        if end.conn is not None:
            end.conn.bytes_in, end.conn.bytes_out = end.rx, end.tx
        proto = end.target.protocol
        if end.rx > end.flushed_rx:
            self._up[proto].inc(end.rx - end.flushed_rx)
            end.flushed_rx = end.rx
        if end.tx > end.flushed_tx:
            self._down[proto].inc(end.tx - end.flushed_tx)
            end.flushed_tx = end.tx

    def _audit(self, entry: AuditEntry, after: asyncio.Task[None] | None = None) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._write_audit(entry, after))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _write_audit(self, entry: AuditEntry, after: asyncio.Task[None] | None) -> None:
        if after is not None:
            await asyncio.wait([after])  # keep open before close in the chain
        try:
            await self.ctx.store.append_audit(entry)
        except DomumError as exc:
            log.warning("tunnel.audit_failed action=%s detail=%s", entry.action, exc.detail)

    # the route ------------------------------------------------------------------------
    def origin_allowed(self, request: web.Request, origin: str) -> bool:
        """``origin`` is the public base URL's origin, or this request's own https host."""
        got = _origin_of(origin)
        if got is None:
            return False
        if got == self._base:
            return True
        if not request.secure:
            return False
        own = _origin_of(f"https://{request.host}")
        return own is not None and got == own

    async def _credentials(self, request: web.Request) -> tuple[LiveSession | None, str, web.Response | None]:
        """(session, how it was proven, refusal) from the request's ticket or cookie."""
        origin = request.headers.get("Origin")
        auth = request.headers.get("Authorization")
        if auth is not None:
            scheme, _, value = auth.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return None, "", _unauthorized("Use a tunnel ticket: Authorization: Bearer <ticket>.")
            if origin is not None and not self.origin_allowed(request, origin):
                return None, "", _problem(403, "Forbidden", "Requests from other sites are refused.")
            try:
                live = await self.tickets.lookup(value.strip())
            except DomumError:  # logged by the ticket store; fail closed
                return (
                    None,
                    "",
                    _problem(
                        503,
                        "Service unavailable",
                        "The gateway cannot check tunnel tickets right now. Try again in a moment.",
                        {"Retry-After": "5"},
                    ),
                )
            if live is None:
                return (
                    None,
                    "",
                    _unauthorized(
                        "This tunnel ticket has expired or its session has ended. "
                        "Run `domum-gateway connect` again to sign in."
                    ),
                )
            return live, "ticket", None
        if origin is None or not self.origin_allowed(request, origin):
            self.ctx.metrics.denied.labels("cross_site").inc()
            return (
                None,
                "",
                _problem(
                    403,
                    "Forbidden",
                    "Tunnels opened from a web page must come from this gateway's own pages.",
                ),
            )
        live = await session_of(request)
        if live is None:
            return None, "", _unauthorized("You are not signed in. Open your personal link to sign in.")
        return live, "cookie", None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = _accept_key_of(request)
        if key is None:
            return _problem(
                426,
                "Upgrade required",
                "This address is a websocket tunnel. Use `domum-gateway connect` to reach it.",
                {"Upgrade": "websocket", "Connection": "Upgrade"},
            )
        if request.headers.get("Sec-WebSocket-Version", "").strip() != "13":
            return _problem(
                426,
                "Upgrade required",
                "Only websocket version 13 is supported.",
                {"Sec-WebSocket-Version": "13"},
            )
        live, how, refusal = await self._credentials(request)
        if refusal is not None:
            return refusal
        assert live is not None
        peer = client_of(request)
        name = request.match_info["target"]
        target = await self.targets.get(name)
        if target is None or target.protocol not in TUNNEL_PROTOCOLS or not target.host or not target.port:
            # Same words as "not granted": no telling which names exist.
            decision = self.ctx.sessions.check(live, peer, None)
            reason = explain(decision.reason, live.grant) if isinstance(decision, Deny) else _NOT_GRANTED
            return await self._refuse(request, key, live, name, peer, CLOSE_POLICY, reason, "not_granted")
        decision = self.ctx.sessions.check(live, peer, target.id)
        if isinstance(decision, Deny):
            return await self._refuse(
                request,
                key,
                live,
                target.id,
                peer,
                CLOSE_POLICY,
                explain(decision.reason, live.grant),
                decision.reason.value,
            )
        loop = asyncio.get_running_loop()
        tcp = TcpEnd()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: tcp, target.host, target.port), self.connect_timeout
            )
        except (TimeoutError, OSError) as exc:
            log.warning("tunnel.target_unreachable target=%s error=%s", target.id, type(exc).__name__)
            return await self._refuse(
                request, key, live, target.id, peer, CLOSE_INTERNAL, _UNREACHABLE, "unreachable"
            )
        if live.ended:
            if tcp.transport is not None:
                tcp.transport.abort()
            return await self._refuse(
                request, key, live, target.id, peer, CLOSE_POLICY, live.end_reason or _NOT_GRANTED, "ended"
            )
        return await self._bridge(request, key, live, target, peer, tcp, how)

    async def _upgrade(
        self, request: web.Request, key: str
    ) -> tuple[web.StreamResponse, asyncio.Transport, bytes]:
        """Send the 101 and take the connection over from aiohttp."""
        resp = web.StreamResponse(
            status=101,
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Accept": accept_key(key),
            },
        )
        resp.force_close()
        await resp.prepare(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away during the handshake")
        tail = _TailCatcher()
        request.protocol.set_parser(cast(Any, tail))
        return resp, transport, tail.data

    async def _refuse(
        self,
        request: web.Request,
        key: str,
        live: LiveSession,
        subject: str,
        peer: IPAddress,
        code: int,
        reason: str,
        outcome: str,
    ) -> web.StreamResponse:
        self._audit(
            AuditEntry(
                actor=f"user:{live.user_id}",
                action="tunnel.refused",
                subject=subject,
                outcome=outcome,
                origin=str(peer),
                details={"request_id": live.request_id, "session_id": live.id, "close_code": code},
            )
        )
        resp, transport, pending = await self._upgrade(request, key)
        # A full closing handshake, not a close frame and a hang-up: some clients drop
        # a frame that arrives with the 101 when the connection ends right behind it.
        end = _Refused(self.scratch)
        _take_over(request, transport, end)
        end.start(transport, pending)
        end.close(code, reason)
        return resp

    async def _bridge(
        self,
        request: web.Request,
        key: str,
        live: LiveSession,
        target: Target,
        peer: IPAddress,
        tcp: TcpEnd,
        how: str,
    ) -> web.StreamResponse:
        try:
            resp, transport, pending = await self._upgrade(request, key)
        except BaseException:
            if tcp.transport is not None:
                tcp.transport.abort()
            raise
        end = _ServerEnd(self, live, target, peer, tcp)
        _take_over(request, transport, end)
        self.open.add(end)
        # In the live registry (GET /api/v1/sessions) and cut with its session; the tunnel
        # keeps its own domum_sessions_active gauge.
        end.conn = self.ctx.sessions.open_connection(
            live, target.protocol.value, target.name, str(peer), end.cut, count=False
        )
        end.detach = lambda: self.ctx.sessions.close_connection(end.conn) if end.conn else None
        self._active[target.protocol].inc()
        end.auth = how
        end.opened_audit = self._audit(
            AuditEntry(
                actor=f"user:{live.user_id}",
                action="tunnel.opened",
                subject=target.id,
                origin=str(peer),
                details=end.audit_details(),
            )
        )
        # Hold the task only while it runs: the closing event waits for it (chain order).
        end.opened_audit.add_done_callback(lambda _: setattr(end, "opened_audit", None))
        log.info("tunnel.opened tunnel=%s target=%s session=%s", end.id, target.id, live.id)
        end.start(transport, pending)
        if live.ended:  # cut while we were upgrading
            end.cut(live.end_reason or _NOT_GRANTED)
        # The handler ends here; the tunnel lives on in its protocols until ``ended``.
        return resp

    def ended(self, end: _ServerEnd) -> None:
        """A tunnel's websocket is gone: metrics, the closing audit event, forget it."""
        if end not in self.open:
            return
        self.open.discard(end)
        if not self.open:
            self._none_open.set()
        if end.detach is not None:
            end.detach()
        self._active[end.target.protocol].dec()
        self.flush_bytes(end)
        duration = round(time.monotonic() - end.opened, 3)
        self._audit(
            AuditEntry(
                actor=f"user:{end.live.user_id}",
                action="tunnel.closed",
                subject=end.target.id,
                origin=str(end.peer),
                details={
                    **end.audit_details(),
                    "duration_seconds": duration,
                    "bytes_up": end.rx,
                    "bytes_down": end.tx,
                    "close_code": end.close_code,
                    "reason": end.close_reason,
                },
            ),
            after=end.opened_audit,
        )
        log.info(
            "tunnel.closed tunnel=%s code=%s seconds=%s up=%d down=%d",
            end.id,
            end.close_code,
            duration,
            end.rx,
            end.tx,
        )


def _take_over(request: web.Request, transport: asyncio.Transport, end: WsEnd) -> None:
    """Move the upgraded connection from aiohttp to ``end`` for good.

    aiohttp keeps a request handler, a parser, the request and a task per connection
    until the connection ends; for a tunnel that may stay open for hours, those cost
    more memory than the tunnel itself. Once the transport talks to ``end``, aiohttp's
    protocol is told the connection is gone (with its ``transport`` cleared first so it
    closes nothing), its server forgets it, and the handler returns at once.
    """
    transport.set_protocol(end)
    http = request.protocol
    http.transport = None
    http.connection_lost(None)


TUNNELS = web.AppKey("tunnels", TunnelService)


def add_tunnel_routes(app: web.Application, ctx: PublicContext | None = None) -> TunnelService:
    """Register ``GET /ws/tcp/{target}`` and the ``connect`` client's ``/cli/v1`` API."""
    from .cli_api import add_cli_routes

    service = TunnelService(ctx if ctx is not None else app[CTX])
    app[TUNNELS] = service
    app.router.add_get("/ws/tcp/{target}", service.handle)
    app.on_startup.append(service.on_startup)
    app.on_shutdown.append(service.on_shutdown)
    app.on_cleanup.append(service.on_cleanup)
    add_cli_routes(app, service)
    return service
