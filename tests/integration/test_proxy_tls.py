"""Upstream TLS: verified by default, against the system store plus the gateway's own CA.

A target whose certificate the gateway's CA issued is trusted; one from a CA made in the
test (unknown to the gateway) is refused with a 502 that names only the target, unless
the target is registered with ``tls_verify: false``, which the audit event records.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from ..conftest import Running
from ..integration.helpers import call
from ..peers.upstreams import ca_pair, grant_targets, signed_by, start_upstream

pytestmark = pytest.mark.asyncio


async def test_upstream_tls_verified_trusted_refused_and_opt_out(running: Running, tmp_path: Path) -> None:
    gateway_ca = tmp_path / "certs" / "ca.crt", tmp_path / "certs" / "ca.key"
    stranger_ca = ca_pair(tmp_path / "stranger-ca")
    trusted_ctx = signed_by(*gateway_ca, tmp_path / "trusted")
    untrusted_ctx = signed_by(*stranger_ca, tmp_path / "untrusted")
    async with start_upstream(trusted_ctx) as good, start_upstream(untrusted_ctx) as bad:
        user = await grant_targets(
            running,
            {"good": good.url + "/", "bad": bad.url + "/", "lax": bad.url + "/lax"},
            tls_verify={"lax": False},
        )
        async with aiohttp.ClientSession(
            base_url=running.public_url,
            headers=user.headers(Accept="text/html"),
            connector=aiohttp.TCPConnector(ssl=running.ssl),
        ) as c:
            r = await c.get("/t/good/hello")
            assert r.status == 200
            assert (await r.json())["path"] == "/hello"
            r = await c.get("/t/bad/hello")
            text = await r.text()
            assert r.status == 502
            assert "bad could not be reached" in text
            assert "certificate" not in text.lower() and "127.0.0.1" not in text
            r = await c.get("/t/lax/x")
            assert r.status == 200
            assert (await r.json())["path"] == "/lax/x"
            async with c.ws_connect("/t/good/ws") as ws:
                await ws.send_str("over tls")
                assert await ws.receive_str(timeout=5) == "echo:over tls"
        # The refused handshake never produced a request at the untrusted target.
        assert bad.hits == ["/lax/x"]

    async with running.admin() as s:
        for _ in range(50):
            st, page = await call(s, "GET", "/api/v1/audit?type=proxy.first_use")
            assert st == 200
            if len(page["items"]) >= 3:
                break
            await asyncio.sleep(0.05)
    by_target = {e["details"]["target"]: e["details"] for e in page["items"]}
    assert by_target["lax"]["tls_verify"] is False
    assert by_target["good"]["tls_verify"] is True
