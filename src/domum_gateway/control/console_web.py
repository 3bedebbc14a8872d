"""The admin console's plumbing: who is signed in, CSRF, roles, rendering, security headers.

Every console route is wrapped by :func:`guard`, which (in this order) finds the console
session from its cookie and re-checks that its API token is still active, reads and
size-limits a POST form, checks the form's CSRF token and the request's origin, checks
the role, and finally turns any ``DomumError`` into an HTML page (the admin listener's
outer middleware would otherwise answer problem+json). Every response gets the same
security headers.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from importlib import resources
from typing import Any
from urllib.parse import quote

import jinja2
from aiohttp import web

from ..clock import Clock
from ..errors import DomumError, Forbidden, NotFound
from ..model import ApiToken, Role
from ..store.base import Store
from .console_forms import Form, read_form
from .console_session import COOKIE, ConsoleSession, ConsoleSessions, same_secret
from .evidence import EvidenceBuilder
from .service import Actor, AdminService

__all__ = [
    "CONSOLE",
    "CSP",
    "FORM",
    "VIEWER",
    "ConsoleContext",
    "Handler",
    "Viewer",
    "error_page",
    "guard",
    "redirect",
    "render",
    "safe_next",
    "same_origin_socket",
    "secure",
    "static_response",
    "viewer_of",
]

log = logging.getLogger("domum.console")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_STATIC_TYPES = {
    ".css": "text/css",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".svg": "image/svg+xml",
}
# Shared with the public terminal page, served under /admin/static/ for the live-watch view:
# xterm.js from npm (``make assets``) and the module that keeps it within the strict CSP.
_SHARED_STATIC = (
    ("vendor", "xterm", "xterm.mjs"),
    ("vendor", "xterm", "xterm.css"),
    ("terminal", "csp-styles.js"),
)


@dataclass(frozen=True, slots=True)
class Viewer:
    """The signed-in person behind a console request."""

    sid: str
    session: ConsoleSession
    token: ApiToken

    @property
    def is_admin(self) -> bool:
        return self.token.role is Role.ADMIN

    def actor(self, request: web.Request) -> Actor:
        return Actor(f"console:{self.token.name}", request.remote or "")


VIEWER = web.RequestKey("console_viewer", Viewer)
FORM = web.RequestKey("console_form", Form)


class ConsoleContext:
    """What console handlers need, handed over by the composition root."""

    def __init__(
        self,
        store: Store,
        service: AdminService,
        clock: Clock,
        sessions: ConsoleSessions,
        evidence: EvidenceBuilder,
    ) -> None:
        self.store = store
        self.evidence = evidence
        self.service = service
        self.clock = clock
        self.sessions = sessions
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("domum_gateway", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["dt"] = format_dt
        self.env.filters["fid"] = field_id
        self.static = _load_static()


CONSOLE = web.AppKey("console", ConsoleContext)


def format_dt(when: datetime | None, tz: tzinfo | None = None) -> str:
    """``2026-05-01 09:00 UTC`` (or in ``tz``); an em dash for nothing."""
    if when is None:
        return "\u2014"
    local = when.astimezone(tz or UTC)
    name = local.tzname() or "UTC"
    if name.startswith("UTC") and len(name) > 3:
        name = "UTC" + name[3:]
    return f"{local:%Y-%m-%d %H:%M} {name}"


def field_id(name: str) -> str:
    """An HTML id for a form field name (``duration.value`` -> ``f-duration-value``)."""
    return "f-" + "".join(c if c.isalnum() else "-" for c in name)


def _load_static() -> dict[str, tuple[bytes, str, str]]:
    out: dict[str, tuple[bytes, str, str]] = {}
    root = resources.files("domum_gateway").joinpath("static", "admin")
    for entry in root.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _STATIC_TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            out[entry.name] = (body, _STATIC_TYPES[suffix], etag)
    static = resources.files("domum_gateway").joinpath("static")
    for parts in _SHARED_STATIC:
        entry = static.joinpath(*parts)
        if entry.is_file():
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            out[entry.name] = (body, _STATIC_TYPES["." + entry.name.rsplit(".", 1)[-1]], etag)
    return out


def secure(resp: web.StreamResponse) -> web.StreamResponse:
    for name, value in _HEADERS.items():
        resp.headers.setdefault(name, value)
    return resp


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def safe_next(raw: str | None) -> str:
    """A local console path to return to after sign-in; anything else goes to the start."""
    if (
        raw
        and len(raw) <= 500
        and raw.isascii()
        and (raw == "/admin" or raw.startswith("/admin/"))
        and "//" not in raw
        and "\\" not in raw
        and ".." not in raw
        and "%2e" not in raw.lower()
        and not any(ord(c) < 33 for c in raw)
    ):
        return raw
    return "/admin/requests"


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """Render ``admin/<template>`` with the page chrome (viewer, CSRF token, notices)."""
    ctx = request.app[CONSOLE]
    viewer = request.get(VIEWER)
    base: dict[str, Any] = {
        "viewer": viewer,
        "is_admin": bool(viewer and viewer.is_admin),
        "csrf": viewer.session.csrf if viewer else "",
        "notices": viewer.session.take_notices() if viewer else [],
        "path": request.path,
        "nav": context.pop("nav", ""),
    }
    base.update(context)
    html = ctx.env.get_template(f"admin/{template}").render(base)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def error_page(request: web.Request, exc: DomumError) -> web.Response:
    """A DomumError as a readable page (the API shows the same error as problem+json)."""
    back = "/admin/requests" if VIEWER in request else "/admin/login"
    return render(
        request,
        "error.html",
        status=exc.status,
        title=exc.title,
        detail=exc.detail,
        back=back,
    )


def _rank(role: Role) -> int:
    return 2 if role is Role.ADMIN else 1


async def _viewer(ctx: ConsoleContext, request: web.Request) -> Viewer | None:
    sid = request.cookies.get(COOKIE)
    session = await ctx.sessions.find(sid)
    if session is None or sid is None:
        return None
    token = await ctx.store.find_api_token(session.token_hash)
    if token is None:  # revoked since sign-in: the console session ends with it
        await ctx.sessions.end_for_token(session.token_hash)
        return None
    return Viewer(sid, session, token)


async def viewer_of(request: web.Request) -> Viewer | None:
    """The console's signed-in viewer behind ``request``'s console cookie, if any.

    For the few routes outside ``/admin`` that also accept the console's session (the
    live-watch websocket, which a browser cannot send a Bearer header on); pair it with
    :func:`same_origin_socket`, since such a route has no CSRF token.
    """
    ctx = request.app.get(CONSOLE)
    if ctx is None:
        return None
    return await _viewer(ctx, request)


def same_origin_socket(request: web.Request) -> bool:
    """Whether a websocket handshake comes from a page of this very origin.

    SameSite=Strict does not stop a same-site page on another port (the public listener,
    or an app proxied through it) from opening a websocket here with the console cookie
    attached, and websockets are not bound by CORS: the Origin must be present and be
    exactly this listener's own, and Fetch Metadata, when sent, must say same-origin.
    """
    if request.headers.get("Sec-Fetch-Site", "same-origin") != "same-origin":
        return False
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return False
    return origin.lower() == f"{request.scheme}://{request.host}".lower()


def _same_origin(request: web.Request) -> bool:
    """Defence in depth next to the CSRF token: refuse cross-site form posts outright."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        # "null": browsers send it for same-site posts under Referrer-Policy: no-referrer.
        return True
    return origin == f"{request.scheme}://{request.host}"


def guard(handler: Handler, role: Role | None) -> Handler:
    """Wrap a console handler: session, form, CSRF, role, HTML errors, security headers.

    ``role`` None marks the few routes that work signed out (sign-in page, static files).
    """

    async def wrapped(request: web.Request) -> web.StreamResponse:
        ctx = request.app[CONSOLE]
        try:
            resp = await _run(ctx, request, handler, role)
        except DomumError as exc:
            if exc.status >= 500:
                log.warning("console.error path=%s status=%d type=%s", request.path, exc.status, exc.type)
            resp = error_page(request, exc)
        except web.HTTPException:
            raise
        except Exception:
            cid = secrets.token_hex(8)
            log.exception("console.unexpected correlation_id=%s path=%s", cid, request.path)
            resp = render(
                request,
                "error.html",
                status=500,
                title="Internal error",
                detail=f"Something went wrong on our side. Quote correlation id {cid} to your administrator.",
                back="/admin/requests",
            )
        viewer = request.get(VIEWER)
        if viewer is not None:
            # Notices and drafts go back to the shared store before the answer leaves, so
            # the next request finds them whichever replica it reaches.
            try:
                await ctx.sessions.save(viewer.session)
            except DomumError as exc:
                log.warning("console.session_not_saved detail=%s", exc.detail)
        return secure(resp)

    return wrapped


async def _run(
    ctx: ConsoleContext, request: web.Request, handler: Handler, role: Role | None
) -> web.StreamResponse:
    if role is None:
        return await handler(request)
    viewer = await _viewer(ctx, request)
    if viewer is None:
        if request.method == "GET":
            target = request.path_qs if request.path != "/admin/login" else "/admin/requests"
            return redirect("/admin/login?next=" + quote(safe_next(target), safe="/"))
        return redirect("/admin/login")
    request[VIEWER] = viewer
    if request.method == "POST":
        form = await read_form(request)
        if not _same_origin(request):
            raise Forbidden("This form was sent from another site and was refused.")
        if not same_secret(form.get("csrf") or None, viewer.session.csrf):
            raise Forbidden(
                "The form's security token is missing or out of date. Go back, reload the page and try again."
            )
        request[FORM] = form
    if _rank(viewer.token.role) < _rank(role):
        raise Forbidden(
            f"The {viewer.token.role.value} role may not do this; the console is read-only for you."
        )
    return await handler(request)


def static_response(ctx: ConsoleContext, request: web.Request, name: str) -> web.Response:
    item = ctx.static.get(name)
    if item is None:
        raise NotFound("There is no such page in the admin console.")
    body, ctype, etag = item
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
    return web.Response(body=body, content_type=ctype, headers={"ETag": etag, "Cache-Control": "no-cache"})
