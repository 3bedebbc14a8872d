"""The few answers the HTTP proxy writes itself: sign-in needed, refused, target failed.

They are pre-encoded HTTP responses (:class:`~.http_front.LocalResponse`) so the fast
path can write them without aiohttp, and they carry their own strict security headers
(pages under ``/t/`` are excluded from the public app's middleware, because proxied
answers must keep the target's own headers). Nothing here names an internal host,
address or error: only the target's public name and a sentence the user can act on.
"""

from __future__ import annotations

from html import escape

from .http_front import LocalResponse

__all__ = [
    "bad_request",
    "denied",
    "gateway_error",
    "login_required",
    "not_found",
    "redirect",
    "too_many",
    "unavailable",
    "use_host",
]

_SECURITY = [
    b"Cache-Control: no-store",
    b"Strict-Transport-Security: max-age=63072000",
    b"X-Content-Type-Options: nosniff",
    b"Referrer-Policy: no-referrer",
    b"X-Frame-Options: DENY",
    b"Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
    b"form-action 'none'; frame-ancestors 'none'",
]
_HTML = [b"Content-Type: text/html; charset=utf-8", *_SECURITY]
_TEXT = [b"Content-Type: text/plain; charset=utf-8", *_SECURITY]

_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}"
    "main{max-width:36rem;margin:12vh auto;padding:2rem;background:#fff;border-radius:8px;"
    "box-shadow:0 1px 4px #0002}h1{font-size:1.3rem;margin-top:0}a{color:#1b5fc1}"
)


def _page(
    status: int, reason: str, title: str, message: str, links: list[tuple[str, str]], xhr: bool
) -> LocalResponse:
    if xhr:
        lines = "".join(f"{text}: {href}\n" for href, text in links)
        return LocalResponse(status, reason, list(_TEXT), f"{title}: {message}\n{lines}".encode())
    items = "".join(f'<p><a href="{escape(href)}">{escape(text)}</a></p>' for href, text in links)
    body = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)} - Domum Gateway</title><style>{_STYLE}</style></head>"
        f"<body><main><h1>{escape(title)}</h1><p>{escape(message)}</p>{items}</main></body></html>"
    )
    return LocalResponse(status, reason, list(_HTML), body.encode())


def login_required(target: str, retry_url: str, portal_url: str, xhr: bool) -> LocalResponse:
    """401: no (valid) session; a link, never an automatic redirect, so nothing can loop."""
    page = _page(
        401,
        "Unauthorized",
        "Sign-in required",
        f"You need to be signed in to reach {target}. Open the personal link you received "
        "and enter the token sent to you. If you are already signed in, continue below.",
        [(retry_url, f"Continue to {target}"), (portal_url, "Open your portal")],
        xhr,
    )
    page.headers.append(b'WWW-Authenticate: Cookie realm="Domum Gateway"')
    return page


def denied(status: int, message: str, portal_url: str, xhr: bool) -> LocalResponse:
    """403 (or 401 when the session ended) with the decision's explanation."""
    reason = "Unauthorized" if status == 401 else "Forbidden"
    title = "Signed out" if status == 401 else "Access refused"
    page = _page(status, reason, title, message, [(portal_url, "Open your portal")], xhr)
    if status == 401:
        page.headers.append(b'WWW-Authenticate: Cookie realm="Domum Gateway"')
    return page


def not_found(xhr: bool) -> LocalResponse:
    return _page(404, "Not Found", "Not found", "There is no web application at this address.", [], xhr)


def bad_request(xhr: bool = False) -> LocalResponse:
    return _page(
        400,
        "Bad Request",
        "Bad request",
        "The gateway could not read this request, so it refused it.",
        [],
        xhr,
    )


def gateway_error(target: str, timeout: bool, xhr: bool) -> LocalResponse:
    """502/504 naming the target, without internal details."""
    if timeout:
        return _page(
            504,
            "Gateway Timeout",
            f"{target} did not answer in time",
            f"The gateway reached out to {target}, but it did not answer in time. Try again in a "
            "moment; if it keeps happening, tell the person who arranged your access.",
            [],
            xhr,
        )
    return _page(
        502,
        "Bad Gateway",
        f"{target} could not be reached",
        f"The gateway could not get an answer from {target}. Try again in a moment; if it keeps "
        "happening, tell the person who arranged your access.",
        [],
        xhr,
    )


def unavailable(xhr: bool) -> LocalResponse:
    """503: the gateway could not reach its database, so it refuses rather than guess."""
    page = _page(
        503,
        "Service Unavailable",
        "Temporarily unavailable",
        "The gateway cannot check your sign-in right now. Try again in a moment.",
        [],
        xhr,
    )
    page.headers.append(b"Retry-After: 30")
    return page


def too_many(xhr: bool) -> LocalResponse:
    """429: a flood of hand-overs from one session."""
    page = _page(
        429,
        "Too Many Requests",
        "Too many requests",
        "Too many requests were made from this session. Wait a minute and try again.",
        [],
        xhr,
    )
    page.headers.append(b"Retry-After: 60")
    return page


def use_host(target: str, url: str, xhr: bool) -> LocalResponse:
    return _page(
        403,
        "Forbidden",
        f"Open {target} on its own address",
        f"{target} is served at {url}.",
        [(url, url)],
        xhr,
    )


def redirect(status: int, location: bytes, extra: list[bytes] | None = None) -> LocalResponse:
    reason = {301: "Moved Permanently", 302: "Found", 303: "See Other", 308: "Permanent Redirect"}[status]
    return LocalResponse(
        status, reason, [b"Location: " + location, b"Cache-Control: no-store", *(extra or [])], b""
    )
