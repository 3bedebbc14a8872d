"""HTTP reverse proxy to internal web apps: routing, admission, host mode, metrics, audit.

Shape (see ``http_front`` for the connection protocol and ``upstream`` for targets):

* **Routing.** Path mode ``/t/{name}/rest`` on the main host; the target's URL prefix
  replaces ``/t/{name}``. Host mode ``{name}.{public.domain}`` when the domain is set;
  then ``/t/{name}/...`` on the main host only hands the browser over to the target's
  own host (so every app gets an origin, and cookies, of its own). A target is chosen
  by name from an in-memory table of registered ``http`` targets and nothing else: the
  request line, ``Host`` and path only ever pick a *name*, whose URL comes from the
  store.
* **Admission** (:meth:`HttpProxy.admit`) per request, memory only: the cookie's
  session from a cache keyed by the cookie's hash, ``SessionManager.check`` (which runs
  ``auth.decide``: window, origin, idle, target) and the route. Only a cookie the cache
  has not seen yet costs one store lookup, once.
* **Host-mode hand-over.** ``https://{main}/t/{name}/x`` (signed in, granted) answers
  303 to ``https://{name}.{domain}/__domum/enter?code=...&next=/x``; the code is
  random, single use, valid 60 s and bound to the session and the target. Redeeming it
  sets a host-only ``__Host-domum`` cookie whose value is a fresh secret valid for that
  target only and only while the session lives. Codes and these per-target cookies are
  kept in the store (``session_secrets``, SHA-256 hashes only), so a code minted on one
  replica is redeemed on any other, exactly once across all of them (one ``DELETE ...
  RETURNING``), and a host cookie works on every replica; each costs a store round trip
  when minted, redeemed or first seen by a process, never per request after that. A
  store error answers 503 (never a pass).
* **Audit** is one ``proxy.first_use`` event per (session, target) and one event per
  websocket open and close, never one per request.
* **Metrics**: ``domum_proxy_request_duration_seconds{target,status_class}`` (the
  histogram ``metrics.Metrics`` declares is replaced in the registry by this labelled
  one, counted in plain lists on the hot path and rendered at scrape time),
  ``domum_proxy_bytes_total{target,direction}`` and
  ``domum_tunnel_bytes_total{protocol="http",direction}``. An access log line per
  request goes to the ``domum.access`` logger at INFO (raise that logger's level to turn
  it off).
* **Session cache.** Admitted sessions are found by the raw cookie value (a dict
  lookup, no hashing per request); entries leave the moment the session ends (a closer
  on the ``LiveSession``). Only values the store confirmed are ever keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.utils import formatdate
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..audit import AuditEntry
from ..auth.decide import ALLOW, Deny, DenyReason, explain
from ..auth.origin import IPAddress, client_address, normalise_address
from ..auth.secrets import hash_secret, new_session_id
from ..bus import Change, ChangeKind
from ..errors import DomumError
from ..model import Protocol as TargetProtocol
from ..model import Target
from ..store.base import SecretKind
from . import http_pages as pages
from .context import CTX, PublicContext
from .http_fallback import serve_on_aiohttp
from .http_front import LOCAL, PENDING, READY, Exchange, FrontProtocol, FrontSite, LocalResponse
from .http_wire import (
    PathProblem,
    RequestScan,
    check_app_path,
    map_location,
    parse_proxy_path,
    rewrite_set_cookie,
    scan_request,
)
from .login import RateLimiter
from .sessions import LiveSession
from .upstream import DURATION_BUCKETS, Route, RouteCounts, UpstreamFailure, UpstreamPool, Upstreams

__all__ = ["HTTP_PROXY", "HttpProxy", "add_http_proxy_routes", "public_site"]

log = logging.getLogger("domum.proxy.http")
access_log = logging.getLogger("domum.access")

_CODE_TTL = 60.0
_MAX_CODES_PER_SESSION = 100  # unexpired hand-over codes one session may hold (a flood)
_MAX_HOST_COOKIES_PER_SESSION = 200
_HEAD_TIMEOUT = 30.0
_IDLE_TIMEOUT = 75.0
_RELOAD_INTERVAL = 5.0  # per unknown target id named by a grant
_MAX_KNOWN = 200_000
_MAX_TRIED = 10_000  # names and target ids that triggered a route reload, remembered
_UNKNOWN_TTL = 10.0
_CLIENT_STALL = 60.0
_LOOKUPS_PER_MINUTE = 600  # store lookups of unknown cookies per client address
_SIGNED_OUT = frozenset(
    {
        DenyReason.SESSION_ENDED,
        DenyReason.SESSION_IDLE,
        DenyReason.ADDRESS_CHANGED,
        DenyReason.EXPIRED,
        DenyReason.REVOKED,
        DenyReason.NOT_FORWARDED,
        DenyReason.UNKNOWN,
    }
)
_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(eq=False, slots=True)
class _Known:
    """A session the proxy has admitted before (the cache entry behind a cookie)."""

    live: LiveSession
    identity: bytes  # X-Domum-* lines for the target
    used: set[str] = field(default_factory=set)  # target ids already audited
    keys: list[bytes] = field(default_factory=list)  # cookie values (main and host mode)
    detach: Callable[[], None] | None = None


class _Collector(Collector):
    """Renders the proxy's counters at scrape time (the hot path only adds to lists)."""

    def __init__(self, engine: HttpProxy) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        durations = HistogramMetricFamily(
            "domum_proxy_request_duration_seconds",
            "Proxied HTTP request duration",
            labels=["target", "status_class"],
        )
        moved = CounterMetricFamily(
            "domum_proxy_bytes", "Bytes carried by the HTTP proxy", labels=["target", "direction"]
        )
        bounds = [*(str(b) for b in DURATION_BUCKETS), "+Inf"]
        for counts in list(self._engine.counts.values()):
            for cls, values in sorted(counts.durations.items()):
                cumulative: list[tuple[str, float]] = []
                total = 0.0
                for bound, n in zip(bounds, values[:-1], strict=True):
                    total += n
                    cumulative.append((bound, total))
                durations.add_metric([counts.name, f"{cls}xx"], cumulative, sum_value=values[-1])
            moved.add_metric([counts.name, "up"], counts.bytes_up)
            moved.add_metric([counts.name, "down"], counts.bytes_down)
        yield durations
        yield moved


class _IPv4Peer(ipaddress.IPv4Address):
    """An address that keeps its text: ``decide`` compares the session's bound address
    with ``str(peer)`` on every request, and ``ipaddress`` rebuilds that string each time."""

    __slots__ = ("_text",)

    def __init__(self, address: int) -> None:
        super().__init__(address)
        self._text = super().__str__()

    def __str__(self) -> str:
        return self._text


class _IPv6Peer(ipaddress.IPv6Address):
    __slots__ = ("_text",)

    def __init__(self, address: int) -> None:
        super().__init__(address)
        self._text = super().__str__()

    def __str__(self) -> str:
        return self._text


class HttpProxy:
    """The proxy's shared state: routes, admitted sessions, pools, host-mode codes."""

    def __init__(self, ctx: PublicContext, grace: float = 10.0) -> None:
        self.ctx = ctx
        self.sessions = ctx.sessions
        self.grace = grace
        settings = ctx.settings
        self.domain = settings.public.domain
        self._suffix = ("." + self.domain).encode() if self.domain else b""
        self._base_url = settings.public.base_url
        base = urlsplit(settings.public.base_url)
        self._scheme = base.scheme or "https"
        self._port = f":{base.port}" if base.port else ""
        self._portal = f"{settings.public.base_url}/portal"
        self._trusted = settings.public.trusted_proxies
        self.upstreams = Upstreams(
            settings.proxy.connect_timeout, settings.proxy.read_timeout, settings.tls.ca
        )
        self.routes: dict[bytes, Route] = {}  # by name
        self.counts: dict[str, RouteCounts] = {"-": RouteCounts("-")}  # by target id; "-": no target
        self.fronts: set[FrontProtocol] = set()
        self.admitting: FrontProtocol | None = None
        self.date_line = b"Date: " + formatdate(usegmt=True).encode()
        self.now: Callable[[], float] = time.monotonic
        self._known: dict[bytes, _Known] = {}  # cookie value -> session
        self._by_session: dict[str, _Known] = {}  # session id -> its entry
        self._tickets: dict[bytes, str] = {}  # host-mode cookie value -> target id
        self._unknown: dict[bytes, float] = {}  # cookie values the store did not know -> when
        self._lookups = RateLimiter(_LOOKUPS_PER_MINUTE, 60.0)
        self._tasks: set[asyncio.Future[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._target_ids: set[str] = set()  # every registered target, any protocol
        self._tried: dict[str, float] = {}
        self._reloading: asyncio.Task[None] | None = None
        self._flushed = (0, 0)
        self._bytes_up = 0
        self._bytes_down = 0
        ctx.metrics.registry.register(_Collector(self))

    # lifecycle ---------------------------------------------------------------------
    async def on_startup(self, _: web.Application) -> None:
        loop = asyncio.get_running_loop()
        self.now = loop.time
        self.upstreams.bind(loop)
        await self.reload_routes()
        self.ctx.bus.subscribe(self._on_change)
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="domum-proxy-sweep")

    async def on_shutdown(self, _: web.Application) -> None:
        """Stop reading new requests; let in-flight ones finish within the grace period."""
        for front in list(self.fronts):
            if front.tunnel is not None:
                front.cut_tunnel("the gateway is shutting down", 1001)
            elif not front.queue:
                front.close()
            else:
                front.doomed = True
        deadline = self.now() + self.grace
        while any(f.queue for f in self.fronts) and self.now() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # a poll: exchanges end in many places, none waits here
        for front in list(self.fronts):
            front.abort()
            if front.closing is not None:
                front.closing.abort()  # still waiting for a TLS close_notify
        self.fronts.clear()

    async def on_cleanup(self, _: web.Application) -> None:
        self.ctx.bus.unsubscribe(self._on_change)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for route in self.routes.values():
            route.pool.close()
        self.upstreams.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._forget_all()

    def spawned(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _sweep_loop(self) -> None:
        interval = min(1.0, self.upstreams.read_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                self._sweep()
            except Exception:
                log.exception("proxy.sweep_failed")

    def _sweep(self) -> None:
        now = self.now()
        self.date_line = b"Date: " + formatdate(usegmt=True).encode()
        self.upstreams.sweep()
        # A client that reads nothing for this long loses its connection (nginx's send_timeout).
        write_timeout = max(self.upstreams.read_timeout, _CLIENT_STALL)
        for front in list(self.fronts):
            front.sweep(now, _HEAD_TIMEOUT, _IDLE_TIMEOUT, write_timeout)
        for cookie in [k for k, t in self._unknown.items() if now - t >= _UNKNOWN_TTL]:
            del self._unknown[cookie]
        up, down = self._bytes_up, self._bytes_down
        last_up, last_down = self._flushed
        if up > last_up:
            self.ctx.metrics.tunnel_bytes.labels("http", "up").inc(up - last_up)
        if down > last_down:
            self.ctx.metrics.tunnel_bytes.labels("http", "down").inc(down - last_down)
        self._flushed = (up, down)

    # routes ----------------------------------------------------------------------------
    async def reload_routes(self) -> None:
        """Rebuild the route table from the store (pools kept for unchanged targets)."""
        targets = await self.ctx.store.list_targets()
        self._target_ids = {t.id for t in targets}
        fresh: dict[bytes, Route] = {}
        for target in targets:
            route = self._route_for(target)
            if route is None:
                continue
            old = self.routes.get(route.name_bytes)
            if (
                old is not None
                and old.key == route.key
                and old.prefix == route.prefix
                and old.target_id == route.target_id
            ):
                fresh[route.name_bytes] = old
                continue
            route.pool = UpstreamPool(self.upstreams, route)
            fresh[route.name_bytes] = route
            if not route.tls_verify and route.scheme == "https":
                log.warning("proxy.tls_unverified target=%s", route.name)
        for name, old in self.routes.items():
            if fresh.get(name) is not old:
                old.pool.close()
        self.routes = fresh
        for tid in [t for t in self.counts if t != "-" and t not in self._target_ids]:
            del self.counts[tid]

    def _route_for(self, target: Target) -> Route | None:
        if target.protocol != TargetProtocol.HTTP or not target.url:
            return None
        try:
            parts = urlsplit(target.url)
            port = parts.port
        except ValueError:
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        default = 443 if parts.scheme == "https" else 80
        port = port or default
        host = parts.hostname
        bracketed = f"[{host}]" if ":" in host else host
        authority = bracketed if port == default else f"{bracketed}:{port}"
        origins = {f"{parts.scheme}://{authority}".lower(), f"//{authority}".lower()}
        if port == default:
            origins.add(f"{parts.scheme}://{bracketed}:{port}".lower())
        counts = self.counts.setdefault(target.id, RouteCounts(target.name))
        counts.name = target.name
        try:
            host_header = authority.encode("ascii")
        except UnicodeEncodeError:
            host_header = authority.encode("idna")
        return Route(
            target_id=target.id,
            name=target.name,
            name_bytes=target.name.encode(),
            scheme=parts.scheme,
            host=host,
            port=port,
            prefix=parts.path.rstrip("/").encode(),
            host_header=b"Host: " + host_header + b"\r\n",
            tls_verify=target.tls_verify,
            origins=tuple(o.encode() for o in sorted(origins, key=len, reverse=True)),
            public_prefix=b"/t/" + target.name.encode(),
            counts=counts,
        )

    def _on_change(self, change: Change) -> None:
        if change.kind in (ChangeKind.TARGET, ChangeKind.GROUP):
            self._schedule_reload()

    def _schedule_reload(self) -> asyncio.Task[None]:
        """Start a reload unless one is running; return the running one."""
        if self._reloading is not None and not self._reloading.done():
            return self._reloading

        async def run() -> None:
            try:
                await self.reload_routes()
            except DomumError as exc:
                log.warning("proxy.routes_not_reloaded detail=%s", exc.detail)

        self._reloading = asyncio.ensure_future(run())
        self.spawned(self._reloading)
        return self._reloading

    # admission -------------------------------------------------------------------------
    def peer_of(self, host: str) -> IPAddress | None:
        """The client's address for every decision on its connection (None if unreadable)."""
        try:
            addr = normalise_address(host)
        except ValueError:
            return None
        if isinstance(addr, ipaddress.IPv4Address):
            return _IPv4Peer(int(addr))
        return _IPv6Peer(int(addr))

    def is_proxied_head(self, buf: bytes, end: int) -> bool:
        """Host mode on: is this request (head at ``buf[:end]``) for the proxy?"""
        nl = buf.find(b"\n", 0, end)
        sp = buf.find(b" ", 0, nl)
        if sp > 0 and buf.startswith(b"/t/", sp + 1):
            return True
        low = buf[:end].lower()
        i = low.find(b"\r\nhost:")
        if i < 0:
            return False
        j = low.find(b"\r\n", i + 7)
        return self._target_label(_host_name(low[i + 7 : j if j >= 0 else end])) is not None

    def _target_label(self, host: bytes) -> bytes | None:
        suffix = self._suffix
        if not suffix or not host.endswith(suffix):
            return None
        label = host[: -len(suffix)]
        if not label or not _NAME_CHARS.issuperset(label):
            return None
        return label

    def admit(self, ex: Exchange) -> None:
        """Decide what ``ex`` gets: a target (READY), a page (LOCAL) or a store lookup (PENDING)."""
        front = ex.front
        headers = ex.headers
        last = front.last_scan
        if last is not None and last[0] == headers:
            scan = last[1]  # a keep-alive connection usually repeats its headers exactly
        else:
            scan = scan_request(headers)
            front.last_scan = (headers, scan)
        if scan.websocket and ex.method == b"GET":
            ex.websocket = True
        if scan.duplicate_host:
            self._local(ex, pages.bad_request(_wants_text(ex)))
            return
        if self._suffix:
            label = self._target_label(_host_name(scan.host))
            if label is not None:
                self._admit_host(ex, scan, label)
                return
        self._admit_path(ex, scan)

    def _admit_path(self, ex: Exchange, scan: RequestScan) -> None:
        url = ex.url
        path, sep, query = url.partition(b"?")
        slash = path.find(b"/", 3)
        if slash < 0 or b"#" in url:
            self._admit_odd_path(ex)
            return
        name = path[3:slash]
        try:
            rest = check_app_path(path[slash:])
        except PathProblem:
            self._local(ex, pages.bad_request(_wants_text(ex)))
            return
        known = self._session(ex, scan, name)
        if known is None:
            return
        route = self.routes.get(name)
        if route is None:
            route = self._missing_route(ex, name, known)
            if route is None:
                return
        if not self._allowed(ex, known, route, scan):
            return
        if self._suffix:
            self._hand_over(ex, known, route, rest + sep + query)
            return
        ex.route = route
        ex.live = known.live
        ex.upstream_head = self._upstream_head(
            ex, scan, route, route.prefix + rest + sep + query, known, False
        )
        ex.state = READY

    def _admit_odd_path(self, ex: Exchange) -> None:
        """``/t/name`` without a slash, a fragment, or a name that is no name."""
        try:
            where = parse_proxy_path(ex.url)
        except PathProblem:
            self._local(ex, pages.bad_request(_wants_text(ex)))
            return
        if where is None:
            self._local(ex, pages.not_found(_wants_text(ex)))
        else:
            self._local(ex, pages.redirect(308, where.redirect))

    def _admit_host(self, ex: Exchange, scan: RequestScan, name: bytes) -> None:
        ex.host_mode = True
        if not ex.url.startswith(b"/"):
            self._local(ex, pages.not_found(_wants_text(ex)))
            return
        route = self.routes.get(name)
        path, sep, query = ex.url.partition(b"?")
        if path.startswith(b"/__domum/"):
            if path == b"/__domum/enter" and ex.method in (b"GET", b"HEAD"):
                if route is not None:
                    self._enter(ex, route, query)
                    return
                if not ex.admit_flags & 2 and self._may_reload_for(name):
                    # A code minted by another replica for a target created since this
                    # process last loaded its routes: reload once, then admit again.
                    self._pending(ex, None, reload=True)
                    return
            self._local(ex, pages.not_found(_wants_text(ex)))
            return
        try:
            path = check_app_path(path)
        except PathProblem:
            self._local(ex, pages.bad_request(_wants_text(ex)))
            return
        known: _Known | None = None
        cookie = scan.cookie
        if cookie and route is not None and self._tickets.get(cookie) == route.target_id:
            known = self._known.get(cookie)
        if known is None:
            known = self._session(ex, scan, name)
            if known is None:
                return
        if route is None:
            route = self._missing_route(ex, name, known)
            if route is None:
                return
        if not self._allowed(ex, known, route, scan):
            return
        ex.route = route
        ex.live = known.live
        target = route.prefix + path + sep + query
        ex.upstream_head = self._upstream_head(ex, scan, route, target, known, True)
        ex.state = READY

    def _session(self, ex: Exchange, scan: RequestScan, name: bytes) -> _Known | None:
        """The admitted session behind the request's cookie; None when answered or pending."""
        cookie = scan.cookie
        if cookie:
            known = self._known.get(cookie)
            if known is not None and not known.live.ended:
                if cookie not in self._tickets:  # a host-mode cookie only opens its own host
                    return known
            elif not ex.admit_flags & 1 and len(cookie) <= 128 and self._may_look_up(ex, cookie):
                self._pending(ex, cookie, reload=False)
                return None
        text = name.decode("latin-1")
        retry = f"{self._base_url}/t/{text}/"
        if not ex.host_mode and ex.method == b"GET":
            retry = ex.url.decode("latin-1")
        self._local(ex, pages.login_required(text, retry, self._portal, _wants_text(ex)))
        return None

    def _may_look_up(self, ex: Exchange, cookie: bytes) -> bool:
        """Whether an unknown cookie may cost a store lookup.

        Not when the store said "no such session" for it in the last few seconds (a page
        full of assets after a logout), nor more than ``_LOOKUPS_PER_MINUTE`` times a
        minute from one address: random cookies must not turn into database load.
        """
        failed = self._unknown.get(cookie)
        if failed is not None and self.now() - failed < _UNKNOWN_TTL:
            return False
        return self._lookups.hit(ex.front.peer_host) == 0

    def _missing_route(self, ex: Exchange, name: bytes, known: _Known) -> Route | None:
        """No route for ``name``: reload the table once when the grant names a target this
        process has not loaded yet (one created since the last reload); else 404."""
        reloading = self._reloading is not None and not self._reloading.done()
        if not ex.admit_flags & 2 and (reloading or self._grant_has_new_targets(known.live)):
            self._pending(ex, None, reload=True)
        else:
            self._local(ex, pages.not_found(_wants_text(ex)))
        return None

    def _grant_has_new_targets(self, live: LiveSession) -> bool:
        now = self.now()
        fresh = False
        for target_id in live.grant.targets:
            if target_id in self._target_ids:
                continue
            if now - self._tried.get(target_id, -_RELOAD_INTERVAL) < _RELOAD_INTERVAL:
                continue
            self._tried[target_id] = now
            fresh = True
        return fresh

    def _may_reload_for(self, name: bytes) -> bool:
        """Whether an unknown host name may trigger a route reload (once per interval)."""
        key = "host:" + name.decode("latin-1")
        now = self.now()
        if now - self._tried.get(key, -_RELOAD_INTERVAL) < _RELOAD_INTERVAL:
            return False
        if len(self._tried) >= _MAX_TRIED:
            self._tried.clear()
        self._tried[key] = now
        return True

    def _allowed(self, ex: Exchange, known: _Known, route: Route, scan: RequestScan) -> bool:
        front = ex.front
        peer = front.peer
        if self._trusted and scan.forwarded_for:
            headers = [v.decode("latin-1") for v in scan.forwarded_for]
            try:
                peer = client_address(front.peer_host, headers, self._trusted)
            except ValueError:
                peer = None
        live = known.live
        if peer is None:
            self._local(ex, pages.bad_request(_wants_text(ex)))
            return False
        self.admitting = front
        try:
            decision = self.sessions.check(live, peer, route.target_id)
        finally:
            self.admitting = None
        if decision is ALLOW:
            ex.client = peer
            if live.id not in front.watched:
                front.watch(live)
            if route.target_id not in known.used:
                known.used.add(route.target_id)
                self._audit_first_use(known, route, str(peer))
            return True
        reason = decision.reason if isinstance(decision, Deny) else DenyReason.UNKNOWN
        status = 401 if reason in _SIGNED_OUT else 403
        self._local(ex, pages.denied(status, explain(reason, live.grant), self._portal, _wants_text(ex)))
        return False

    def _local(self, ex: Exchange, page: LocalResponse) -> None:
        ex.local = page
        ex.status = page.status
        ex.state = LOCAL

    def _pending(self, ex: Exchange, cookie: bytes | None, *, reload: bool) -> None:
        ex.state = PENDING
        if cookie is not None:
            ex.admit_flags |= 1
        if reload:
            ex.admit_flags |= 2
            self._schedule_reload()  # now, so that exchanges admitted meanwhile wait for it too
        self.spawned(asyncio.ensure_future(self._resolve(ex, cookie, reload)))

    async def _resolve(self, ex: Exchange, cookie: bytes | None, reload: bool) -> None:
        try:
            if cookie is not None:
                if not await self._look_up_cookie(cookie, ex.host_mode):
                    if len(self._unknown) >= _MAX_KNOWN:
                        self._unknown.clear()
                    self._unknown[cookie] = self.now()
            if reload:
                await asyncio.shield(self._schedule_reload())
        except DomumError as exc:
            log.warning("proxy.admission_lookup_failed detail=%s", exc.detail)
        if ex.state != PENDING:
            return
        ex.state = 0  # NEW: admit again, now from memory
        self.admit(ex)
        if ex.state != PENDING:
            ex.front.admitted(ex)

    async def _look_up_cookie(self, cookie: bytes, host_mode: bool) -> bool:
        """Load a cookie this process has not seen: a host-mode cookie (on a target's own
        host, maybe minted by another replica), else a session cookie. True when admitted
        to the cache."""
        text = cookie.decode("latin-1")
        if host_mode:
            found = await self.ctx.store.find_session_secret(
                SecretKind.HOST_COOKIE, hash_secret(text), self.ctx.clock.now()
            )
            if found is not None:
                live = await self.sessions.lookup_hash(found.session_hash)
                if live is None or live.ended or found.target_id is None:
                    return False
                self._remember(cookie, live)
                self._tickets[cookie] = found.target_id
                return True
        live = await self.sessions.lookup(text)
        if live is None or live.ended:
            return False
        self._remember(cookie, live)
        return True

    def _remember(self, cookie: bytes, live: LiveSession) -> _Known:
        known = self._by_session.get(live.id)
        if known is None or known.live is not live:
            if len(self._known) >= _MAX_KNOWN:
                self._forget_all()
            known = self._new_known(live)
        known.keys.append(cookie)
        self._known[cookie] = known
        return known

    def _new_known(self, live: LiveSession) -> _Known:
        identity = (
            b"X-Domum-User: " + live.user_id.encode() + b"\r\nX-Domum-Request: " + live.request_id.encode()
        )
        known = _Known(live, identity)
        self._by_session[live.id] = known

        def forget(_: str) -> None:
            for key in known.keys:
                if self._known.get(key) is known:
                    del self._known[key]
                self._tickets.pop(key, None)
            known.keys.clear()
            if self._by_session.get(live.id) is known:
                del self._by_session[live.id]

        known.detach = self.sessions.attach(live, forget)
        return known

    def _forget_all(self) -> None:
        for known in list(self._by_session.values()):
            if known.detach is not None:
                known.detach()
        self._known.clear()
        self._tickets.clear()
        self._by_session.clear()

    # host mode ---------------------------------------------------------------------------
    def host_url(self, name: str) -> str:
        return f"{self._scheme}://{name}.{self.domain}{self._port}"

    def _after_store(self, ex: Exchange, step: Coroutine[Any, Any, Callable[[], None]]) -> None:
        """Answer ``ex`` once ``step`` (store work) returns how to finish it (in memory)."""
        ex.state = PENDING
        self.spawned(asyncio.ensure_future(self._run_step(ex, step)))

    async def _run_step(self, ex: Exchange, step: Coroutine[Any, Any, Callable[[], None]]) -> None:
        try:
            finish = await step
        except DomumError as exc:
            log.warning("proxy.host_mode_store_failed detail=%s", exc.detail)
            finish = partial(self._local, ex, pages.unavailable(_wants_text(ex)))
        if ex.state != PENDING:
            return
        finish()  # may start another step (the exchange stays pending)
        if ex.state != PENDING:
            ex.front.admitted(ex)

    def _sign_in_again(self, ex: Exchange, route: Route) -> Callable[[], None]:
        retry = f"{self._base_url}/t/{route.name}/"
        return partial(
            self._local, ex, pages.login_required(route.name, retry, self._portal, _wants_text(ex))
        )

    def _hand_over(self, ex: Exchange, known: _Known, route: Route, rest: bytes) -> None:
        if ex.method not in (b"GET", b"HEAD") or ex.websocket:
            self._local(ex, pages.use_host(route.name, self.host_url(route.name) + "/", _wants_text(ex)))
            return
        self._after_store(ex, self._mint_code(ex, known.live, route, rest.decode("latin-1")))

    async def _mint_code(self, ex: Exchange, live: LiveSession, route: Route, nxt: str) -> Callable[[], None]:
        """Store a one-time hand-over code (before the browser can take it to any replica)."""
        code = secrets.token_urlsafe(24)
        now = self.ctx.clock.now()
        stored = await self.ctx.store.add_session_secret(
            SecretKind.HOST_CODE,
            hash_secret(code),
            live.id,
            now,
            now + timedelta(seconds=_CODE_TTL),
            target_id=route.target_id,
            detail=nxt,
            max_per_session=_MAX_CODES_PER_SESSION,
        )
        if not stored:
            if live.ended:
                return self._sign_in_again(ex, route)
            return partial(self._local, ex, pages.too_many(_wants_text(ex)))
        url = f"{self.host_url(route.name)}/__domum/enter?code={code}&next={quote(nxt, safe='')}"
        return partial(self._local, ex, pages.redirect(303, url.encode()))

    def _enter(self, ex: Exchange, route: Route, query: bytes) -> None:
        params = dict(parse_qsl(query.decode("latin-1")))
        code = params.get("code", "")
        if not code or len(code) > 64:
            self._sign_in_again(ex, route)()
            return
        self._after_store(ex, self._take_code(ex, route, code))

    async def _take_code(self, ex: Exchange, route: Route, code: str) -> Callable[[], None]:
        """Spend the code (once, across every replica) and load its session."""
        found = await self.ctx.store.take_session_secret(
            SecretKind.HOST_CODE, hash_secret(code), self.ctx.clock.now()
        )
        if found is None or found.target_id != route.target_id:
            return self._sign_in_again(ex, route)
        live = await self.sessions.lookup_hash(found.session_hash)
        if live is None or live.ended:
            return self._sign_in_again(ex, route)
        return partial(self._code_taken, ex, route, live, found.detail or "/")

    def _code_taken(self, ex: Exchange, route: Route, live: LiveSession, nxt: str) -> None:
        if live.ended:
            self._sign_in_again(ex, route)()
            return
        known = self._by_session.get(live.id)
        if known is None or known.live is not live:
            known = self._new_known(live)
        if not self._allowed(ex, known, route, RequestScan([])):
            return
        if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:
            nxt = "/"
        self._after_store(ex, self._mint_host_cookie(ex, route, known, nxt))

    async def _mint_host_cookie(
        self, ex: Exchange, route: Route, known: _Known, nxt: str
    ) -> Callable[[], None]:
        """Store the target host's cookie (valid while the session lives, at most until the
        window ends) before the browser can present it to any replica."""
        live = known.live
        value = new_session_id()
        now = self.ctx.clock.now()
        stored = await self.ctx.store.add_session_secret(
            SecretKind.HOST_COOKIE,
            hash_secret(value),
            live.id,
            now,
            max(live.grant.end, now + timedelta(seconds=_CODE_TTL)),
            target_id=route.target_id,
            max_per_session=_MAX_HOST_COOKIES_PER_SESSION,
        )
        if not stored:
            if live.ended:
                return self._sign_in_again(ex, route)
            return partial(self._local, ex, pages.too_many(_wants_text(ex)))
        return partial(self._host_cookie_set, ex, route, known, value.encode(), nxt)

    def _host_cookie_set(self, ex: Exchange, route: Route, known: _Known, value: bytes, nxt: str) -> None:
        if known.live.ended:
            self._sign_in_again(ex, route)()
            return
        self._remember(value, known.live)
        self._tickets[value] = route.target_id
        cookie = b"Set-Cookie: __Host-domum=%s; Path=/; Secure; HttpOnly; SameSite=Strict" % value
        self._local(ex, pages.redirect(303, quote(nxt, safe="/?&=%;:@!$'()*+,~-._").encode(), [cookie]))

    # target request head -------------------------------------------------------------------
    def _upstream_head(
        self, ex: Exchange, scan: RequestScan, route: Route, target: bytes, known: _Known, host_mode: bool
    ) -> bytes:
        front = ex.front
        host = scan.host
        key = front.suffix_key
        if key is None or key[0] is not route or key[1] is not known or key[2] != host or self._trusted:
            front.suffix_key = (route, known, host)
            front.suffix = self._suffix_lines(ex.client or front.peer, route, known, host, host_mode)
        framing = b""
        if ex.websocket:
            framing = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        elif scan.chunked:
            framing = b"Transfer-Encoding: chunked\r\n"
            ex.body_framing = 2
        elif scan.has_length:
            ex.body_framing = 1
        return b"".join(
            (ex.method, b" ", target, b" HTTP/1.1\r\n", route.host_header, scan.block, framing, front.suffix)
        )

    def _suffix_lines(
        self, client: IPAddress | None, route: Route, known: _Known, host: bytes, host_mode: bool
    ) -> bytes:
        """The headers the gateway writes itself, ending the head (cached per connection)."""
        peer = str(client) if client is not None else "unknown"
        node = f'"[{peer}]"' if ":" in peer else peer
        forwarded = f"for={node};proto=https"
        text_host = host.decode("latin-1")
        if text_host and '"' not in text_host and "\\" not in text_host:
            forwarded += f';host="{text_host}"'
        lines = [
            f"X-Forwarded-For: {peer}\r\nX-Forwarded-Proto: https".encode(),
            b"Forwarded: " + forwarded.encode("latin-1"),
        ]
        if host:
            lines.append(b"X-Forwarded-Host: " + host)
        if not host_mode:
            lines.append(b"X-Forwarded-Prefix: " + route.public_prefix)
        lines.append(known.identity)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    # responses ------------------------------------------------------------------------------
    def rewrite_head(self, block: bytes, route: Route, host_mode: bool) -> bytes:
        """Map Location, Content-Location and Set-Cookie from the target's view to the client's."""
        public = b"" if host_mode else route.public_prefix
        out: list[bytes] = []
        for line in block.split(b"\r\n"):
            colon = line.find(b":")
            lname = line[:colon].lower() if colon > 0 else b""
            if lname == b"location" or lname == b"content-location":
                value = line[colon + 1 :].strip()
                mapped = map_location(value, route.prefix, public, route.origins)
                if mapped is not value:
                    line = line[: colon + 1] + b" " + mapped
            elif lname == b"set-cookie":
                cookie = rewrite_set_cookie(line[colon + 1 :].strip(), route.prefix, public)
                if cookie is None:
                    continue
                line = line[: colon + 1] + b" " + cookie
            out.append(line)
        return b"\r\n".join(out)

    def gateway_error_page(self, route: Route | None, timeout: bool, ex: Exchange) -> LocalResponse:
        return pages.gateway_error(route.name if route else "the application", timeout, _wants_text(ex))

    def bad_request_page(self) -> LocalResponse:
        return pages.bad_request()

    def upstream_failed(self, ex: Exchange, exc: UpstreamFailure) -> None:
        route = ex.route
        log.warning(
            "proxy.upstream_failed target=%s kind=%s detail=%s",
            route.name if route else "-",
            exc.type,
            exc.detail,
        )

    # accounting --------------------------------------------------------------------------------
    def record(self, ex: Exchange) -> None:
        """Metrics and access log for a finished exchange (memory only; never raises)."""
        if ex.websocket and ex.status == 101:
            return  # counted when the tunnel closes
        duration = self.now() - ex.started
        route = ex.route
        counts = route.counts if route is not None else self.counts["-"]
        counts.observe(ex.status, duration)
        counts.bytes_up += ex.bytes_in
        counts.bytes_down += ex.bytes_out
        self._bytes_up += ex.bytes_in
        self._bytes_down += ex.bytes_out
        if access_log.isEnabledFor(logging.INFO):
            live = ex.live
            access_log.info(
                "proxy.request user=%s target=%s method=%s path=%s status=%d bytes_in=%d bytes_out=%d "
                "ms=%.1f",
                live.user_id if live else "-",
                route.name if route else "-",
                ex.method.decode("latin-1"),
                _log_path(ex.url),
                ex.status,
                ex.bytes_in,
                ex.bytes_out,
                duration * 1000,
            )

    def touch(self, live: LiveSession) -> None:
        if not live.ended:
            self.sessions.touch(live)

    def tunnel_opened(self, ex: Exchange, cut: Callable[[str], None]) -> None:
        """A websocket is open: in the live registry (cut with the session, or alone), audited."""
        ex.started = self.now()
        live, route = ex.live, ex.route
        if live is not None and route is not None:
            origin = str(ex.client or ex.front.peer or ex.front.peer_host)
            ex.registry = self.sessions.open_connection(live, "websocket", route.name, origin, cut)
        self._audit_ws(ex, "proxy.websocket.opened", {})

    def tunnel_closed(self, ex: Exchange) -> None:
        if ex.registry is not None:
            self.sessions.close_connection(ex.registry)
        duration = self.now() - ex.started
        self._bytes_up += ex.bytes_in
        self._bytes_down += ex.bytes_out
        route = ex.route
        if route is not None:
            route.counts.observe(101, duration)
            route.counts.bytes_up += ex.bytes_in
            route.counts.bytes_down += ex.bytes_out
        live = ex.live
        reason = live.end_reason if live is not None and live.ended else ""
        self._audit_ws(
            ex,
            "proxy.websocket.closed",
            {
                "bytes_up": ex.bytes_in,
                "bytes_down": ex.bytes_out,
                "seconds": round(duration, 3),
                **({"reason": reason} if reason else {}),
            },
        )

    def _audit_first_use(self, known: _Known, route: Route, origin: str) -> None:
        live = known.live
        self._audit(
            AuditEntry(
                actor=f"user:{live.user_id}",
                action="proxy.first_use",
                subject=route.target_id,
                origin=origin,
                details={
                    "request_id": live.request_id,
                    "session_id": live.id,
                    "target": route.name,
                    "tls_verify": route.tls_verify,
                },
            )
        )

    def _audit_ws(self, ex: Exchange, action: str, extra: dict[str, Any]) -> None:
        live, route = ex.live, ex.route
        if live is None or route is None:
            return
        self._audit(
            AuditEntry(
                actor=f"user:{live.user_id}",
                action=action,
                subject=route.target_id,
                origin=str(ex.front.peer or ex.front.peer_host),
                details={
                    "request_id": live.request_id,
                    "session_id": live.id,
                    "target": route.name,
                    "path": _log_path(ex.url),
                    "tls_verify": route.tls_verify,
                    **extra,
                },
            )
        )

    def _audit(self, entry: AuditEntry) -> None:
        async def write() -> None:
            try:
                await self.ctx.store.append_audit(entry)
            except DomumError as exc:
                log.warning("proxy.audit_failed action=%s detail=%s", entry.action, exc.detail)

        self.spawned(asyncio.ensure_future(write()))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The aiohttp route for ``/t/...`` (connections that started with a gateway page)."""
        return await serve_on_aiohttp(self, request)


def _host_name(host: bytes) -> bytes:
    host = host.strip().lower()
    if host.startswith(b"["):
        return host[: host.find(b"]") + 1]
    colon = host.rfind(b":")
    if colon >= 0:
        host = host[:colon]
    return host.rstrip(b".")


def _wants_text(ex: Exchange) -> bool:
    """Scripts and XHR get a short text answer; navigations get a page."""
    accept = b""
    for name, value in ex.headers:
        lname = name.lower()
        if lname == b"x-requested-with":
            return True
        if lname == b"sec-fetch-mode" and value.strip().lower() not in (b"navigate", b"nested-navigate"):
            return True
        if lname == b"accept":
            accept = value
    return b"text/html" not in accept


def _log_path(url: bytes) -> str:
    return url.partition(b"?")[0][:512].decode("latin-1")


HTTP_PROXY = web.AppKey("http_proxy", HttpProxy)


def add_http_proxy_routes(app: web.Application, ctx: PublicContext, *, grace: float = 10.0) -> HttpProxy:
    """Register the proxy on the public app; connections reach it through :func:`public_site`."""
    engine = HttpProxy(ctx, grace)
    app[HTTP_PROXY] = engine
    if CTX not in app:
        app[CTX] = ctx
    app.router.add_route("*", "/t/{tail:.*}", engine.handle)
    app.on_startup.append(engine.on_startup)
    app.on_shutdown.append(engine.on_shutdown)
    app.on_cleanup.append(engine.on_cleanup)
    return engine


def public_site(
    runner: web.AppRunner, host: str, port: int, *, ssl_context: Any = None, backlog: int = 128
) -> web.BaseSite:
    """The listener for the public app: the proxy's front protocol when it is registered."""
    engine = runner.app.get(HTTP_PROXY)
    if engine is None:
        return web.TCPSite(runner, host, port, ssl_context=ssl_context, backlog=backlog)
    return FrontSite(runner, engine, host=host, port=port, ssl_context=ssl_context, backlog=backlog)
