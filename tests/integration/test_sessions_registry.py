"""The live registry: sessions with their connections, listed and cut through the API."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from domum_gateway.errors import StoreError
from domum_gateway.store.base import ConnectionRecord

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


async def test_registry_reaches_the_store_in_batches_off_the_hot_path(
    running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening and closing touch memory; a flush writes one batch, retried whole after a failure."""
    sd = await seed(running)
    _rid, link = await create_forwarded(running, sd)
    cookie = await login_direct(running, sd, link)
    sessions = running.gateway.sessions
    store = running.gateway.store
    live = await sessions.lookup(cookie)
    assert live is not None
    # Park the background loop: this test flushes by hand. The registry is written to the
    # store only where replicas share one (PostgreSQL); the writes are the same on SQLite.
    sessions.shared = True
    sessions.flush_interval = 3600.0
    sessions.flush_soon()
    await asyncio.sleep(0.05)
    upserts: list[list[ConnectionRecord]] = []
    upsert = store.upsert_connections

    async def failing_once(records: list[ConnectionRecord]) -> None:
        upserts.append(list(records))
        if len(upserts) == 1:
            raise StoreError("the database could not complete the change")
        await upsert(records)

    monkeypatch.setattr(store, "upsert_connections", failing_once)
    cut: list[str] = []
    conn = sessions.open_connection(live, "tcp", "db", "127.0.0.1", cut.append)
    short = sessions.open_connection(live, "ssh", "web", "127.0.0.1", cut.append)
    sessions.close_connection(short)  # opened and closed between two flushes: never written
    assert upserts == []
    conn.bytes_in, conn.bytes_out = 10, 20
    with pytest.raises(StoreError):
        await sessions.flush()
    await sessions.flush()
    assert [[r.id for r in batch] for batch in upserts] == [[conn.id], [conn.id]]
    row = await store.get_connection(conn.id)
    assert row is not None
    assert (row.replica, row.session_id, row.bytes_in, row.bytes_out) == (sessions.replica, live.id, 10, 20)
    assert await store.get_connection(short.id) is None
    # Nothing moved: nothing written. Bytes moved: that row again. Heartbeat due: every row.
    await sessions.flush()
    assert len(upserts) == 2
    conn.bytes_out = 25
    await sessions.flush()
    assert len(upserts) == 3 and upserts[-1][0].bytes_out == 25
    sessions.heartbeat = 0.0
    await sessions.flush()
    assert len(upserts) == 4 and upserts[-1][0].updated_at > row.updated_at
    sessions.heartbeat = 30.0

    # This replica's rows never override its memory: a row it no longer holds (its delete
    # not flushed yet) is neither listed nor cut.
    await store.upsert_connections([replace(row, id="con_leftover")])
    async with running.admin(running.auditor_token) as s:
        st, page = await call(s, "GET", "/api/v1/sessions")
        assert st == 200
        (item,) = page["items"]
        assert [(c["id"], c["replica"]) for c in item["connections"]] == [(conn.id, sessions.replica)]
        assert (item["bytes_in"], item["bytes_out"]) == (10, 25)
        st, _ = await call(s, "DELETE", "/api/v1/sessions/con_leftover")
        assert st == 404
    await store.delete_connections(["con_leftover"])

    sessions.close_connection(conn)
    await sessions.flush()
    assert await store.get_connection(conn.id) is None
    assert cut == []
