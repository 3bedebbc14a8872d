"""The admin console at ``/admin`` on the admin listener: server-rendered pages over AdminService.

Sign-in exchanges an admin or auditor API token for a console session (see
``console_session``); the pages then do what the control API does, through the same
``AdminService`` calls, so validation and audit are shared. Auditors see every page
read-only: write controls are not rendered for them and every write route answers 403.

Routes (least role in brackets; every POST carries the session's CSRF token):

- ``/admin/login`` GET/POST (none), ``/admin/logout`` POST [auditor]
- ``/admin/requests`` list with filters [auditor]; ``/admin/requests/new`` wizard [admin];
  ``/admin/requests/{id}`` detail [auditor]; ``.../forward``, ``.../revoke`` confirm + POST
  [admin]; ``.../explain`` [auditor]; ``.../evidence.json`` [auditor]
- ``/admin/groups``, ``/admin/users``, ``/admin/reasons``, ``/admin/targets``: list
  [auditor]; ``new``, ``{id}`` edit and ``{id}/delete`` [admin]
- ``/admin/sessions`` [auditor], ``/admin/sessions/{id}/terminate`` POST [auditor, as in the API]
- ``/admin/sessions/{id}/watch`` [auditor]: a read-only live view of a browser SSH terminal
  (``con_...``), fed by the ``/api/v1/sessions/{id}/watch`` websocket with the console cookie
- ``/admin/audit`` with filters and ``/admin/audit/verify`` [auditor]
- ``/admin/static/{name}`` (none)
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime
from typing import Any

from aiohttp import web

from ..audit import verify_chain
from ..auth.secrets import hash_secret
from ..auth.windows import parse_instant
from ..clock import Clock
from ..errors import FieldError, Forbidden, NotFound, ValidationError
from ..model import Role
from ..store.base import AuditFilter, Store
from .api import CTX as API_CTX
from .console_catalog import CATALOG_ROUTES
from .console_forms import ErrorView, Slot, read_form
from .console_requests import REQUEST_ROUTES
from .console_session import ABSOLUTE, COOKIE, LOGIN_COOKIE, ConsoleSessions, same_secret
from .console_web import (
    CONSOLE,
    VIEWER,
    ConsoleContext,
    Handler,
    guard,
    redirect,
    render,
    safe_next,
    static_response,
)
from .evidence import EvidenceBuilder
from .service import Actor, AdminService

__all__ = ["CONSOLE", "add_console_routes"]

log = logging.getLogger("domum.console")

_LOGIN_TTL = 3600
_MAX_TOKEN_CHARS = 200


def _set_cookie(resp: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    resp.set_cookie(name, value, path="/", secure=True, httponly=True, samesite="Strict", max_age=max_age)


def _drop_cookie(resp: web.StreamResponse, name: str) -> None:
    resp.del_cookie(name, path="/", secure=True, httponly=True, samesite="Strict")


# sign-in ---------------------------------------------------------------------
async def _login_page(request: web.Request, error: str = "", status: int = 200) -> web.Response:
    nonce = secrets.token_urlsafe(32)
    resp = render(
        request,
        "login.html",
        status=status,
        login_csrf=nonce,
        next=safe_next(request.query.get("next")),
        error=error,
        signed_out=request.query.get("signed_out") == "1",
    )
    _set_cookie(resp, LOGIN_COOKIE, nonce, _LOGIN_TTL)
    return resp


async def login_form(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    session = await ctx.sessions.find(request.cookies.get(COOKIE))
    if session is not None and await ctx.store.find_api_token(session.token_hash) is not None:
        return redirect(safe_next(request.query.get("next")))
    return await _login_page(request)


async def login(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    form = await read_form(request)
    if not same_secret(form.get("csrf") or None, request.cookies.get(LOGIN_COOKIE, "")):
        raise Forbidden("The sign-in form expired or was sent from another site. Reload it and try again.")
    presented = form.get("token").strip()
    token = None
    digest = ""
    if presented and len(presented) <= _MAX_TOKEN_CHARS:
        digest = hash_secret(presented)
        # Looked up by digest, as the API does: timing can only ever concern the digest.
        token = await ctx.store.find_api_token(digest)
    if token is None:
        log.info("console.signin_refused origin=%s", request.remote or "")
        return await _login_page(request, "That token is not valid, or it was revoked.", 401)
    await ctx.sessions.end(request.cookies.get(COOKIE))  # never reuse a session id from before sign-in
    sid, _ = await ctx.sessions.create(digest, token.name, token.role)
    actor = Actor(f"console:{token.name}", request.remote or "")
    await ctx.store.append_audit(
        actor.entry("console.signed_in", f"token:{token.name}", details={"role": token.role.value})
    )
    resp = redirect(safe_next(form.get("next")))
    _set_cookie(resp, COOKIE, sid, int(ABSOLUTE.total_seconds()))
    _drop_cookie(resp, LOGIN_COOKIE)
    return resp


async def logout(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    viewer = request[VIEWER]
    await ctx.sessions.end(viewer.sid)
    await ctx.store.append_audit(
        viewer.actor(request).entry("console.signed_out", f"token:{viewer.token.name}")
    )
    resp = redirect("/admin/login?signed_out=1")
    _drop_cookie(resp, COOKIE)
    return resp


async def home(request: web.Request) -> web.Response:
    return redirect("/admin/requests")


async def static(request: web.Request) -> web.Response:
    return static_response(request.app[CONSOLE], request, request.match_info["name"])


async def not_found(request: web.Request) -> web.Response:
    raise NotFound("There is no such page in the admin console.")


# live sessions ---------------------------------------------------------------
async def list_sessions(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    sessions = await ctx.store.list_sessions()
    requests = {}
    for rid in {s.request_id for s in sessions}:
        req = await ctx.store.get_request(rid)
        if req is not None:
            requests[rid] = req
    users = {u.id: u.name for u in await ctx.store.list_users()}
    terminals: dict[str, list[dict[str, Any]]] = {}
    for conn in _terminals(request):
        terminals.setdefault(str(conn["session_id"]), []).append(conn)
    return render(
        request,
        "sessions.html",
        nav="sessions",
        sessions=sessions,
        requests=requests,
        user_names=users,
        terminals=terminals,
    )


def _terminals(request: web.Request) -> list[dict[str, Any]]:
    """The browser SSH terminals live on this gateway (the only connections one can watch)."""
    api = request.app.get(API_CTX)
    if api is None:
        return []
    return [c for c in api.connections() if c["protocol"] == "ssh-terminal"]


async def watch_page(request: web.Request) -> web.Response:
    """A read-only live view of one browser SSH terminal."""
    ctx = request.app[CONSOLE]
    cid = request.match_info["id"]
    conn = next((c for c in _terminals(request) if c["id"] == cid), None)
    if conn is None:
        raise NotFound("That terminal is not live on this gateway any more.")
    user = await ctx.store.get_user(str(conn["user_id"]))
    return render(
        request,
        "watch.html",
        nav="sessions",
        conn=conn,
        user_name=user.name if user is not None else conn["user_id"],
        socket_path=f"/api/v1/sessions/{cid}/watch",
        assets="xterm.mjs" in ctx.static,
    )


async def terminate_session(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    viewer = request[VIEWER]
    sid = request.match_info["id"]
    actor = viewer.actor(request)
    if not await ctx.service.terminate_session(sid, actor):
        viewer.session.flash("That session had already ended.", "error")
    else:
        viewer.session.flash("Session terminated.")
    return redirect("/admin/sessions")


# audit log -------------------------------------------------------------------
_AUDIT_SLOTS = (
    Slot("type", "Type", ("type",)),
    Slot("request_id", "Request id", ("request_id",)),
    Slot("since", "Since", ("since",)),
)


def _since(raw: str) -> datetime:
    """``2026-05-01`` (midnight UTC) or a full ISO 8601 instant with offset."""
    if len(raw) == 10 and raw[4:5] == "-" and raw[7:8] == "-":
        raw += "T00:00:00+00:00"
    return parse_instant(raw, "since")


async def _audit_page(request: web.Request, verification: dict[str, object] | None = None) -> web.Response:
    ctx = request.app[CONSOLE]
    q = request.query
    values = {
        "type": q.get("type", "")[:64].strip(),
        "request_id": q.get("request_id", "")[:64].strip(),
        "since": q.get("since", "")[:64].strip(),
    }
    errors: list[FieldError] = []
    since = None
    if values["since"]:
        try:
            since = _since(values["since"])
        except ValidationError as exc:
            errors.extend(exc.errors)
    items = []
    next_cursor = None
    if not errors:
        page = await ctx.store.list_audit(
            AuditFilter(
                since=since,
                type=values["type"] or None,
                request_id=values["request_id"] or None,
                limit=100,
                cursor=q.get("cursor", "")[:200] or None,
            )
        )
        items, next_cursor = page.items, page.next_cursor
    return render(
        request,
        "audit.html",
        status=422 if errors else 200,
        nav="audit",
        events=items,
        values=values,
        errors=ErrorView.build(errors, _AUDIT_SLOTS),
        next_cursor=next_cursor,
        verification=verification,
    )


async def audit(request: web.Request) -> web.Response:
    return await _audit_page(request)


async def verify(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    events = await ctx.store.all_audit()
    head = await ctx.store.audit_head()
    brk = verify_chain(events, head)
    result: dict[str, object] = {
        "ok": brk is None,
        "count": len(events),
        "checked_at": ctx.clock.now(),
    }
    if brk is not None:
        result.update({"seq": brk.seq, "problem": brk.problem})
    return await _audit_page(request, result)


ROUTES: list[tuple[str, str, Handler, Role | None]] = [
    ("GET", "/admin", home, None),
    ("GET", "/admin/", home, None),
    ("GET", "/admin/login", login_form, None),
    ("POST", "/admin/login", login, None),
    ("POST", "/admin/logout", logout, Role.AUDITOR),
    ("GET", "/admin/static/{name}", static, None),
    *REQUEST_ROUTES,
    *CATALOG_ROUTES,
    ("GET", "/admin/sessions", list_sessions, Role.AUDITOR),
    ("POST", "/admin/sessions/{id}/terminate", terminate_session, Role.AUDITOR),
    ("GET", "/admin/sessions/{id}/watch", watch_page, Role.AUDITOR),
    ("GET", "/admin/audit", audit, Role.AUDITOR),
    ("GET", "/admin/audit/verify", verify, Role.AUDITOR),
]


def add_console_routes(
    app: web.Application,
    *,
    store: Store,
    service: AdminService,
    clock: Clock,
    evidence: EvidenceBuilder,
    sessions: ConsoleSessions | None = None,
) -> ConsoleContext:
    """Mount the admin console under ``/admin`` on ``app`` (the admin listener's application).

    Returns the console's context (its session table is ``.sessions``).
    """
    ctx = ConsoleContext(store, service, clock, sessions or ConsoleSessions(store, clock), evidence)
    app[CONSOLE] = ctx
    for method, path, handler, role in ROUTES:
        wrapped = guard(handler, role)
        if method == "GET":
            app.router.add_get(path, wrapped)
        else:
            app.router.add_route(method, path, wrapped)
    # Last: anything else under /admin is an HTML 404, not the API's problem+json.
    app.router.add_route("*", "/admin/{tail:.*}", guard(not_found, None))
    return ctx
