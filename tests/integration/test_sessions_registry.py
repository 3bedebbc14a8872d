"""The live registry: sessions with their connections, listed and cut through the API."""

from __future__ import annotations

import asyncio

from ..conftest import Running
from .helpers import call, create_forwarded, login_direct, seed


async def test_registry_lists_and_cuts_connections(running: Running) -> None:
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    cookie = await login_direct(running, sd, link)
    sessions = running.gateway.sessions
    live = await sessions.lookup(cookie)
    assert live is not None
    cut: list[tuple[str, str]] = []
    a = sessions.open_connection(live, "tcp", "db", "127.0.0.1", lambda r: cut.append(("a", r)))
    b = sessions.open_connection(live, "ssh", "web", "127.0.0.1", lambda r: cut.append(("b", r)))
    a.bytes_in, a.bytes_out = 100, 2000
    async with running.admin(running.auditor_token) as s:
        st, page = await call(s, "GET", "/api/v1/sessions")
        assert st == 200
        (item,) = page["items"]
        assert item["id"] == live.id and item["request_id"] == rid
        assert {c["id"] for c in item["connections"]} == {a.id, b.id}
        assert item["bytes_in"] == 100 and item["bytes_out"] == 2000
        # An auditor may cut one connection; the session and the other connection live on.
        st, _ = await call(s, "DELETE", f"/api/v1/sessions/{a.id}")
        assert st == 204
        assert cut == [("a", "terminated by an administrator")]
        st, _ = await call(s, "DELETE", f"/api/v1/sessions/{a.id}")
        assert st == 404
        st, page = await call(s, "GET", "/api/v1/sessions")
        assert [c["id"] for c in page["items"][0]["connections"]] == [b.id]
        # Ending the session cuts what is left.
        st, _ = await call(s, "DELETE", f"/api/v1/sessions/{live.id}")
        assert st == 204
    for _ in range(50):
        if len(cut) == 2:
            break
        await asyncio.sleep(0.02)
    assert cut[1] == ("b", "terminated by an administrator")
    assert sessions.connections() == []
    async with running.admin() as s:
        st, page = await call(s, "GET", "/api/v1/sessions")
        assert page["items"] == []
        st, events = await call(s, "GET", "/api/v1/audit?type=connection.terminated")
        assert [e["subject"] for e in events["items"]] == [a.id]
