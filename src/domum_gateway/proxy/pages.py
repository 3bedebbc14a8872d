"""The remote user's pages on the public listener: link, token, portal, sign-out.

Every step goes through the shared :class:`~domum_gateway.proxy.login.LoginService`
(the SSH jump server uses the same one), so a page only gathers facts from the request
(client address, form fields, cookies), calls the service and renders the answer.

No oracle: an unknown link, a revoked link and a wrong token all end in the same status
and the same error page, whose only variable part is the (identical, generic) message.
The page's "next step" depends on the endpoint only, never on what was found.

Secrets stay out of logs and Referer: the access log is off (``app.py``), unexpected
errors are logged with the route pattern (``/a/{link}``), never the path, and every
page is sent with ``Referrer-Policy: no-referrer``.

CSRF: before login, forms carry ``ts.mac`` with mac = HMAC(per-process key, link hash,
pre-login nonce, ts); the nonce lives in the ``__Host-domum-pre`` cookie (SameSite=Lax,
so a cross-site POST arrives without it). That binds a form to one link *and* one
browser, which stops login CSRF (an attacker posting their own link and token from
another site). After login the token is HMAC(key, session hash). ``Sec-Fetch-Site:
cross-site`` and a foreign ``Origin`` are refused outright.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..auth.decide import Deny, explain
from ..auth.secrets import hash_secret, mask_email, mask_phone
from ..errors import BadRequest, DeliveryError, DomumError, StoreError, TooManyRequests
from ..model import Channel, Protocol, RemoteUser, Target
from .context import COOKIE, PublicContext, client_of, session_of
from .headers import gateway_headers
from .login import OTP_TTL, LinkInfo, LoginRefused
from .sessions import LiveSession

__all__ = [
    "PRE_COOKIE",
    "add_login_routes",
    "error_page_middleware",
    "render_error",
    "render_page",
]

log = logging.getLogger("domum.pages")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PRE_COOKIE = "__Host-domum-pre"
_CSRF_FIELD = "csrf"
_CSRF_TTL = timedelta(hours=2)
_MAX_FORM_FIELD = 256

_STATIC_TYPES = {
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

# Titles per refusal reason. Reasons that must not be told apart (unknown link, revoked
# link, wrong token) share the default title as well as the generic message.
_REFUSAL_TITLES = {
    "not_yet_open": "Not open yet",
    "expired": "Access has ended",
    "origin_denied": "Not allowed from this network",
    "country_denied": "Not allowed from this location",
    "token_expired": "Token expired",
    "token_exhausted": "Token no longer valid",
    "logout_csrf": "Form expired",
}
_DEFAULT_REFUSAL_TITLE = "Sign-in refused"


@dataclass(frozen=True, slots=True)
class _Action:
    """The one "what next" button on an error page."""

    label: str
    href: str


_NEXT = web.RequestKey("domum_next_action", _Action)

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("domum_gateway", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# rendering -------------------------------------------------------------------------
def render_page(
    template: str, status: int = 200, headers: dict[str, str] | None = None, **context: Any
) -> web.Response:
    """A gateway page from ``templates/public/{template}`` with the gateway's headers."""
    body = _env.get_template(f"public/{template}").render(**context)
    resp = web.Response(text=body, status=status, content_type="text/html", headers=headers)
    gateway_headers(resp)
    return resp


def render_error(
    status: int,
    title: str,
    message: str,
    *,
    action: _Action | None = None,
    headers: dict[str, str] | None = None,
    reference: str | None = None,
) -> web.Response:
    """The one error page shape: a title, a sentence saying what to do, one button."""
    return render_page(
        "error.html",
        status=status,
        headers=headers,
        title=title,
        message=message,
        action=action,
        reference=reference,
        status_code=status,
    )


def _route_of(request: web.Request) -> str:
    """The route pattern (``/a/{link}``): safe to log, unlike the path."""
    info = request.match_info
    resource = info.route.resource if info is not None and info.route is not None else None
    return resource.canonical if resource is not None else "-"


@web.middleware
async def error_page_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error on the public listener into the one error page (fail closed)."""
    try:
        return await handler(request)
    except LoginRefused as exc:
        action = request.get(_NEXT)
        title = _REFUSAL_TITLES.get(exc.reason, _DEFAULT_REFUSAL_TITLE)
        return render_error(exc.status, title, exc.detail, action=action)
    except TooManyRequests as exc:
        return render_error(
            429,
            "Please wait a moment",
            exc.detail,
            action=request.get(_NEXT),
            headers={"Retry-After": str(exc.retry_after)},
        )
    except DeliveryError as exc:
        log.warning("pages.delivery_failed route=%s type=%s", _route_of(request), exc.type)
        return render_error(
            502,
            "Could not send your token",
            "We could not deliver your token just now. Wait a minute and try again; "
            "if it keeps failing, tell the person who arranged your access.",
            action=request.get(_NEXT),
        )
    except StoreError:
        log.warning("pages.store_unavailable route=%s", _route_of(request))
        return render_error(
            503,
            "Temporarily unavailable",
            "The gateway cannot check access right now, so it refuses for safety. "
            "Try again in a few minutes.",
            headers={"Retry-After": "30"},
        )
    except DomumError as exc:
        if exc.status >= 500:
            log.warning("pages.error route=%s status=%d type=%s", _route_of(request), exc.status, exc.type)
        return render_error(exc.status, exc.title, exc.detail, action=request.get(_NEXT))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_error(exc)
    except Exception:
        cid = secrets.token_hex(8)
        log.exception("pages.unexpected correlation_id=%s route=%s", cid, _route_of(request))
        return render_error(
            500,
            "Something went wrong",
            "The gateway hit an unexpected problem and refused the request. Try again; if it "
            "keeps happening, tell your administrator and quote the reference below.",
            reference=cid,
        )


def _http_error(exc: web.HTTPException) -> web.Response:
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    if exc.status == 404:
        return render_error(
            404,
            "Page not found",
            "There is nothing at this address. Open the personal link from your message, "
            "or go to your portal if you are signed in.",
            action=_Action("Go to the portal", "/portal"),
        )
    if exc.status == 405:
        return render_error(405, "Not available", "This address cannot be used that way.", headers=headers)
    if exc.status == 413:
        return render_error(413, "Too large", "What was sent is larger than this page accepts.")
    return render_error(exc.status, "Request refused", "The request could not be handled.")


# CSRF ------------------------------------------------------------------------------
class _Csrf:
    """HMAC form tokens.

    The key is derived from the gateway's TLS private key, which every replica shares (see
    the README), so a form served by one replica is accepted by another behind a load
    balancer. Without a readable key (tests without TLS) it is random for this process.
    """

    def __init__(self, ctx: PublicContext) -> None:
        try:
            material = ctx.settings.tls.key.read_bytes()
        except OSError:
            material = secrets.token_bytes(32)
        self._key = hmac.new(material, b"domum-gateway csrf v1", hashlib.sha256).digest()
        self._clock = ctx.clock

    def _mac(self, *parts: str) -> str:
        msg = "\x1f".join(parts).encode("utf-8", "surrogatepass")
        digest = hmac.new(self._key, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")

    def for_link(self, link_hash: str, nonce: str) -> str:
        ts = str(int(self._clock.now().timestamp()))
        return f"{ts}.{self._mac('link', link_hash, nonce, ts)}"

    def check_link(self, token: str, link_hash: str, nonce: str | None) -> bool:
        if not nonce or len(token) > 100:
            return False
        ts, _, mac = token.partition(".")
        if not ts.isascii() or not ts.isdigit() or len(ts) > 12:
            return False
        age = self._clock.now().timestamp() - int(ts)
        if age < -60 or age > _CSRF_TTL.total_seconds():
            return False
        return hmac.compare_digest(
            mac.encode("ascii", "replace"), self._mac("link", link_hash, nonce, ts).encode()
        )

    def for_session(self, live: LiveSession) -> str:
        return self._mac("session", live.hash)

    def check_session(self, token: str, live: LiveSession) -> bool:
        return hmac.compare_digest(token.encode("utf-8", "replace"), self._mac("session", live.hash).encode())


def _cross_site(request: web.Request, base_url: str) -> bool:
    """A POST that a browser says came from another site."""
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return True
    origin = request.headers.get("Origin")
    # With Referrer-Policy: no-referrer, browsers send "Origin: null" even same-origin.
    if origin is None or origin == "null":
        return False
    try:
        parts = urlsplit(origin)
    except ValueError:
        return True
    # Behind a reverse proxy the Host header may be internal; base_url is the public one.
    return parts.netloc.lower() not in (request.host.lower(), urlsplit(base_url).netloc.lower())


# helpers -----------------------------------------------------------------------------
def _utc(when: datetime) -> str:
    return f"{when.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _duration(delta: timedelta) -> str:
    total = max(0, int(delta.total_seconds()))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return "less than a minute"


def _masked_channel(user: RemoteUser) -> tuple[str, str]:
    if user.channel is Channel.SMS:
        return "text message", mask_phone(user.phone or "")
    return "e-mail", mask_email(user.email or "")


def _link_of(request: web.Request) -> str:
    return request.match_info["link"]


@dataclass(slots=True)
class _Pages:
    ctx: PublicContext
    csrf: _Csrf
    static: dict[str, tuple[bytes, str, str]]

    # pre-login ---------------------------------------------------------------------
    async def _open_link(self, request: web.Request) -> LinkInfo:
        """Rate-limit, resolve and check the link; raise the page-worthy refusal."""
        peer = client_of(request)
        self.ctx.login.limit_client(str(peer))
        info = await self.ctx.login.resolve_link(_link_of(request))
        refusal = self.ctx.login.window_refusal(info, peer)
        if refusal is not None:
            self.ctx.metrics.denied.labels(refusal.reason).inc()
            raise refusal
        assert info is not None
        return info

    def _nonce(self, request: web.Request) -> tuple[str, bool]:
        """The browser's pre-login nonce, and whether it must be (re)set."""
        nonce = request.cookies.get(PRE_COOKIE, "")
        if 16 <= len(nonce) <= 64 and nonce.isascii():
            return nonce, False
        return secrets.token_urlsafe(16), True

    def _with_nonce(self, resp: web.Response, nonce: str, fresh: bool) -> web.Response:
        if fresh:
            resp.set_cookie(
                PRE_COOKIE,
                nonce,
                max_age=int(_CSRF_TTL.total_seconds()),
                path="/",
                secure=True,
                httponly=True,
                samesite="Lax",
            )
        return resp

    def _require_link_csrf(self, request: web.Request, form: dict[str, str]) -> None:
        nonce = request.cookies.get(PRE_COOKIE)
        if _cross_site(request, self.ctx.settings.public.base_url) or not self.csrf.check_link(
            form.get(_CSRF_FIELD, ""), hash_secret(_link_of(request)), nonce
        ):
            self.ctx.metrics.denied.labels("csrf").inc()
            raise LoginRefused(
                "This form has expired or did not come from this site. Open your personal link "
                "again and retry.",
                "csrf",
            )

    async def link_page(self, request: web.Request) -> web.Response:
        """GET /a/{link}: who, why, when, where the token goes, and "Send token"."""
        info = await self._open_link(request)
        nonce, fresh = self._nonce(request)
        link = _link_of(request)
        kind, masked = _masked_channel(info.user)
        reason = await self.ctx.store.get_reason(info.request.reason_id)
        live = await session_of(request)
        signed_in = live is not None and live.request_id == info.request.id
        resp = render_page(
            "link.html",
            title="Sign in",
            user_name=info.user.name,
            justification=info.request.justification,
            reason=reason.label if reason is not None else "",
            start_utc=_utc(info.grant.start),
            end_utc=_utc(info.grant.end),
            start_iso=_iso(info.grant.start),
            end_iso=_iso(info.grant.end),
            channel_kind=kind,
            masked=masked,
            token_minutes=int(OTP_TTL.total_seconds() // 60),
            action=f"/a/{link}/token",
            csrf=self.csrf.for_link(hash_secret(link), nonce),
            signed_in=signed_in,
        )
        return self._with_nonce(resp, nonce, fresh)

    async def token_page(self, request: web.Request) -> web.Response:
        """GET /a/{link}/token: the token-entry form (shown after a token was sent)."""
        request[_NEXT] = _Action("Back to your sign-in page", f"/a/{_link_of(request)}")
        info = await self._open_link(request)
        nonce, fresh = self._nonce(request)
        link = _link_of(request)
        kind, masked = _masked_channel(info.user)
        csrf = self.csrf.for_link(hash_secret(link), nonce)
        resp = render_page(
            "token.html",
            title="Enter your token",
            channel_kind=kind,
            masked=masked,
            token_minutes=int(OTP_TTL.total_seconds() // 60),
            verify_action=f"/a/{link}/verify",
            resend_action=f"/a/{link}/token",
            csrf=csrf,
        )
        return self._with_nonce(resp, nonce, fresh)

    async def send_token(self, request: web.Request) -> web.Response:
        """POST /a/{link}/token: send a fresh token, then show the token form (303)."""
        link = _link_of(request)
        request[_NEXT] = _Action("Back to your sign-in page", f"/a/{link}")
        peer = client_of(request)
        self.ctx.login.limit_client(str(peer))
        form = await _form(request)
        self._require_link_csrf(request, form)
        info = await self.ctx.login.resolve_link(link)
        await self.ctx.login.send_token(info, peer, str(peer))
        raise web.HTTPSeeOther(f"/a/{link}/token")

    async def verify(self, request: web.Request) -> web.Response:
        """POST /a/{link}/verify: redeem the token, open a session, go to the portal."""
        link = _link_of(request)
        # The same next step whatever went wrong, so the page says nothing about the link.
        request[_NEXT] = _Action("Enter the token again", f"/a/{link}/token")
        peer = client_of(request)
        self.ctx.login.limit_client(str(peer))
        form = await _form(request)
        self._require_link_csrf(request, form)
        info = await self.ctx.login.resolve_link(link)
        cookie, live = await self.ctx.login.verify(info, form.get("token", ""), peer, str(peer))
        resp = web.HTTPSeeOther("/portal")
        max_age = int((live.grant.end - self.ctx.clock.now()).total_seconds())
        resp.set_cookie(
            COOKIE,
            cookie,
            max_age=max(1, max_age),
            path="/",
            secure=True,
            httponly=True,
            samesite="Strict",
        )
        resp.del_cookie(PRE_COOKIE, path="/", secure=True, httponly=True, samesite="Lax")
        raise resp

    # signed in -----------------------------------------------------------------------
    async def _current(self, request: web.Request) -> LiveSession | web.Response:
        """The request's session, checked now (memory only), or the page to show instead."""
        live = await session_of(request)
        if live is None:
            self.ctx.metrics.denied.labels("no_session").inc()
            return _signed_out_page(
                401,
                "Not signed in",
                "You are not signed in, or your session has ended. Open the personal link from "
                "your message to sign in again.",
            )
        decision = self.ctx.sessions.check(live, client_of(request))
        if isinstance(decision, Deny):
            return _signed_out_page(403, "Signed out", explain(decision.reason, live.grant))
        return live

    async def portal(self, request: web.Request) -> web.Response:
        """GET /portal: the granted targets, how to use each, time left, sign-out."""
        live = await self._current(request)
        if isinstance(live, web.Response):
            return live
        ctx = self.ctx
        user = await ctx.store.get_user(live.user_id)
        access = await ctx.store.get_request(live.request_id)
        targets: list[Target] = []
        for target_id in sorted(live.grant.targets):
            target = await ctx.store.get_target(target_id)
            if target is not None:
                targets.append(target)
        targets.sort(key=lambda t: t.name)
        now = ctx.clock.now()
        base = ctx.settings.public.base_url
        login = (user.email or user.id) if user is not None else live.user_id
        return render_page(
            "portal.html",
            title="Your access",
            user_name=user.name if user is not None else "",
            justification=access.justification if access is not None else "",
            end_utc=_utc(live.grant.end),
            end_iso=_iso(live.grant.end),
            time_left=_duration(live.grant.end - now),
            idle=_duration(timedelta(seconds=live.grant.idle_timeout_seconds)),
            targets=[_target_view(t, login, base, self._ssh_endpoint()) for t in targets],
            csrf=self.csrf.for_session(live),
        )

    def _ssh_endpoint(self) -> str:
        host = urlsplit(self.ctx.settings.public.base_url).hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        port = self.ctx.ssh_port or self.ctx.settings.ssh.listen.port
        return f"{host}:{port}"

    async def logout(self, request: web.Request) -> web.Response:
        """POST /logout: end the session (it stops everywhere at once), clear the cookie."""
        live = await session_of(request)
        if live is not None:
            form = await _form(request)
            if _cross_site(request, self.ctx.settings.public.base_url) or not self.csrf.check_session(
                form.get(_CSRF_FIELD, ""), live
            ):
                self.ctx.metrics.denied.labels("csrf").inc()
                raise LoginRefused(
                    "This form has expired or did not come from this site. Reload the portal "
                    "and sign out again.",
                    "logout_csrf",
                )
            peer = str(client_of(request))
            await self.ctx.sessions.end(live, "logout", f"user:{live.user_id}", peer)
        resp = web.HTTPSeeOther("/signed-out")
        resp.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
        raise resp

    async def signed_out(self, request: web.Request) -> web.Response:
        return render_page("signed_out.html", title="Signed out")

    async def home(self, request: web.Request) -> web.Response:
        live = await session_of(request)
        return render_page("home.html", title="Welcome", signed_in=live is not None)

    async def static_file(self, request: web.Request) -> web.Response:
        item = self.static.get(request.match_info["name"])
        if item is None:
            raise web.HTTPNotFound()
        body, ctype, etag = item
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=body, content_type=ctype, headers={"ETag": etag})


def _signed_out_page(status: int, title: str, message: str) -> web.Response:
    """An error page that also clears the session cookie."""
    resp = render_error(status, title, message, action=_Action("Go to the start page", "/"))
    resp.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Strict")
    return resp


@dataclass(frozen=True, slots=True)
class _TargetView:
    name: str
    protocol: str
    web_url: str | None
    terminal_url: str | None
    ssh_command: str | None
    connect_command: tuple[str, str, str] | None  # before, placeholder, after
    local_port: int | None


def _target_view(target: Target, login: str, base_url: str, ssh_endpoint: str) -> _TargetView:
    web_url: str | None = None
    terminal_url: str | None = None
    ssh_command: str | None = None
    connect_command: tuple[str, str, str] | None = None
    local_port: int | None = None
    if target.protocol is Protocol.HTTP:
        web_url = f"/t/{target.name}/"
    else:
        port = target.port or 0
        local_port = 10000 + port if 0 < port < 55536 else 15000
        # The link is a bearer secret the gateway only keeps as a hash, so the portal
        # cannot show it: the user pastes it from their message in place of the marker.
        connect_command = (
            f"domum-gateway connect {base_url}/a/",
            "<your personal link>",
            f" --target {target.name} --listen 127.0.0.1:{local_port}",
        )
    if target.protocol is Protocol.SSH:
        terminal_url = f"/ssh/{target.name}"
        port_part = f" -p {target.port}" if target.port not in (None, 22) else ""
        ssh_command = f"ssh -J {login}@{ssh_endpoint}{port_part} user@{target.host}"
    return _TargetView(
        name=target.name,
        protocol=target.protocol.value,
        web_url=web_url,
        terminal_url=terminal_url,
        ssh_command=ssh_command,
        connect_command=connect_command,
        local_port=local_port,
    )


async def _form(request: web.Request) -> dict[str, str]:
    """The urlencoded form, string fields only, each bounded in length."""
    if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return {}
    try:
        data = await request.post()
    except (ValueError, HttpProcessingError) as exc:  # bytes not UTF-8, broken multipart
        raise BadRequest("The form could not be decoded.") from exc
    out: dict[str, str] = {}
    for key in (_CSRF_FIELD, "token"):
        value = data.get(key)
        if isinstance(value, str):
            out[key] = value[:_MAX_FORM_FIELD]
    return out


def _load_static() -> dict[str, tuple[bytes, str, str]]:
    out: dict[str, tuple[bytes, str, str]] = {}
    root = resources.files("domum_gateway").joinpath("static", "public")
    for entry in root.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _STATIC_TYPES:
            body = entry.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            out[entry.name] = (body, _STATIC_TYPES[suffix], etag)
    return out


def add_login_routes(app: web.Application, ctx: PublicContext) -> None:
    """Register the remote user's pages and their static files on the public app."""
    pages = _Pages(ctx, _Csrf(ctx), _load_static())
    r = app.router
    r.add_get("/", pages.home)
    r.add_get("/a/{link}", pages.link_page)
    r.add_get("/a/{link}/token", pages.token_page)
    r.add_post("/a/{link}/token", pages.send_token)
    r.add_post("/a/{link}/verify", pages.verify)
    r.add_get("/portal", pages.portal)
    r.add_post("/logout", pages.logout)
    r.add_get("/signed-out", pages.signed_out)
    r.add_get("/static/public/{name}", pages.static_file)
