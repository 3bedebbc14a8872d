"""Small helpers to drive the control API in tests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from ..conftest import Running


@dataclass
class Seed:
    group_id: str
    user_id: str
    reason_id: str
    target_id: str
    email: str


async def call(
    s: aiohttp.ClientSession, method: str, path: str, body: Any = None, **kw: Any
) -> tuple[int, Any]:
    async with s.request(method, path, json=body, **kw) as r:
        if r.status == 204:
            return r.status, None
        ctype = r.headers.get("Content-Type", "")
        data = await r.json(content_type=None) if "json" in ctype else await r.text()
        return r.status, data


async def seed(
    run: Running,
    *,
    email: str = "alice@example.com",
    policy: dict[str, Any] | None = None,
    target: dict[str, Any] | None = None,
    kind: str = "internal",
) -> Seed:
    async with run.admin() as s:
        st, t = await call(
            s,
            "POST",
            "/api/v1/targets",
            target or {"name": "wiki", "protocol": "http", "url": "http://127.0.0.1:9/"},
        )
        assert st == 201, t
        pol = {"targets": [t["id"]], "max_duration": {"value": 30, "unit": "days"}}
        pol.update(policy or {})
        st, g = await call(s, "POST", "/api/v1/groups", {"name": f"g-{email}", "kind": kind, "policy": pol})
        assert st == 201, g
        st, u = await call(
            s, "POST", "/api/v1/users", {"group_id": g["id"], "name": "Alice Example", "email": email}
        )
        assert st == 201, u
        st, r = await call(s, "POST", "/api/v1/reasons", {"label": f"Maintenance {email}"})
        assert st == 201, r
    return Seed(g["id"], u["id"], r["id"], t["id"], email)


def window_now(hours: int = 2) -> dict[str, Any]:
    start = datetime.now(UTC) - timedelta(minutes=5)
    return {"start": start.isoformat(), "duration": {"value": hours, "unit": "hours"}}


def request_body(sd: Seed, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "group_id": sd.group_id,
        "user_id": sd.user_id,
        "justification": "Patch the wiki",
        "reason_id": sd.reason_id,
        **window_now(),
    }
    body.update(over)
    return body


async def create_forwarded(run: Running, sd: Seed, **over: Any) -> tuple[str, str]:
    """Create and forward a request; return (request id, link path /a/...)."""
    async with run.admin() as s:
        st, req = await call(s, "POST", "/api/v1/access-requests", request_body(sd, **over))
        assert st == 201, req
        n = len(run.mailbox.messages)
        st, fwd = await call(s, "POST", f"/api/v1/access-requests/{req['id']}/forward")
        assert st == 200, fwd
    await run.mailbox.wait_count(n + 1)
    link = run.mailbox.last_link(sd.email)
    return req["id"], "/a/" + link.rsplit("/a/", 1)[1]


async def login_direct(run: Running, sd: Seed, link_path: str, address: str = "127.0.0.1") -> str:
    """Log in through the shared LoginService (no pages): send a token, read it from the
    real SMTP mailbox, redeem it. Returns the ``__Host-domum`` cookie value."""
    from domum_gateway.auth.origin import normalise_address

    login = run.gateway.login
    info = await login.resolve_link(link_path)
    assert info is not None
    peer = normalise_address(address)
    n = len(run.mailbox.messages)
    await login.send_token(info, peer, address)
    await run.mailbox.wait_count(n + 1)
    token = run.mailbox.last_token(sd.email)
    cookie, _live = await login.verify(info, token, peer, address)
    return cookie
