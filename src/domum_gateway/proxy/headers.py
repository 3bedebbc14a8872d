"""Security headers for everything the gateway itself serves on the public listener.

Installed as an ``on_response_prepare`` hook rather than a middleware, so it also
reaches streamed responses and websocket handshakes, which are prepared inside the
handler before a middleware would see them.

Proxied upstream responses are the target's own pages: they keep the target's headers
and must not get the gateway's Content-Security-Policy (it would break every web app
behind the gateway). A request counts as proxied when its path is under ``/t/`` or when
the handler called :func:`mark_proxied` (host routing ``{target}.{domain}``). Only HSTS
is added to those, because it is a property of the gateway's origin. Gateway pages
served under ``/t/`` (an error page from the proxy) call :func:`gateway_headers`
themselves, or are rendered by ``proxy.pages.render_page``, which does.
"""

from __future__ import annotations

from aiohttp import web

__all__ = [
    "CSP",
    "PROXIED",
    "gateway_headers",
    "install_security_headers",
    "is_proxied",
    "mark_proxied",
]

CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)
HSTS = "max-age=63072000"

_GATEWAY_HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

PROXIED = web.RequestKey("domum_proxied", bool)
"""Set to True on requests whose response is a target's (host routing, tunnels)."""

_STATIC_PREFIX = "/static/"


def mark_proxied(request: web.Request) -> None:
    """Tell the header hook that this request's response comes from a target."""
    request[PROXIED] = True


def is_proxied(request: web.Request) -> bool:
    return bool(request.get(PROXIED)) or request.path.startswith("/t/")


def gateway_headers(response: web.StreamResponse, *, cache: str | None = None) -> None:
    """Put the gateway's own security headers on ``response`` (before it is prepared).

    ``Cache-Control`` becomes ``cache`` when given; otherwise a value the handler chose is
    kept and ``no-store`` is the default.
    """
    headers = response.headers
    for name, value in _GATEWAY_HEADERS.items():
        headers[name] = value
    headers["Strict-Transport-Security"] = HSTS
    if cache is not None:
        headers["Cache-Control"] = cache
    else:
        headers.setdefault("Cache-Control", "no-store")


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    if is_proxied(request):
        response.headers.setdefault("Strict-Transport-Security", HSTS)
        return
    if request.path.startswith(_STATIC_PREFIX) and response.status in (200, 304):
        # Static assets may be cached but are revalidated, so a deploy is seen at once.
        gateway_headers(response, cache="no-cache")
    else:
        gateway_headers(response)


def install_security_headers(app: web.Application) -> None:
    """Add the headers to every non-proxied response of ``app``."""
    app.on_response_prepare.append(_on_prepare)
