"""The public listener's one error page: every error class, and nothing internal leaks."""

from __future__ import annotations

import logging
import re

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from domum_gateway.errors import (
    BadRequest,
    DeliveryError,
    NotFound,
    StoreError,
    TooManyRequests,
    UpstreamError,
)
from domum_gateway.proxy.headers import install_security_headers, mark_proxied
from domum_gateway.proxy.login import LoginRefused
from domum_gateway.proxy.pages import error_page_middleware

pytestmark = pytest.mark.asyncio

_RAISES: dict[str, Exception] = {
    "refused": LoginRefused("Go away politely.", "invalid_link"),
    "limited": TooManyRequests("Slow down.", 42),
    "delivery": DeliveryError("smtp.internal.example refused RCPT"),
    "store": StoreError("sqlite3.OperationalError: database is locked at /var/domum.db"),
    "bad": BadRequest("That was not a form."),
    "missing": NotFound("No such target."),
    "upstream": UpstreamError("The web app did not answer."),
    "crash": RuntimeError("KeyError in _secret_internal_helper at /srv/domum/app.py"),
}


@pytest.fixture
async def client(aiohttp_client) -> TestClient:  # type: ignore[no-untyped-def]
    app = web.Application(middlewares=[error_page_middleware])
    install_security_headers(app)

    async def boom(request: web.Request) -> web.Response:
        raise _RAISES[request.match_info["kind"]]

    async def proxied(request: web.Request) -> web.Response:
        mark_proxied(request)
        return web.Response(text="upstream", headers={"Content-Security-Policy": "default-src *"})

    async def under_t(request: web.Request) -> web.Response:
        return web.Response(text="upstream page")

    app.router.add_get("/boom/{kind}", boom)
    app.router.add_get("/host-routed", proxied)
    app.router.add_get("/t/wiki/", under_t)
    return await aiohttp_client(app)  # type: ignore[no-any-return]


def _shape(text: str) -> str:
    text = re.sub(r'<p class="message" data-role="message">.*?</p>', "", text, flags=re.S)
    text = re.sub(r"<h1[^>]*>.*?</h1>", "", text, flags=re.S)
    text = re.sub(r"<title>.*?</title>", "", text, flags=re.S)
    text = re.sub(r'<p class="reference">.*?</p>', "", text, flags=re.S)
    text = re.sub(r'<div class="status-icon[^>]*>.*?</div>', "", text, flags=re.S)
    text = re.sub(r'<p class="actions">.*?</p>', "", text, flags=re.S)
    return re.sub(r"\s+", " ", text)


async def test_every_error_is_the_same_page_shape(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    expected = {
        "refused": 403,
        "limited": 429,
        "delivery": 502,
        "store": 503,
        "bad": 400,
        "missing": 404,
        "upstream": 502,
        "crash": 500,
    }
    shapes = set()
    for kind, status in expected.items():
        r = await client.get(f"/boom/{kind}")
        text = await r.text()
        assert r.status == status, kind
        assert r.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        assert r.headers["Cache-Control"] == "no-store"
        shapes.add(_shape(text))
        # What is logged is not what is returned: no internal detail reaches the page.
        for leak in ("smtp.internal", "sqlite3", "/var/domum.db", "_secret_internal_helper", "KeyError"):
            assert leak not in text, (kind, leak)
    assert len(shapes) == 1

    r = await client.get("/boom/limited")
    assert r.headers["Retry-After"] == "42"
    assert "Slow down." in await r.text()
    r = await client.get("/boom/store")
    assert r.headers["Retry-After"] == "30"
    r = await client.get("/boom/crash")
    text = await r.text()
    ref = re.search(r"Reference: <code>([0-9a-f]{16})</code>", text)
    assert ref is not None
    assert any(ref.group(1) in rec.getMessage() and rec.exc_info for rec in caplog.records)
    ours = [rec for rec in caplog.records if rec.name.startswith("domum")]
    assert ours and all("/boom/crash" not in rec.getMessage() for rec in ours)  # route, not path


async def test_http_errors_are_pages_too(client: TestClient) -> None:
    r = await client.get("/nothing/here")
    assert r.status == 404 and "Page not found" in await r.text()
    r = await client.post("/boom/refused")
    assert r.status == 405 and "GET" in r.headers["Allow"]
    assert "Not available" in await r.text()


async def test_proxied_responses_keep_their_own_headers(client: TestClient) -> None:
    r = await client.get("/t/wiki/")
    assert "Content-Security-Policy" not in r.headers
    assert "X-Frame-Options" not in r.headers
    assert r.headers["Strict-Transport-Security"].startswith("max-age=")
    r = await client.get("/host-routed")
    assert r.headers["Content-Security-Policy"] == "default-src *"
    assert "Referrer-Policy" not in r.headers
