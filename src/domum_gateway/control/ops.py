"""Operations endpoints on the admin listener: /metrics, /healthz, /readyz."""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from ..errors import DomumError
from ..metrics import Metrics
from ..store.base import Store

__all__ = ["add_ops_routes"]

log = logging.getLogger("domum.ops")


def add_ops_routes(app: web.Application, store: Store, metrics: Metrics) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        try:
            await store.ping()
        except DomumError as exc:
            log.warning("readyz.store_unreachable detail=%s", exc.detail)
            return web.json_response({"status": "unavailable", "store": "unreachable"}, status=503)
        return web.json_response({"status": "ready", "store": store.kind})

    async def metrics_view(_: web.Request) -> web.Response:
        await metrics.refresh()  # values counted in the store (domum_grants_active)
        resp = web.Response(body=metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_view)
