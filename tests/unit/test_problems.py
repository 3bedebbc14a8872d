"""Errors become problem+json; unexpected ones leak nothing but a correlation id."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp import web

from domum_gateway.control.problems import problem_middleware
from domum_gateway.errors import StoreError, TooManyRequests, ValidationError


async def _boom(request: web.Request) -> web.Response:
    raise RuntimeError("secret internal detail /srv/domum/var/domum.db SqliteStore._tx")


async def _invalid(request: web.Request) -> web.Response:
    raise ValidationError.one("duration.unit", "must be one of minutes, hours, days, months")


async def _limited(request: web.Request) -> web.Response:
    raise TooManyRequests("slow down", retry_after=42)


async def _store(request: web.Request) -> web.Response:
    raise StoreError("the database could not answer")


@pytest.fixture
def app() -> web.Application:
    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/boom", _boom)
    app.router.add_get("/invalid", _invalid)
    app.router.add_get("/limited", _limited)
    app.router.add_get("/store", _store)
    return app


async def test_unexpected_error_is_opaque_with_correlation_id(
    aiohttp_client: Any, app: web.Application, caplog: pytest.LogCaptureFixture
) -> None:
    client = await aiohttp_client(app)
    with caplog.at_level(logging.ERROR, logger="domum.api"):
        resp = await client.get("/boom")
    assert resp.status == 500
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    text = await resp.text()
    for leak in ("secret", "RuntimeError", "Traceback", "SqliteStore", "/srv/"):
        assert leak not in text
    body = await resp.json(content_type=None)
    cid = body["correlation_id"]
    assert cid in body["detail"]
    assert any(cid in r.getMessage() for r in caplog.records), "the log keeps the id for support"


async def test_validation_lists_fields(aiohttp_client: Any, app: web.Application) -> None:
    client = await aiohttp_client(app)
    resp = await client.get("/invalid")
    assert resp.status == 422
    body = await resp.json(content_type=None)
    assert body["errors"] == [
        {"field": "duration.unit", "message": "must be one of minutes, hours, days, months"}
    ]
    assert {"type", "title", "status", "detail"} <= body.keys()


async def test_retry_after_and_store_failure(aiohttp_client: Any, app: web.Application) -> None:
    client = await aiohttp_client(app)
    resp = await client.get("/limited")
    assert resp.status == 429 and resp.headers["Retry-After"] == "42"
    resp = await client.get("/store")
    assert resp.status == 503
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json(content_type=None))["status"] == 404
