"""The control API (`/api/v1`) on the admin listener.

Every route declares the least role it needs; the ``auth`` middleware resolves the Bearer
token (stored only as a hash) before any handler runs, so a route without a role entry is
unreachable (deny by default).

One route also accepts the admin console's session cookie instead of a Bearer token: the
live-watch websocket (``GET /api/v1/sessions/{id}/watch``), because browsers cannot set
headers on a websocket. That path insists on the console cookie (never the public
``__Host-domum`` one) and on a handshake from the admin listener's own origin.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

from aiohttp import web

from ..auth.grant import build_grant, judge
from ..auth.origin import normalise_address
from ..auth.secrets import hash_secret
from ..auth.windows import parse_instant
from ..clock import Clock
from ..errors import BadRequest, Conflict, DomumError, Forbidden, NotFound, Unauthorized, ValidationError
from ..model import ApiToken, RequestStatus, Role
from ..store.base import CONNECTION_STALE_AFTER, AuditFilter, ConnectionRecord, RequestFilter, Store
from .console_session import COOKIE as CONSOLE_COOKIE
from .console_web import same_origin_socket, viewer_of
from .evidence import EvidenceBuilder
from .fields import Reader, read_json
from .openapi import build_openapi
from .retention import Retention
from .service import Actor, AdminService
from .views import (
    event_json,
    group_json,
    iso,
    reason_json,
    request_json,
    session_json,
    target_json,
    user_json,
)

__all__ = ["API_TOKEN", "ApiContext", "add_api_routes", "api_auth_middleware"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API_TOKEN = web.RequestKey("api_token", ApiToken)
_VIA_CONSOLE = web.RequestKey("api_via_console", bool)

log = logging.getLogger("domum.api")


class LiveFeed(Protocol):
    """One watcher of a live terminal (``proxy/watch.py``), as the API drives it."""

    async def relay(self, ws: web.WebSocketResponse) -> str: ...

    async def close(self, ws: web.WebSocketResponse) -> None: ...

    def leave(self) -> None: ...


class LiveWatch(Protocol):
    """The live terminals of this process that auditors can watch (``proxy/watch.py``)."""

    def subscribe(self, connection_id: str, name: str, role: str) -> LiveFeed: ...

    def shutdown(self, reason: str) -> None: ...


class WebsocketRequired(DomumError):
    status = 426
    type = "websocket-required"
    title = "Websocket required"


class ApiContext:
    """What the API handlers need, handed over by the composition root."""

    def __init__(
        self,
        store: Store,
        service: AdminService,
        clock: Clock,
        evidence: EvidenceBuilder,
        retention: Retention,
    ) -> None:
        self.store = store
        self.service = service
        self.clock = clock
        self.evidence = evidence
        self.retention = retention
        # (method, path) -> least role; AUDITOR < ADMIN
        self.roles: dict[tuple[str, str], Role] = {}
        # The live-connection registry of this process (tunnels, terminals, SSH channels,
        # proxied websockets); handed over by the composition root.
        self.connections: Callable[[], list[dict[str, Any]]] = list
        self.cut_connection: Callable[[str, str], bool] = lambda _id, _reason: False
        # This process's name in the shared registry (``live_connections.replica``), and
        # the request to cut a connection another replica holds (a bus message).
        self.replica = ""
        self.cut_elsewhere: Callable[[str, str], None] = lambda _id, _reason: None
        # Seconds a DELETE of another replica's connection waits to see it gone (else 202).
        self.cut_wait = 2.0
        # Read-only live view of browser terminals; None where terminals are not served.
        self.watch: LiveWatch | None = None
        # (method, path) -> the query parameters the operation takes (from the OpenAPI).
        self.query_names: dict[tuple[str, str], frozenset[str]] = {}


CTX = web.AppKey("api_ctx", ApiContext)


def _rank(role: Role) -> int:
    return 2 if role is Role.ADMIN else 1


async def _resolve_token(store: Store, header: str | None) -> ApiToken:
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("Send an API token as 'Authorization: Bearer <token>'.")
    presented = header[7:].strip()
    if not presented or len(presented) > 200:
        raise Unauthorized("The API token is not valid.")
    digest = hash_secret(presented)
    # Looked up by SHA-256 digest: any timing difference concerns the digest, which a
    # caller cannot steer towards a stored one, never the token itself.
    token = await store.find_api_token(digest)
    if token is None:
        raise Unauthorized("The API token is not valid.")
    return token


@web.middleware
async def api_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/api/"):
        return await handler(request)
    ctx = request.app[CTX]
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else None
    header = request.headers.get("Authorization")
    if header is None and (request.method, canonical) in _COOKIE_ROUTES:
        token = await _console_token(request)
    else:
        token = await _resolve_token(ctx.store, header)
    need = ctx.roles.get((request.method, canonical)) if canonical else None
    if need is None and request.method == "HEAD" and canonical:
        need = ctx.roles.get(("GET", canonical))
    if need is None:
        # Unknown path or method: let aiohttp answer 404/405 (mapped to problem+json).
        return await handler(request)
    if _rank(token.role) < _rank(need):
        raise Forbidden(f"The {token.role.value} role may not do this.")
    if request.query:
        _refuse_unknown_query(request, ctx, canonical)
    request[API_TOKEN] = token
    return await handler(request)


def _refuse_unknown_query(request: web.Request, ctx: ApiContext, canonical: str | None) -> None:
    """400 for a query parameter the operation does not take (``?stauts=`` is a typo, not
    "no filter"): the names come from the OpenAPI document, the one list of them."""
    method = "GET" if request.method == "HEAD" else request.method
    allowed = ctx.query_names.get((method, canonical or ""))
    if allowed is None:
        return  # not an operation of the document (aiohttp answers 404/405)
    unknown = sorted({k for k in request.query if k not in allowed})
    if unknown:
        takes = ", ".join(sorted(allowed)) or "none"
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        raise BadRequest(f"Unknown query parameter {shown}; this operation takes: {takes}.")


async def _console_token(request: web.Request) -> ApiToken:
    """The API token behind the admin console's session cookie, for the cookie routes."""
    if not request.cookies.get(CONSOLE_COOKIE):
        raise Unauthorized(
            "Send an API token as 'Authorization: Bearer <token>', or open this from the admin console."
        )
    if not same_origin_socket(request):
        log.info("api.console_cookie_refused origin=%r", request.headers.get("Origin", "")[:200])
        raise Forbidden("The admin console's session can only be used from the admin console's own pages.")
    viewer = await viewer_of(request)
    if viewer is None:
        raise Unauthorized("The admin console session has ended; sign in again.")
    request[_VIA_CONSOLE] = True
    return viewer.token


def actor_of(request: web.Request) -> Actor:
    token = request[API_TOKEN]
    via = "console" if request.get(_VIA_CONSOLE) else "token"
    return Actor(f"{via}:{token.name}", request.remote or "")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda v: json.dumps(v, ensure_ascii=False))


def _query_int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not lo <= int(raw) <= hi:
        raise ValidationError.one(name, f"must be an integer between {lo} and {hi}")
    return int(raw)


def _query_str(request: web.Request, name: str, max_len: int = 100) -> str | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > max_len:
        raise ValidationError.one(name, f"must be at most {max_len} characters")
    return raw


def _ctx(request: web.Request) -> ApiContext:
    return request.app[CTX]


# groups ----------------------------------------------------------------------
async def create_group(request: web.Request) -> web.Response:
    g = await _ctx(request).service.create_group(await read_json(request), actor_of(request))
    return _json(group_json(g), 201)


async def list_groups(request: web.Request) -> web.Response:
    return _json({"items": [group_json(g) for g in await _ctx(request).store.list_groups()]})


async def get_group(request: web.Request) -> web.Response:
    g = await _ctx(request).store.get_group(request.match_info["id"])
    if g is None:
        raise NotFound("No such group.")
    return _json(group_json(g))


async def patch_group(request: web.Request) -> web.Response:
    g = await _ctx(request).service.update_group(
        request.match_info["id"], await read_json(request), actor_of(request)
    )
    return _json(group_json(g))


async def delete_group(request: web.Request) -> web.Response:
    await _ctx(request).service.delete_group(request.match_info["id"], actor_of(request))
    return web.Response(status=204)


# users -----------------------------------------------------------------------
async def create_user(request: web.Request) -> web.Response:
    u = await _ctx(request).service.create_user(await read_json(request), actor_of(request))
    return _json(user_json(u), 201)


async def list_users(request: web.Request) -> web.Response:
    users = await _ctx(request).store.list_users(_query_str(request, "group_id", 64))
    return _json({"items": [user_json(u) for u in users]})


async def get_user(request: web.Request) -> web.Response:
    u = await _ctx(request).store.get_user(request.match_info["id"])
    if u is None:
        raise NotFound("No such user.")
    return _json(user_json(u))


async def patch_user(request: web.Request) -> web.Response:
    u = await _ctx(request).service.update_user(
        request.match_info["id"], await read_json(request), actor_of(request)
    )
    return _json(user_json(u))


async def delete_user(request: web.Request) -> web.Response:
    """Delete a user without history, or with ``?erase=true`` erase their personal data."""
    ctx = _ctx(request)
    erase = request.query.get("erase", "false").lower()
    if erase not in ("true", "false", "1", "0"):
        raise ValidationError.one("erase", "must be true or false")
    if erase in ("true", "1"):
        await ctx.retention.erase(request.match_info["id"], actor_of(request))
    else:
        await ctx.service.delete_user(request.match_info["id"], actor_of(request))
    return web.Response(status=204)


async def export_user(request: web.Request) -> web.Response:
    """Everything held about one user (data-subject access request)."""
    ctx = _ctx(request)
    data = await ctx.retention.export(request.match_info["id"])
    await ctx.store.append_audit(actor_of(request).entry("user.exported", request.match_info["id"]))
    return _json(data)


# reasons ---------------------------------------------------------------------
async def create_reason(request: web.Request) -> web.Response:
    r = await _ctx(request).service.create_reason(await read_json(request), actor_of(request))
    return _json(reason_json(r), 201)


async def list_reasons(request: web.Request) -> web.Response:
    return _json({"items": [reason_json(r) for r in await _ctx(request).store.list_reasons()]})


async def get_reason(request: web.Request) -> web.Response:
    r = await _ctx(request).store.get_reason(request.match_info["id"])
    if r is None:
        raise NotFound("No such reason.")
    return _json(reason_json(r))


async def delete_reason(request: web.Request) -> web.Response:
    await _ctx(request).service.delete_reason(request.match_info["id"], actor_of(request))
    return web.Response(status=204)


# targets ---------------------------------------------------------------------
async def create_target(request: web.Request) -> web.Response:
    t = await _ctx(request).service.create_target(await read_json(request), actor_of(request))
    return _json(target_json(t), 201)


async def list_targets(request: web.Request) -> web.Response:
    return _json({"items": [target_json(t) for t in await _ctx(request).store.list_targets()]})


async def get_target(request: web.Request) -> web.Response:
    t = await _ctx(request).store.get_target(request.match_info["id"])
    if t is None:
        raise NotFound("No such target.")
    return _json(target_json(t))


async def patch_target(request: web.Request) -> web.Response:
    t = await _ctx(request).service.update_target(
        request.match_info["id"], await read_json(request), actor_of(request)
    )
    return _json(target_json(t))


async def delete_target(request: web.Request) -> web.Response:
    await _ctx(request).service.delete_target(request.match_info["id"], actor_of(request))
    return web.Response(status=204)


# access requests -------------------------------------------------------------
def _dry_run(request: web.Request) -> bool:
    raw = request.query.get("dry_run", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise ValidationError.one("dry_run", "must be true or false")
    return raw in ("true", "1")


async def create_request(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    body = await read_json(request)
    actor = actor_of(request)
    if _dry_run(request):
        review = await ctx.service.review(body, actor)
        out = request_json(review.request)
        out["id"] = None
        out["status"] = "review"
    else:
        review = await ctx.service.create_request(body, actor)
        out = request_json(review.request)
    out["channel"] = review.user.channel.value
    out["user"] = {"id": review.user.id, "name": review.user.name, "third_party": review.new_user}
    out["group"] = {"id": review.group.id, "name": review.group.name}
    out["targets"] = [{"id": t.id, "name": t.name, "protocol": t.protocol.value} for t in review.targets]
    return _json(out, 200 if out["status"] == "review" else 201)


async def list_requests(request: web.Request) -> web.Response:
    # Not _query_str: an empty ``status=`` is a wrong value, not "no filter".
    status_raw = request.query.get("status")
    status = None
    if status_raw is not None:
        try:
            status = RequestStatus(status_raw)
        except ValueError as exc:
            raise ValidationError.one(
                "status", "must be one of " + ", ".join(s.value for s in RequestStatus)
            ) from exc
    flt = RequestFilter(
        status=status,
        user_id=_query_str(request, "user_id", 64),
        group_id=_query_str(request, "group_id", 64),
        limit=_query_int(request, "limit", 50, 1, 500),
        cursor=_query_str(request, "cursor", 500),
    )
    page = await _ctx(request).store.list_requests(flt)
    return _json({"items": [request_json(r) for r in page.items], "next_cursor": page.next_cursor})


async def get_request(request: web.Request) -> web.Response:
    req = await _ctx(request).service.get_request(request.match_info["id"])
    return _json(request_json(req))


async def forward_request(request: web.Request) -> web.Response:
    fwd = await _ctx(request).service.forward(request.match_info["id"], actor_of(request))
    out = request_json(fwd.request)
    out["sent_to"] = fwd.sent_to
    out["channel"] = fwd.channel.value
    return _json(out)


async def revoke_request(request: web.Request) -> web.Response:
    req = await _ctx(request).service.revoke(request.match_info["id"], actor_of(request))
    return _json(request_json(req))


async def request_evidence(request: web.Request) -> web.Response:
    """The signed evidence bundle of one access request."""
    ctx = _ctx(request)
    bundle = await ctx.evidence.build(request.match_info["id"])
    rid = bundle["request"]["id"]
    await ctx.store.append_audit(
        actor_of(request).entry("request.evidence_exported", rid, details={"request_id": rid})
    )
    return web.json_response(
        bundle,
        headers={"Content-Disposition": f'attachment; filename="evidence-{rid}.json"'},
    )


# sessions --------------------------------------------------------------------
async def list_sessions(request: web.Request) -> web.Response:
    """Live sessions, each with the live connections (tunnels, terminals, channels) it holds.

    Connections of every replica: the shared registry's rows refreshed within
    ``CONNECTION_STALE_AFTER``, with this replica's own taken from memory instead (fresher
    byte counts; its rows lag by up to one flush).
    """
    ctx = _ctx(request)
    rid = _query_str(request, "request_id", 64)
    sessions = await ctx.store.list_sessions(rid)
    stored = await ctx.store.list_connections(ctx.clock.now() - CONNECTION_STALE_AFTER, request_id=rid)
    local = ctx.connections()
    held = {str(c["id"]) for c in local}
    merged = local + [_connection_json(r) for r in stored if r.replica != ctx.replica and r.id not in held]
    merged.sort(key=lambda c: (datetime.fromisoformat(str(c["since"])), str(c["id"])))
    by_session: dict[str, list[dict[str, Any]]] = {}
    for conn in merged:
        by_session.setdefault(str(conn["session_id"]), []).append(conn)
    items = []
    for s in sessions:
        item = session_json(s)
        item["protocol"] = "web"
        conns = by_session.get(s.id, [])
        item["connections"] = conns
        item["bytes_in"] = sum(int(c["bytes_in"]) for c in conns)
        item["bytes_out"] = sum(int(c["bytes_out"]) for c in conns)
        items.append(item)
    return _json({"items": items})


def _connection_json(r: ConnectionRecord) -> dict[str, Any]:
    """A shared-registry row in the shape of ``SessionManager.registry()`` entries."""
    return {
        "id": r.id,
        "session_id": r.session_id,
        "request_id": r.request_id,
        "user_id": r.user_id,
        "protocol": r.protocol,
        "target": r.target,
        "origin": r.origin,
        "since": iso(r.since),
        "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
        "replica": r.replica,
    }


async def delete_session(request: web.Request) -> web.Response:
    """End a session (and all its connections), or cut one connection by its ``con_`` id."""
    ctx = _ctx(request)
    sid = request.match_info["id"]
    actor = actor_of(request)
    if sid.startswith("con_"):
        return await _cut_connection(ctx, sid, actor)
    if not await ctx.service.terminate_session(sid, actor):
        raise NotFound("No live session with this id.")
    return web.Response(status=204)


_CUT_REASON = "terminated by an administrator"


async def _cut_connection(ctx: ApiContext, cid: str, actor: Actor) -> web.Response:
    """Cut one connection wherever it is held; audited here, once.

    Held here: cut now, 204. Held by another replica (a fresh row in the shared registry):
    that replica is told over the bus and cuts it; 204 once its row has left the registry,
    or 202 when that takes longer than ``cut_wait`` (the cut is under way, asynchronously).
    Unknown, already gone, or its replica dead (a stale row): 404.
    """
    here = next((c for c in ctx.connections() if c["id"] == cid), None)
    if here is not None and ctx.cut_connection(cid, _CUT_REASON):
        details = {k: here[k] for k in ("session_id", "request_id", "replica")}
        await ctx.store.append_audit(actor.entry("connection.terminated", cid, details=details))
        return web.Response(status=204)
    row = await ctx.store.get_connection(cid)
    fresh_after = ctx.clock.now() - CONNECTION_STALE_AFTER
    if row is None or row.replica == ctx.replica or row.updated_at <= fresh_after:
        raise NotFound("No live connection with this id.")
    details = {"session_id": row.session_id, "request_id": row.request_id, "replica": row.replica}
    await ctx.store.append_audit(actor.entry("connection.terminated", cid, details=details))
    ctx.cut_elsewhere(cid, _CUT_REASON)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.cut_wait
    while loop.time() < deadline:
        await asyncio.sleep(0.05)
        try:
            if await ctx.store.get_connection(cid) is None:
                return web.Response(status=204)
        except DomumError as exc:  # the cut was asked for: say so rather than fail
            log.warning("api.cut_not_confirmed connection=%s detail=%s", cid, exc.detail)
            break
    return web.Response(status=202)


async def watch_session(request: web.Request) -> web.StreamResponse:
    """Watch a browser SSH terminal live, read-only, over a websocket; nothing is kept.

    ``{id}`` is the terminal's connection id (``con_...``) or the id of a session with
    exactly one terminal open. The first text frame is ``{"type": "size", "cols", "rows"}``
    (again on every resize), then binary frames carry what the user's terminal shows from
    now on. What the watcher sends is ignored. The user sees a line naming the watcher
    when watching starts and stops; both are audit events.
    """
    ctx = _ctx(request)
    token = request[API_TOKEN]
    actor = actor_of(request)
    if ctx.watch is None:
        raise NotFound("Live watch is not available on this gateway.")
    conn = _watched(ctx.connections(), request.match_info["id"])
    cid = str(conn["id"])
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=4096, compress=False)
    if not ws.can_prepare(request).ok:
        raise WebsocketRequired("Open this URL as a websocket: it is a live, read-only view of a terminal.")
    feed = ctx.watch.subscribe(cid, token.name, token.role.value)
    details: dict[str, Any] = {
        "session_id": conn["session_id"],
        "request_id": conn["request_id"],
        "user_id": conn["user_id"],
        "target": conn["target"],
        "role": token.role.value,
        "via": "console" if request.get(_VIA_CONSOLE) else "api",
    }
    try:
        # Fail closed: a watch that cannot be audited does not start.
        await ctx.store.append_audit(actor.entry("session.watch.started", cid, details=details))
        await ws.prepare(request)
    except BaseException:
        feed.leave()
        raise
    reason = "the watch ended"
    try:
        reason = await feed.relay(ws)
    finally:
        feed.leave()
        try:
            await ctx.store.append_audit(
                actor.entry("session.watch.stopped", cid, details={**details, "reason": reason})
            )
        except DomumError as exc:
            log.warning("api.watch_stop_not_audited connection=%s detail=%s", cid, exc.detail)
    await feed.close(ws)  # after the audit event, so whoever sees the close finds it there
    return ws


def _watched(connections: list[dict[str, Any]], ref: str) -> dict[str, Any]:
    """The browser terminal ``ref`` names (its connection id, or its session's id)."""
    for conn in connections:
        if conn["id"] == ref:
            if conn["protocol"] != "ssh-terminal":
                raise Conflict(
                    f"Only browser SSH terminals can be watched; {ref} is a {conn['protocol']} "
                    "connection, whose content the gateway does not show."
                )
            return conn
    mine = [c for c in connections if c["session_id"] == ref]
    terminals = [c for c in mine if c["protocol"] == "ssh-terminal"]
    if len(terminals) == 1:
        return terminals[0]
    if terminals:
        ids = ", ".join(str(c["id"]) for c in terminals)
        raise Conflict(f"This session has {len(terminals)} terminals open; watch one by its id: {ids}.")
    if mine:
        raise Conflict("This session has no browser SSH terminal open; only those can be watched.")
    raise NotFound("No live terminal, connection or session with this id on this gateway.")


# audit -----------------------------------------------------------------------
async def list_audit(request: web.Request) -> web.Response:
    # Not _query_str: an empty ``since=`` is not a date-time (the schema says so), not "no filter".
    since_raw = request.query.get("since")
    if since_raw is not None and not 0 < len(since_raw) <= 64:
        raise ValidationError.one("since", "must be an RFC 3339 date-time, at most 64 characters")
    since: datetime | None = parse_instant(since_raw, "since") if since_raw is not None else None
    flt = AuditFilter(
        since=since,
        type=_query_str(request, "type", 64),
        request_id=_query_str(request, "request_id", 64),
        limit=_query_int(request, "limit", 100, 1, 1000),
        cursor=_query_str(request, "cursor", 200),
    )
    page = await _ctx(request).store.list_audit(flt)
    return _json({"items": [event_json(e) for e in page.items], "next_cursor": page.next_cursor})


# explain ---------------------------------------------------------------------
async def explain(request: web.Request) -> web.Response:
    """Why would this request be allowed or refused at ``at`` from ``address``?"""
    ctx = _ctx(request)
    r = Reader(await read_json(request))
    r.only(("request_id", "target_id", "address", "at"))
    request_id = r.string("request_id", max_len=64)
    target_ref = r.string("target_id", required=False, max_len=64)
    address_raw = r.string("address", required=False, max_len=64)
    at_raw = r.raw("at")
    r.check()
    assert request_id is not None
    at = parse_instant(at_raw, "at") if at_raw is not None else ctx.clock.now()
    try:
        peer = normalise_address(address_raw) if address_raw else None
    except ValueError as exc:
        raise ValidationError.one("address", "must be an IPv4 or IPv6 address") from exc
    req = await ctx.service.get_request(request_id)
    group = await ctx.store.get_group(req.group_id)
    if group is None:
        raise NotFound("The request's group no longer exists.")
    target_id = None
    if target_ref:
        target = await ctx.store.get_target(target_ref)
        if target is None:
            raise ValidationError.one("target_id", f"no target {target_ref!r} is registered")
        target_id = target.id
    out = judge(build_grant(req, group.policy), at, peer, target_id)
    out.update({"request_id": req.id, "target_id": target_id, "address": address_raw, "at": iso(at)})
    return _json(out)


async def openapi(request: web.Request) -> web.Response:
    return _json(build_openapi())


_COOKIE_ROUTES = frozenset({("GET", "/api/v1/sessions/{id}/watch")})
"""Routes that also accept the admin console's session cookie (see the module docstring)."""

ROUTES: list[tuple[str, str, Handler, Role]] = [
    ("GET", "/api/v1/openapi.json", openapi, Role.AUDITOR),
    ("POST", "/api/v1/groups", create_group, Role.ADMIN),
    ("GET", "/api/v1/groups", list_groups, Role.AUDITOR),
    ("GET", "/api/v1/groups/{id}", get_group, Role.AUDITOR),
    ("PATCH", "/api/v1/groups/{id}", patch_group, Role.ADMIN),
    ("DELETE", "/api/v1/groups/{id}", delete_group, Role.ADMIN),
    ("POST", "/api/v1/users", create_user, Role.ADMIN),
    ("GET", "/api/v1/users", list_users, Role.AUDITOR),
    ("GET", "/api/v1/users/{id}", get_user, Role.AUDITOR),
    ("PATCH", "/api/v1/users/{id}", patch_user, Role.ADMIN),
    ("DELETE", "/api/v1/users/{id}", delete_user, Role.ADMIN),
    ("GET", "/api/v1/users/{id}/export", export_user, Role.ADMIN),
    ("POST", "/api/v1/reasons", create_reason, Role.ADMIN),
    ("GET", "/api/v1/reasons", list_reasons, Role.AUDITOR),
    ("GET", "/api/v1/reasons/{id}", get_reason, Role.AUDITOR),
    ("DELETE", "/api/v1/reasons/{id}", delete_reason, Role.ADMIN),
    ("POST", "/api/v1/targets", create_target, Role.ADMIN),
    ("GET", "/api/v1/targets", list_targets, Role.AUDITOR),
    ("GET", "/api/v1/targets/{id}", get_target, Role.AUDITOR),
    ("PATCH", "/api/v1/targets/{id}", patch_target, Role.ADMIN),
    ("DELETE", "/api/v1/targets/{id}", delete_target, Role.ADMIN),
    ("POST", "/api/v1/access-requests", create_request, Role.ADMIN),
    ("GET", "/api/v1/access-requests", list_requests, Role.AUDITOR),
    ("GET", "/api/v1/access-requests/{id}", get_request, Role.AUDITOR),
    ("POST", "/api/v1/access-requests/{id}/forward", forward_request, Role.ADMIN),
    ("POST", "/api/v1/access-requests/{id}/revoke", revoke_request, Role.ADMIN),
    ("GET", "/api/v1/access-requests/{id}/evidence", request_evidence, Role.AUDITOR),
    ("GET", "/api/v1/sessions", list_sessions, Role.AUDITOR),
    ("DELETE", "/api/v1/sessions/{id}", delete_session, Role.AUDITOR),
    ("GET", "/api/v1/sessions/{id}/watch", watch_session, Role.AUDITOR),
    ("GET", "/api/v1/audit", list_audit, Role.AUDITOR),
    ("POST", "/api/v1/explain", explain, Role.AUDITOR),
]


def add_api_routes(
    app: web.Application, ctx: ApiContext, extra: list[tuple[str, str, Handler, Role]] | None = None
) -> None:
    """Register the API on ``app`` (the admin listener's application)."""
    app[CTX] = ctx
    for method, path, handler, role in [*ROUTES, *(extra or [])]:
        app.router.add_route(method, path, handler)
        ctx.roles[(method, path)] = role
    for path, ops in build_openapi()["paths"].items():
        for method, op in ops.items():
            names = frozenset(p["name"] for p in op.get("parameters", ()) if p["in"] == "query")
            ctx.query_names[(method.upper(), path)] = names

    async def close_watchers(app: web.Application) -> None:
        watch = app[CTX].watch
        if watch is not None:
            watch.shutdown("the gateway is shutting down")

    app.on_shutdown.append(close_watchers)
