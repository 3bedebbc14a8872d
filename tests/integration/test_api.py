"""Control API end to end on a real TLS listener, with a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ..conftest import Running
from .helpers import call, request_body, seed

pytestmark = pytest.mark.asyncio


async def _count_requests(run: Running) -> int:
    async with run.admin() as s:
        st, page = await call(s, "GET", "/api/v1/access-requests?limit=500")
        assert st == 200
        return len(page["items"])


async def test_seed_workflow_review_save_forward(running: Running) -> None:
    sd = await seed(running)
    async with running.admin() as s:
        body = request_body(sd, governance_code="CHG-1234")
        st, review = await call(s, "POST", "/api/v1/access-requests?dry_run=true", body)
        assert st == 200, review
        assert review["status"] == "review" and review["id"] is None
        assert review["channel"] == "email"
        assert [t["name"] for t in review["targets"]] == ["wiki"]
        assert await _count_requests(running) == 0, "dry run must not save"

        st, saved = await call(s, "POST", "/api/v1/access-requests", body)
        assert st == 201 and saved["status"] == "saved"
        assert saved["end"] == review["end"]

        st, fwd = await call(s, "POST", f"/api/v1/access-requests/{saved['id']}/forward")
        assert st == 200, fwd
        assert fwd["status"] == "forwarded"
        assert fwd["sent_to"] == "a***@example.com"
    await running.mailbox.wait_count(1)
    link = running.mailbox.last_link("alice@example.com")
    assert "/a/" in link and len(link.rsplit("/", 1)[1]) >= 22
    # The link is stored only as a hash: its text is nowhere in the database.
    code = link.rsplit("/", 1)[1].encode()
    assert code not in await running.database_bytes()


async def test_month_duration_clamps_to_month_end(running: Running) -> None:
    sd = await seed(running, policy={"max_duration": {"value": 3, "unit": "months"}})
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    async with running.admin() as s:
        body = request_body(sd, start="2031-01-31T10:00:00+01:00", duration={"value": 1, "unit": "months"})
        st, review = await call(s, "POST", "/api/v1/access-requests?dry_run=true", body)
        assert st == 200, review
        assert review["end"] == "2031-02-28T09:00:00Z"
        body = request_body(sd, start=start.isoformat(), duration={"value": 4, "unit": "months"})
        st, err = await call(s, "POST", "/api/v1/access-requests?dry_run=true", body)
        assert st == 422
        assert err["errors"][0]["field"] == "duration"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"justification": 5}, "justification"),
        ({"colour": "red"}, "colour"),
        ({"reason_id": "rsn_nope"}, "reason_id"),
        ({"start": "2031-01-01T10:00:00"}, "start"),
        ({"duration": None, "end": "2031-01-01T10:05:00+00:00", "start": "2031-01-01T10:00:00+00:00"}, "end"),
        (
            {"duration": None, "end": "2031-01-01T10:00:00+00:00", "start": "2031-01-01T10:07:00+00:00"},
            "start",
        ),
        ({"duration": None, "end": "2031-01-01T09:00:00+00:00", "start": "2031-01-01T10:00:00+00:00"}, "end"),
        ({"duration": {"value": 40, "unit": "days"}}, "duration"),
        ({"duration": {"value": 1, "unit": "fortnights"}}, "duration.unit"),
        ({"duration": {"value": True, "unit": "hours"}}, "duration.value"),
        ({"group_id": None}, "group_id"),
    ],
)
async def test_invalid_requests_are_422_naming_the_field(
    running: Running, patch: dict[str, Any], field: str
) -> None:
    sd = await seed(running)
    body = request_body(sd)
    for k, v in patch.items():
        if v is None:
            body.pop(k, None)
        else:
            body[k] = v
    async with running.admin() as s:
        st, err = await call(s, "POST", "/api/v1/access-requests", body)
    assert st == 422, err
    assert field in [e["field"] for e in err["errors"]], err
    assert err["type"].endswith("/validation") and err["status"] == 422
    assert await _count_requests(running) == 0


async def test_user_must_belong_to_group(running: Running) -> None:
    sd = await seed(running)
    other = await seed(
        running,
        email="bob@example.com",
        target={"name": "wiki2", "protocol": "http", "url": "http://127.0.0.1:9/"},
    )
    async with running.admin() as s:
        st, err = await call(s, "POST", "/api/v1/access-requests", request_body(sd, user_id=other.user_id))
    assert st == 422
    assert err["errors"] == [{"field": "user_id", "message": "the user does not belong to this group"}]


async def test_malformed_json_oversized_and_bad_utf8(running: Running) -> None:
    async with running.admin() as s:
        async with s.post(
            "/api/v1/groups", data=b"{not json", headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 400
            assert r.headers["Content-Type"].startswith("application/problem+json")
        async with s.post("/api/v1/groups", data=b'{"name": "\xff\xfe"}') as r:
            assert r.status == 400
            assert "UTF-8" in (await r.json(content_type=None))["detail"]
        async with s.post("/api/v1/groups", data=b"[1,2]") as r:
            assert r.status == 400
        big = b'{"name": "' + b"x" * (1024 * 1024 + 10) + b'"}'
        async with s.post("/api/v1/groups", data=io.BytesIO(big)) as r:
            assert r.status == 413
        deep = b"[" * 100000 + b"]" * 100000
        async with s.post("/api/v1/groups", data=deep) as r:
            assert r.status == 400
        st, groups = await call(s, "GET", "/api/v1/groups")
        assert groups["items"] == []


async def test_authentication_and_roles(running: Running) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=running.ssl)) as s:
        async with s.get(running.admin_url + "/api/v1/groups") as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        async with s.get(
            running.admin_url + "/api/v1/groups", headers={"Authorization": "Bearer dgw_wrong"}
        ) as r:
            assert r.status == 401
        async with s.get(running.admin_url + "/api/v1/groups", headers={"Authorization": "Basic eDp5"}) as r:
            assert r.status == 401
    async with running.admin(running.auditor_token) as s:
        st, _ = await call(s, "GET", "/api/v1/groups")
        assert st == 200
        st, err = await call(s, "POST", "/api/v1/groups", {"name": "x"})
        assert st == 403 and err["status"] == 403
        st, _ = await call(s, "GET", "/api/v1/audit")
        assert st == 200
    # Unknown routes and methods are still problem+json, and still need a token.
    async with running.admin() as s:
        st, err = await call(s, "GET", "/api/v1/nope")
        assert st == 404 and err["status"] == 404
        st, err = await call(s, "PUT", "/api/v1/groups")
        assert st == 405


async def test_forward_revoked_is_409_and_revoke_twice_is_409(running: Running) -> None:
    sd = await seed(running)
    async with running.admin() as s:
        st, req = await call(s, "POST", "/api/v1/access-requests", request_body(sd))
        st, rev = await call(s, "POST", f"/api/v1/access-requests/{req['id']}/revoke")
        assert st == 200 and rev["status"] == "revoked"
        st, err = await call(s, "POST", f"/api/v1/access-requests/{req['id']}/forward")
        assert st == 409
        st, err = await call(s, "POST", f"/api/v1/access-requests/{req['id']}/revoke")
        assert st == 409
        st, err = await call(s, "POST", "/api/v1/access-requests/req_missing/forward")
        assert st == 404


async def test_delivery_failure_is_502_keeps_saved_and_retry_works(running: Running) -> None:
    sd = await seed(running)
    running.mailbox.refuse = True
    async with running.admin() as s:
        st, req = await call(s, "POST", "/api/v1/access-requests", request_body(sd))
        st, err = await call(s, "POST", f"/api/v1/access-requests/{req['id']}/forward")
        assert st == 502, err
        assert err["type"].endswith("/delivery-failed")
        st, cur = await call(s, "GET", f"/api/v1/access-requests/{req['id']}")
        assert cur["status"] == "saved"
        st, events = await call(s, "GET", f"/api/v1/audit?type=request.forward_failed&request_id={req['id']}")
        assert len(events["items"]) == 1
        running.mailbox.refuse = False
        st, fwd = await call(s, "POST", f"/api/v1/access-requests/{req['id']}/forward")
        assert st == 200 and fwd["status"] == "forwarded"


async def test_sms_channel_through_real_http_provider(tmp_path: Any, unused_tcp_port: int) -> None:
    from domum_gateway.app import Gateway
    from domum_gateway.pki import client_ssl_context

    from ..conftest import _token, make_settings

    received: list[dict[str, Any]] = []

    async def provider(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer sms-secret":
            return web.Response(status=401)
        received.append(await request.json())
        return web.json_response({"id": "m1"})

    app = web.Application()
    app.router.add_post("/send", provider)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    settings = make_settings(tmp_path, sms={"url": f"http://127.0.0.1:{port}/send", "token": "sms-secret"})
    gw = Gateway(settings, grace=0.5)
    await gw.start()
    try:
        from domum_gateway.model import Role

        tok = await _token(gw, "admin", Role.ADMIN)
        async with aiohttp.ClientSession(
            base_url=gw.url("admin"),
            headers={"Authorization": f"Bearer {tok}"},
            connector=aiohttp.TCPConnector(ssl=client_ssl_context(settings.tls.ca)),
        ) as s:
            st, t = await call(
                s,
                "POST",
                "/api/v1/targets",
                {"name": "db", "protocol": "ssh", "host": "127.0.0.1", "port": 22},
            )
            assert st == 201, t
            st, g = await call(s, "POST", "/api/v1/groups", {"name": "ops", "policy": {"targets": ["db"]}})
            st, u = await call(
                s,
                "POST",
                "/api/v1/users",
                {"group_id": g["id"], "name": "Sam", "phone": "+41791234567", "channel": "sms"},
            )
            assert st == 201, u
            st, r = await call(s, "POST", "/api/v1/reasons", {"label": "On call"})
            start = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
            st, req = await call(
                s,
                "POST",
                "/api/v1/access-requests",
                {
                    "group_id": g["id"],
                    "user_id": u["id"],
                    "justification": "Night shift",
                    "reason_id": r["id"],
                    "start": start,
                    "duration": {"value": 1, "unit": "hours"},
                },
            )
            assert st == 201, req
            st, fwd = await call(s, "POST", f"/api/v1/access-requests/{req['id']}/forward")
            assert st == 200, fwd
            assert fwd["sent_to"].endswith("4567") and "791234" not in fwd["sent_to"]
        assert received and received[0]["to"] == "+41791234567"
        assert "/a/" in received[0]["body"]
    finally:
        await gw.stop()
        await runner.cleanup()


async def test_third_party_inline_user(running: Running) -> None:
    sd = await seed(running, kind="third_party")
    async with running.admin() as s:
        body = request_body(sd, user={"name": "Vendor Vic", "email": "vic@vendor.example"})
        body.pop("user_id")
        st, req = await call(s, "POST", "/api/v1/access-requests", body)
        assert st == 201, req
        assert req["user"]["third_party"] is True
        st, user = await call(s, "GET", f"/api/v1/users/{req['user_id']}")
        assert user["third_party"] is True and user["email"] == "vic@vendor.example"
    internal = await seed(
        running,
        email="int@example.com",
        target={"name": "wiki3", "protocol": "http", "url": "http://127.0.0.1:9/"},
    )
    async with running.admin() as s:
        body = request_body(internal, user={"name": "X", "email": "x@example.com"})
        body.pop("user_id")
        st, err = await call(s, "POST", "/api/v1/access-requests", body)
        assert st == 422 and err["errors"][0]["field"] == "user"


async def test_filters_treat_sql_and_bad_input_as_data(running: Running) -> None:
    sd = await seed(running)
    async with running.admin() as s:
        for _ in range(3):
            st, _r = await call(s, "POST", "/api/v1/access-requests", request_body(sd))
            assert st == 201
        st, page = await call(s, "GET", "/api/v1/access-requests", params={"user_id": "' OR 1=1 --"})
        assert st == 200 and page["items"] == []
        st, page = await call(
            s, "GET", "/api/v1/access-requests", params={"group_id": 'x"; DROP TABLE access_requests; --'}
        )
        assert st == 200 and page["items"] == []
        st, err = await call(s, "GET", "/api/v1/access-requests?status=bogus")
        assert st == 422 and err["errors"][0]["field"] == "status"
        st, err = await call(s, "GET", "/api/v1/access-requests?user_id=%FF%FE")
        assert st in (200, 400)
        st, err = await call(s, "GET", "/api/v1/access-requests?cursor=garbage!!")
        assert st == 400
        # Cursor pagination walks every row exactly once.
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
            st, page = await call(s, "GET", "/api/v1/access-requests", params=params)
            seen += [r["id"] for r in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert len(seen) == 3 == len(set(seen))


async def test_group_policy_validation(running: Running) -> None:
    async with running.admin() as s:
        st, err = await call(
            s,
            "POST",
            "/api/v1/groups",
            {
                "name": "bad",
                "policy": {
                    "targets": ["nope"],
                    "origins": {"allow_cidrs": ["010.0.0.0/8", "not-a-net"]},
                    "max_sessions": 0,
                    "channels": ["fax"],
                    "extra": 1,
                },
            },
        )
        assert st == 422
        fields = {e["field"] for e in err["errors"]}
        assert {"policy.targets[0]", "policy.max_sessions", "policy.channels", "policy.extra"} <= fields
        assert any(f.startswith("policy.origins.allow_cidrs") for f in fields)
        st, g = await call(
            s,
            "POST",
            "/api/v1/groups",
            {
                "name": "ok",
                "policy": {
                    "origins": {"allow_cidrs": ["10.0.0.0/8", "2001:db8::/32"], "deny_cidrs": ["10.1.0.0/16"]}
                },
            },
        )
        assert st == 201, g
        st, g2 = await call(s, "PATCH", f"/api/v1/groups/{g['id']}", {"policy": {"max_sessions": 1}})
        assert st == 200 and g2["policy"]["max_sessions"] == 1
        assert g2["policy"]["origins"]["deny_cidrs"] == ["10.1.0.0/16"]
        st, dup = await call(s, "POST", "/api/v1/groups", {"name": "ok"})
        assert st == 409


async def test_target_validation(running: Running) -> None:
    async with running.admin() as s:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"name": "Bad Name", "protocol": "http", "url": "http://x/"}, "name"),
            ({"name": "a", "protocol": "gopher"}, "protocol"),
            ({"name": "a", "protocol": "http", "url": "ftp://x/"}, "url"),
            ({"name": "a", "protocol": "http", "url": "http://u:p@x/"}, "url"),
            ({"name": "a", "protocol": "ssh"}, "host"),
            (
                {"name": "a", "protocol": "ssh", "host": "db", "ssh_host_key": "ssh-ed25519 garbage"},
                "ssh_host_key",
            ),
            ({"name": "a", "protocol": "tcp", "host": "db"}, "port"),
            ({"name": "a", "protocol": "tcp", "host": "db", "port": 70000}, "port"),
        ]
        for body, field in cases:
            st, err = await call(s, "POST", "/api/v1/targets", body)
            assert st == 422, (body, err)
            assert field in [e["field"] for e in err["errors"]], (body, err)


async def test_openapi_describes_every_route(running: Running) -> None:
    async with running.admin(running.auditor_token) as s:
        st, doc = await call(s, "GET", "/api/v1/openapi.json")
    assert st == 200 and doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    registered = set()
    for route in running.gateway.admin_app.router.routes():
        info = route.resource.canonical if route.resource else ""
        if info.startswith("/api/") and route.method != "HEAD":
            registered.add((route.method, info))
    assert registered == documented
    for ops in doc["paths"].values():
        for op in ops.values():
            for ref in json.dumps(op).split('"$ref": "')[1:]:
                name = ref.split('"')[0].rsplit("/", 1)[1]
                assert name in doc["components"]["schemas"]


async def test_ops_endpoints(running: Running) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=running.ssl)) as s:
        async with s.get(running.admin_url + "/healthz") as r:
            assert r.status == 200
        async with s.get(running.admin_url + "/readyz") as r:
            assert r.status == 200
        async with s.get(running.admin_url + "/metrics") as r:
            text = await r.text()
            assert "domum_logins_total" in text and "domum_denied_total" in text
    await running.gateway.store.close()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=running.ssl)) as s:
        async with s.get(running.admin_url + "/readyz") as r:
            assert r.status == 503
        async with s.get(
            running.admin_url + "/api/v1/groups", headers={"Authorization": f"Bearer {running.admin_token}"}
        ) as r:
            assert r.status == 503
    await running.gateway.store.open()


async def test_hostile_cursors_are_400(running: Running) -> None:
    import base64

    async with running.admin() as s:
        for raw in (["9" * 40], ["١٢٣"], ["x"], "not-a-list", [1]):
            cursor = base64.urlsafe_b64encode(json.dumps(raw).encode()).decode().rstrip("=")
            st, err = await call(s, "GET", "/api/v1/audit", params={"cursor": cursor})
            assert st == 400, (raw, err)
