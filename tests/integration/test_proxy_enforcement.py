"""Every proxied request is decided from memory; the decision, metrics and audit agree.

The store is not asked anything while a signed-in user browses (after the first request
loaded the session); revoking the grant or a change of address stops the next request
and cuts streams in flight; audit gets one event per (session, target), not one per
request; the metrics and the access log count each request.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from ..conftest import Running
from ..integration.helpers import call
from ..peers.upstreams import ProxyEnv, Upstream, grant_targets, start_upstream

pytestmark = pytest.mark.asyncio


@dataclass
class Env:
    run: Running
    up: Upstream
    user: ProxyEnv

    def client(self, **kw: Any) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            base_url=self.run.public_url,
            headers=self.user.headers(),
            connector=aiohttp.TCPConnector(ssl=self.run.ssl, **kw),
        )


@pytest.fixture
async def env(running: Running) -> AsyncIterator[Env]:
    async with start_upstream() as up:
        user = await grant_targets(running, {"wiki": up.url + "/"})
        yield Env(running, up, user)


async def test_no_store_call_per_request(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    async with env.client(limit=4) as c:
        r = await c.get("/t/wiki/warm")
        assert r.status == 200
        calls: list[str] = []
        store = env.run.gateway.store
        for name, method in inspect.getmembers(store, inspect.iscoroutinefunction):
            if name.startswith("_") or name == "touch_sessions":
                continue

            def counted(*a: Any, _name: str = name, _m: Any = method, **k: Any) -> Any:
                calls.append(_name)
                return _m(*a, **k)

            monkeypatch.setattr(store, name, counted)
        for i in range(200):
            r = await c.get(f"/t/wiki/p{i}")
            assert r.status == 200
            await r.read()
    assert calls == []


async def test_first_use_audited_once_per_session_and_target(env: Env) -> None:
    async with env.client() as c:
        for _ in range(20):
            r = await c.get("/t/wiki/x")
            await r.read()
    await asyncio.sleep(0.2)
    async with env.run.admin() as s:
        st, page = await call(s, "GET", "/api/v1/audit?type=proxy.first_use")
        assert st == 200
        assert len(page["items"]) == 1
        details = page["items"][0]["details"]
        assert details["target"] == "wiki" and details["request_id"] == env.user.request_id
        st, page = await call(s, "GET", "/api/v1/audit")
        assert not [e for e in page["items"] if e["type"].startswith("proxy.request")]


async def test_revoke_stops_requests_and_cuts_streams(env: Env) -> None:
    async with env.client() as c:
        r = await c.get("/t/wiki/sse", params={"count": "50", "interval": "0.1"})
        first = await r.content.readline()
        assert first.startswith(b"id: 0")
        async with env.run.admin() as s:
            st, _ = await call(s, "POST", f"/api/v1/access-requests/{env.user.request_id}/revoke")
            assert st == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.read(), 2)
    async with env.client() as c:
        r = await c.get("/t/wiki/after", headers={"Accept": "text/html"})
        text = await r.text()
        assert r.status == 401
        assert "Sign-in required" in text
    assert "/after" not in env.up.hits


async def test_address_change_ends_the_session(env: Env) -> None:
    connector = aiohttp.TCPConnector(ssl=env.run.ssl, local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(
        base_url=env.run.public_url, headers=env.user.headers(Accept="text/html"), connector=connector
    ) as c:
        r = await c.get("/t/wiki/from-elsewhere")
        text = await r.text()
    assert r.status == 401
    assert "network address changed" in text
    async with env.client() as c:  # and the session is gone from the first address too
        r = await c.get("/t/wiki/again")
        assert r.status == 401
    assert env.up.hits == []


async def test_metrics_and_access_log(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="domum.access")
    async with env.client() as c:
        for _ in range(3):
            r = await c.get("/t/wiki/m?secret=1")
            await r.read()
        r = await c.get("/t/nowhere/")
        await r.read()
    lines = [r.getMessage() for r in caplog.records if r.name == "domum.access"]
    assert any("target=wiki" in ln and "path=/t/wiki/m " in ln and "status=200" in ln for ln in lines)
    assert not any("secret" in ln for ln in lines)
    await asyncio.sleep(1.2)  # byte totals reach domum_tunnel_bytes_total once a second
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=env.run.ssl)) as s:
        r = await s.get(env.run.admin_url + "/metrics")
        text = await r.text()
    assert 'domum_proxy_request_duration_seconds_count{status_class="2xx",target="wiki"} 3.0' in text
    assert 'domum_proxy_request_duration_seconds_count{status_class="4xx",target="-"} 1.0' in text
    assert 'domum_proxy_bytes_total{direction="down",target="wiki"}' in text
    assert 'domum_tunnel_bytes_total{direction="down",protocol="http"}' in text


async def test_unknown_cookie_costs_one_store_lookup(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    store = env.run.gateway.store
    calls: list[str] = []
    original = store.find_session

    async def counted(session_hash: str) -> Any:
        calls.append(session_hash)
        return await original(session_hash)

    monkeypatch.setattr(store, "find_session", counted)
    async with aiohttp.ClientSession(
        base_url=env.run.public_url,
        headers={"Cookie": "__Host-domum=made-up-value"},
        connector=aiohttp.TCPConnector(ssl=env.run.ssl),
    ) as c:
        for _ in range(20):
            r = await c.get("/t/wiki/asset.css")
            assert r.status == 401
    assert len(calls) == 1
    assert env.up.hits == []
