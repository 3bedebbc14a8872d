"""Hostile input against the control API on the admin listener (real TLS, real store)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import quote

import pytest

from domum_gateway.control.api import ROUTES
from domum_gateway.model import Role

from ..conftest import Running
from ..integration.helpers import Seed, call, create_forwarded, request_body, seed
from .raw import exchange, open_raw, rss_kib, status_of

pytestmark = pytest.mark.asyncio

SQL = ["' OR '1'='1", "1; DROP TABLE users; --", '" OR ""="', "%' --", "1 UNION SELECT * FROM api_tokens"]


async def _two_tenants(run: Running) -> tuple[Seed, Seed, str]:
    a = await seed(run, email="alice@example.com")
    b = await seed(
        run,
        email="bob@example.com",
        target={"name": "wiki-b", "protocol": "http", "url": "http://127.0.0.1:9/"},
    )
    rid, _link = await create_forwarded(run, a)
    return a, b, rid


async def _snapshot(run: Running) -> str:
    async with run.admin() as s:
        parts = []
        for path in ("groups", "users", "reasons", "targets", "access-requests"):
            query = "?limit=500" if path == "access-requests" else ""  # the others are not paged
            st, page = await call(s, "GET", f"/api/v1/{path}{query}")
            assert st == 200, page
            parts.append(json.dumps(page["items"], sort_keys=True))
    return "\n".join(parts)


async def test_ids_of_other_kinds_are_404_and_leak_nothing(running: Running) -> None:
    """An id is only ever looked up in its own table: a group id on /users, a request id
    on /sessions and so on is 404, and the body names nothing of the object it belongs to."""
    a, b, rid = await _two_tenants(running)
    wrong = [
        ("GET", f"/api/v1/users/{a.group_id}"),
        ("GET", f"/api/v1/groups/{b.user_id}"),
        ("GET", f"/api/v1/targets/{b.reason_id}"),
        ("GET", f"/api/v1/reasons/{a.target_id}"),
        ("GET", f"/api/v1/access-requests/{a.user_id}"),
        ("GET", f"/api/v1/access-requests/{a.group_id}/evidence"),
        ("POST", f"/api/v1/access-requests/{b.user_id}/revoke"),
        ("POST", f"/api/v1/access-requests/{a.target_id}/forward"),
        ("GET", f"/api/v1/users/{rid}/export"),
        ("DELETE", f"/api/v1/sessions/{rid}"),
        ("DELETE", f"/api/v1/users/{b.group_id}"),
        ("PATCH", f"/api/v1/targets/{a.group_id}"),
    ]
    async with running.admin() as s:
        for method, path in wrong:
            body = {"name": "x"} if method == "PATCH" else None
            st, err = await call(s, method, path, body)
            assert st == 404, (method, path, st, err)
            text = json.dumps(err)
            for secret in ("alice", "bob", "Patch the wiki", "wiki-b", "Maintenance"):
                assert secret not in text, (path, text)
        # Filters scoped to one user or group never return the other's rows.
        st, page = await call(s, "GET", "/api/v1/access-requests", params={"user_id": b.user_id})
        assert st == 200 and page["items"] == []
        st, page = await call(s, "GET", "/api/v1/users", params={"group_id": b.group_id})
        assert [u["email"] for u in page["items"]] == ["bob@example.com"]


async def test_auditor_token_cannot_write_anywhere(running: Running) -> None:
    """Every route that needs the admin role answers an auditor 403, and nothing changes."""
    a, _b, rid = await _two_tenants(running)
    ids = {
        "groups": a.group_id,
        "users": a.user_id,
        "reasons": a.reason_id,
        "targets": a.target_id,
        "access-requests": rid,
    }
    before = await _snapshot(running)
    admin_routes = [(m, p) for m, p, _h, role in ROUTES if role is Role.ADMIN]
    assert len(admin_routes) >= 15
    async with running.admin(running.auditor_token) as s:
        for method, path in admin_routes:
            kind = path.split("/")[3]
            concrete = path.replace("{id}", ids[kind])
            body = request_body(a) if kind == "access-requests" and method == "POST" else {"name": "evil"}
            st, err = await call(s, method, concrete, None if method in ("GET", "DELETE") else body)
            assert st == 403, (method, concrete, st, err)
    assert await _snapshot(running) == before


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/api/v1/users", {"role": "admin"}),
        ("/api/v1/users", {"id": "usr_chosen"}),
        ("/api/v1/groups", {"created_by": "root"}),
        ("/api/v1/access-requests", {"status": "forwarded"}),
        ("/api/v1/access-requests", {"created_by": "someone-else"}),
        ("/api/v1/access-requests", {"id": "req_chosen"}),
        ("/api/v1/access-requests", {"used_at": None}),
    ],
)
async def test_escalation_fields_are_unknown_and_never_applied(
    running: Running, path: str, extra: dict[str, Any]
) -> None:
    sd = await seed(running)
    bodies: dict[str, dict[str, Any]] = {
        "/api/v1/users": {"group_id": sd.group_id, "name": "Mallory", "email": "m@example.com"},
        "/api/v1/groups": {"name": "g2", "kind": "internal", "policy": {"targets": [sd.target_id]}},
        "/api/v1/access-requests": request_body(sd),
    }
    before = await _snapshot(running)
    async with running.admin() as s:
        st, err = await call(s, "POST", path, {**bodies[path], **extra})
        assert st == 422, err
        (name,) = extra
        assert {"field": name, "message": "unknown field"} in err["errors"]
    assert await _snapshot(running) == before


async def test_escalation_fields_in_patches_are_unknown(running: Running) -> None:
    sd = await seed(running)
    before = await _snapshot(running)
    async with running.admin() as s:
        for path, extra in (
            (f"/api/v1/users/{sd.user_id}", {"role": "admin"}),
            (f"/api/v1/users/{sd.user_id}", {"id": "usr_other"}),
            (f"/api/v1/groups/{sd.group_id}", {"created_by": "root"}),
            (f"/api/v1/targets/{sd.target_id}", {"id": "tgt_other"}),
        ):
            st, err = await call(s, "PATCH", path, extra)
            assert st == 422, (path, err)
            assert err["errors"][0]["message"] == "unknown field"
    assert await _snapshot(running) == before


async def test_ten_thousand_deep_json_is_400_and_the_gateway_lives(running: Running) -> None:
    async with running.admin() as s:
        for deep in (b"[" * 10_000 + b"]" * 10_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000):
            async with s.post("/api/v1/groups", data=deep, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400
                assert r.headers["Content-Type"].startswith("application/problem+json")
        st, _ = await call(s, "GET", "/api/v1/groups")
        assert st == 200


async def test_hundred_megabyte_bodies_are_413_fast_with_bounded_memory(running: Running) -> None:
    """Declared (Content-Length) and undeclared (chunked) 100 MB bodies: the gateway answers
    413 after at most its 1 MiB limit, without buffering the rest."""
    host = running.admin_url.split("//", 1)[1]
    auth = f"Authorization: Bearer {running.admin_token}\r\n".encode()
    head = b"POST /api/v1/groups HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + auth
    chunk = b"x" * (1 << 20)
    rss_before = rss_kib()
    for framing in (f"Content-Length: {100 << 20}\r\n".encode(), b"Transfer-Encoding: chunked\r\n"):
        reader, writer = await open_raw(running.admin_url, running.ssl)
        started = time.monotonic()
        writer.write(head + framing + b"Content-Type: application/json\r\n\r\n")
        response = asyncio.ensure_future(reader.read(65536))
        sent = 0
        try:
            while sent < (100 << 20) and not response.done():
                part = chunk if b"Content-Length" in framing else b"100000\r\n" + chunk + b"\r\n"
                writer.write(part)
                await asyncio.wait_for(writer.drain(), 5)
                sent += len(chunk)
        except (ConnectionError, TimeoutError):
            pass
        got = await asyncio.wait_for(response, 10)
        elapsed = time.monotonic() - started
        writer.close()
        assert status_of(got) == 413, got[:200]
        assert elapsed < 10, elapsed
        assert sent < (100 << 20), "the gateway read the whole body before refusing it"
    growth = rss_kib() - rss_before
    assert growth < 32 * 1024, f"RSS grew by {growth} KiB"
    async with running.admin() as s:
        st, page = await call(s, "GET", "/api/v1/groups")
        assert st == 200 and page["items"] == []


async def test_invalid_utf8_in_bodies_paths_and_queries(running: Running) -> None:
    sd = await seed(running)
    host = running.admin_url.split("//", 1)[1].encode()
    auth = f"Authorization: Bearer {running.admin_token}\r\n".encode()
    for target in (
        b"/api/v1/access-requests?user_id=\xff\xfe",
        b"/api/v1/access-requests?user_id=%c0%af",
        b"/api/v1/audit?type=%ff&request_id=%ed%a0%80",
        b"/api/v1/users/\xff\xfe",
        b"/api/v1/users/%ff%fe",
        b"/api/v1/groups/%c0%ae%c0%ae",
    ):
        raw = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + auth + b"Connection: close\r\n\r\n"
        got = await exchange(running.admin_url, running.ssl, raw)
        st = status_of(got)
        assert st in (200, 400, 404), (target, got[:300])
        if st == 200:
            assert b'"items": []' in got or b'"items":[]' in got, got[-300:]
    async with running.admin() as s:
        body = json.dumps(request_body(sd)).encode().replace(b"Patch the wiki", b"Patch \xc0\xae wiki")
        async with s.post("/api/v1/access-requests", data=body) as r:
            assert r.status == 400
        # A lone surrogate escape is valid JSON but not a string anyone can store or mail.
        body = json.dumps(request_body(sd)).encode().replace(b"Patch the wiki", b"Patch \\ud800 wiki")
        async with s.post("/api/v1/access-requests", data=body) as r:
            assert r.status == 400, await r.text()
        st, page = await call(s, "GET", "/api/v1/access-requests")
        assert st == 200 and page["items"] == []


async def test_sql_metacharacters_in_every_filter_and_id_segment(running: Running) -> None:
    sd = await seed(running)
    async with running.admin() as s:
        st, _ = await call(s, "POST", "/api/v1/access-requests", request_body(sd))
        assert st == 201
    before = await _snapshot(running)
    id_routes = sorted({p for m, p, _h, _r in ROUTES if "{id}" in p and m == "GET"})
    filters = [
        ("/api/v1/access-requests", "user_id"),
        ("/api/v1/access-requests", "group_id"),
        ("/api/v1/access-requests", "status"),
        ("/api/v1/access-requests", "cursor"),
        ("/api/v1/users", "group_id"),
        ("/api/v1/sessions", "request_id"),
        ("/api/v1/audit", "type"),
        ("/api/v1/audit", "request_id"),
        ("/api/v1/audit", "since"),
        ("/api/v1/audit", "cursor"),
    ]
    async with running.admin() as s:
        for payload in SQL:
            for route in id_routes:
                path = route.replace("{id}", quote(payload, safe=""))
                st, err = await call(s, "GET", path)
                assert st == 404, (path, st, err)
            for path, name in filters:
                st, page = await call(s, "GET", path, params={name: payload})
                assert st in (200, 400, 422), (path, name, st, page)
                if st == 200:
                    assert page["items"] == [], (path, name, page)
    assert await _snapshot(running) == before


async def test_nul_bytes_in_paths_queries_and_bodies(running: Running) -> None:
    sd = await seed(running)
    before = await _snapshot(running)
    async with running.admin() as s:
        # SQLite looks the id up and finds nothing (404); PostgreSQL text cannot hold NUL,
        # so its store refuses the value as a bad request (400). Neither is a 500.
        st, err = await call(s, "GET", f"/api/v1/users/{sd.user_id}%00")
        assert st in (400, 404), err
        st, page = await call(s, "GET", "/api/v1/access-requests", params={"user_id": sd.user_id + "\x00"})
        assert st in (200, 400) and (st == 400 or page["items"] == [])
        for body in (
            {"name": "g\x00x", "kind": "internal", "policy": {"targets": [sd.target_id]}},
            {"name": "g2", "kind": "internal\x00", "policy": {"targets": [sd.target_id]}},
            {"name": "g3", "kind": "internal", "policy": {"targets": [sd.target_id + "\x00"]}},
        ):
            st, err = await call(s, "POST", "/api/v1/groups", body)
            assert st in (400, 422), (body, err)  # 400: PostgreSQL's store refuses NUL
        st, err = await call(
            s, "POST", "/api/v1/users", {"group_id": sd.group_id, "name": "M", "email": "m\x00@example.com"}
        )
        assert st == 422, err
    assert await _snapshot(running) == before


async def test_huge_headers_are_refused_and_the_listener_lives(running: Running) -> None:
    host = running.admin_url.split("//", 1)[1].encode()
    for extra in (
        b"X-Big: " + b"a" * 65536 + b"\r\n",
        b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(2000)),
        b"Authorization: Bearer " + b"t" * 65536 + b"\r\n",
    ):
        raw = b"GET /api/v1/groups HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"
        got = await exchange(running.admin_url, running.ssl, raw)
        assert status_of(got) in (400, 431, None), got[:200]
        assert b"Traceback" not in got
    async with running.admin() as s:
        st, _ = await call(s, "GET", "/api/v1/groups")
        assert st == 200


@pytest.mark.parametrize("method", [b"FOO", b"TRACE", b"PROPFIND", b"CONNECT"])
async def test_unknown_methods_are_refused(running: Running, method: bytes) -> None:
    host = running.admin_url.split("//", 1)[1].encode()
    auth = f"Authorization: Bearer {running.admin_token}\r\n".encode()
    target = host if method == b"CONNECT" else b"/api/v1/groups"
    raw = (
        method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + auth + b"Connection: close\r\n\r\n"
    )
    got = await exchange(running.admin_url, running.ssl, raw)
    assert status_of(got) in (400, 404, 405, 501), got[:300]
    assert b'"items"' not in got
    async with running.admin() as s:
        st, _ = await call(s, "GET", "/api/v1/groups")
        assert st == 200


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/api/v1/access-requests", "stauts=revoked"),  # a typo must not mean "no filter"
        ("/api/v1/access-requests", "status=revoked&user=someone"),
        ("/api/v1/audit", "request=req_x"),
        ("/api/v1/groups", "limit=1"),  # takes no parameters at all
        ("/api/v1/sessions", "request_id=req_x&all=1"),
        ("/api/v1/users", "group_id=g&%00=1"),
    ],
)
async def test_unknown_query_parameters_are_400_naming_them(running: Running, path: str, query: str) -> None:
    async with running.admin(running.auditor_token) as s:
        async with s.get(f"{path}?{query}") as r:
            assert r.status == 400, await r.text()
            problem = await r.json()
    assert "Unknown query parameter" in problem["detail"], problem
    assert "this operation takes" in problem["detail"], problem
    assert "Traceback" not in json.dumps(problem)


async def test_declared_query_parameters_still_work_and_writes_refuse_unknown_ones(running: Running) -> None:
    sd = await seed(running)
    rid, _link = await create_forwarded(running, sd)
    async with running.admin() as s:
        st, body = await call(s, "GET", "/api/v1/access-requests?status=forwarded&limit=5")
        assert st == 200 and [r["id"] for r in body["items"]] == [rid], body
        st, body = await call(s, "GET", f"/api/v1/audit?request_id={rid}&limit=3")
        assert st == 200, body
        # a write with a stray parameter changes nothing
        st, body = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke?force=1")
        assert st == 400, body
        st, body = await call(s, "GET", f"/api/v1/access-requests/{rid}")
        assert st == 200 and body["status"] == "forwarded", body


async def test_lengths_and_control_characters_count_as_sent_not_after_trimming(running: Running) -> None:
    """``strip()`` must not turn an over-long or control-character value into a valid one
    (``\\x1f`` counts as whitespace to Python); ordinary surrounding spaces are trimmed."""
    async with running.admin() as s:
        for name in ("\x1f" + "*" * 100, " " * 5 + "g" * 99, "\x1fops", "ops\x1e"):
            st, body = await call(s, "POST", "/api/v1/groups", {"name": name})
            assert st == 422 and body["errors"][0]["field"] == "name", (name, body)
        st, body = await call(s, "POST", "/api/v1/groups", {"name": "  Operations  "})
        assert st == 201 and body["name"] == "Operations", body
        st, body = await call(s, "GET", "/api/v1/users?group_id=" + "g" * 65)
        assert st == 422, body
