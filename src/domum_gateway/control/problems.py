"""The one place errors become responses: problem+json (RFC 9457) for the API.

Unexpected exceptions become an opaque 500 carrying a correlation id; the trace goes to
the log under that id and never into the response.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import DomumError, TooManyRequests, ValidationError

__all__ = ["problem_middleware", "problem_response"]

log = logging.getLogger("domum.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_TITLES = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
}


def problem_response(
    status: int,
    type_: str,
    title: str,
    detail: str,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body: dict[str, Any] = {
        "type": f"https://domum.dev/problems/{type_}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if extra:
        body.update(extra)
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type="application/problem+json",
        headers=headers,
    )


def _from_domum(exc: DomumError) -> web.Response:
    extra: dict[str, Any] = {}
    headers: dict[str, str] = {}
    if isinstance(exc, ValidationError):
        extra["errors"] = [{"field": e.field, "message": e.message} for e in exc.errors]
    if isinstance(exc, TooManyRequests):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="domum"'
    return problem_response(exc.status, exc.type, exc.title, exc.detail, extra, headers)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except DomumError as exc:
        if exc.status >= 500:
            log.warning("api.error path=%s status=%d type=%s", request.path, exc.status, exc.type)
        return _from_domum(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        type_, title = _HTTP_TITLES.get(exc.status, ("http-error", exc.reason))
        detail = exc.reason if exc.status != 413 else "The request body is larger than allowed."
        return problem_response(exc.status, type_, title, detail, headers=_keep_headers(exc))
    except Exception:
        cid = secrets.token_hex(8)
        log.exception("api.unexpected correlation_id=%s path=%s", cid, request.path)
        return problem_response(
            500,
            "internal",
            "Internal error",
            f"Something went wrong on our side. Quote correlation id {cid} to your administrator.",
            {"correlation_id": cid},
        )


def _keep_headers(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}
