"""Origin rules on the public listener: CIDRs, IPv6, proxies and X-Forwarded-For, countries.

Different client addresses come from binding the test client to other loopback addresses
(127.0.0.2, ::1) or, behind a trusted proxy, from X-Forwarded-For. Hostile header cases
are written as raw bytes, so no client library tidies them first.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest

from domum_gateway.errors import ConfigError

from ..conftest import Running
from ..peers.mmdb import country_record, write_mmdb
from ..peers.public_client import client_for, gateway_with, sign_in
from ..peers.smtp import Mailbox
from .helpers import call, create_forwarded, seed

pytestmark = pytest.mark.asyncio

ORIGIN_TITLE = "Not allowed from this network"


BOB_TARGET = {"name": "bobs-wiki", "protocol": "http", "url": "http://127.0.0.1:9/"}


def _origins(**rules: Any) -> dict[str, Any]:
    return {"origins": {"allow_cidrs": [], "deny_cidrs": [], "countries": [], **rules}}


async def _raw_get(run: Running, path: str, headers: list[tuple[str, str]]) -> int:
    """Send one request as raw bytes over TLS; return the status code."""
    port = run.gateway.port("public")
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=run.ssl)
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass
    return int(status_line.split()[1])


async def test_allow_list_admits_only_listed_addresses(running: Running) -> None:
    sd = await seed(running, policy=_origins(allow_cidrs=["127.0.0.2/32"]))
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as outside:
        page = await outside.get(link)
        assert page.status == 403 and page.title == ORIGIN_TITLE
        assert "Connect from an approved network" in page.message
    async with client_for(running, local_addr="127.0.0.2") as inside:
        await sign_in(running, inside, link, sd.email)
    async with running.admin() as s:
        st, text = await call(s, "GET", "/metrics")
    assert 'domum_denied_total{reason="origin_denied"}' in str(text)


async def test_deny_wins_over_allow(running: Running) -> None:
    sd = await seed(running, policy=_origins(allow_cidrs=["127.0.0.0/8"], deny_cidrs=["127.0.0.3/32"]))
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running, local_addr="127.0.0.3") as denied:
        assert (await denied.get(link)).status == 403
        assert (await denied.post(f"{link}/token", csrf=None)).status == 403
    async with client_for(running) as allowed:
        assert (await allowed.get(link)).status == 200


async def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(running: Running) -> None:
    sd = await seed(running, policy=_origins(allow_cidrs=["203.0.113.0/24"]))
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running, headers={"X-Forwarded-For": "203.0.113.5"}) as liar:
        page = await liar.get(link)
        assert page.status == 403 and page.title == ORIGIN_TITLE
    sd2 = await seed(
        running, email="bob@example.com", target=BOB_TARGET, policy=_origins(deny_cidrs=["127.0.0.1/32"])
    )
    _rid2, link2 = await create_forwarded(running, sd2)
    async with client_for(running, headers={"X-Forwarded-For": "198.51.100.1"}) as liar:
        assert (await liar.get(link2)).status == 403


async def test_policy_change_cuts_a_live_session_from_a_now_denied_address(running: Running) -> None:
    sd = await seed(running)
    rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        await sign_in(running, user, link, sd.email)
        async with running.admin() as s:
            st, g = await call(s, "GET", f"/api/v1/groups/{sd.group_id}")
            policy = g["policy"]
            policy["origins"]["deny_cidrs"] = ["127.0.0.1/32"]
            st, g = await call(s, "PATCH", f"/api/v1/groups/{sd.group_id}", {"policy": policy})
            assert st == 200, g
        await asyncio.sleep(0.05)
        page = await user.get("/portal")
        assert page.status in (401, 403)
        assert (await user.get("/portal")).status == 401
    del rid


async def test_explain_names_the_origin_rule(running: Running) -> None:
    sd = await seed(running, policy=_origins(deny_cidrs=["198.51.100.0/24"]))
    rid, _link = await create_forwarded(running, sd)
    async with running.admin() as s:
        st, body = await call(s, "POST", "/api/v1/explain", {"request_id": rid, "address": "198.51.100.9"})
        assert st == 200, body
        assert body["reason"] == "origin_denied"
        st, body = await call(
            s, "POST", "/api/v1/explain", {"request_id": rid, "address": "::ffff:198.51.100.9"}
        )
        assert body["reason"] == "origin_denied"


async def test_leading_zero_octets_are_refused_in_policies(running: Running) -> None:
    async with running.admin() as s:
        st, body = await call(
            s,
            "POST",
            "/api/v1/groups",
            {"name": "zeros", "kind": "internal", "policy": _origins(allow_cidrs=["010.0.0.0/8"])},
        )
    assert st == 422
    assert any("allow_cidrs[0]" in e["field"] for e in body["errors"])


# behind a trusted proxy -------------------------------------------------------------
@pytest.fixture
async def proxied(tmp_path: Path, mailbox: tuple[Mailbox, int]) -> Any:
    async with gateway_with(tmp_path, mailbox, public={"trusted_proxies": ["127.0.0.1/32"]}) as run:
        yield run


async def test_trusted_proxy_forwarded_for_is_honoured(proxied: Running) -> None:
    sd = await seed(proxied, policy=_origins(allow_cidrs=["203.0.113.0/24"]))
    _rid, link = await create_forwarded(proxied, sd)
    async with client_for(proxied, headers={"X-Forwarded-For": "203.0.113.5"}) as user:
        await sign_in(proxied, user, link, sd.email)
        assert (await user.get("/portal")).status == 200
    cases = {
        "198.51.100.1": 403,
        "203.0.113.5, 198.51.100.1": 403,  # the right-most untrusted hop is the client
        "198.51.100.1, 203.0.113.5": 200,  # a client-written left part is not believed
        "198.51.100.1, 203.0.113.5, 127.0.0.1": 200,  # our own proxies are skipped
        "203.0.113.7:51234": 200,  # a port some proxies append
        "garbage, 203.0.113.5": 200,
        "203.0.113.5, garbage": 403,  # unparsable hop: falls back to the proxy, not allowed
        "": 403,
    }
    for value, expected in cases.items():
        async with client_for(proxied, headers={"X-Forwarded-For": value} if value else {}) as c:
            got = (await c.get(link)).status
            assert got == expected, (value, got)


async def test_ipv4_mapped_ipv6_addresses_match_ipv4_rules(proxied: Running) -> None:
    sd = await seed(proxied, policy=_origins(allow_cidrs=["203.0.113.0/24"], deny_cidrs=["203.0.113.66/32"]))
    _rid, link = await create_forwarded(proxied, sd)
    for value, expected in {
        "::ffff:203.0.113.5": 200,
        "::FFFF:203.0.113.5": 200,
        "[::ffff:203.0.113.5]:443": 200,
        "::ffff:203.0.113.66": 403,  # the deny rule is not dodged by writing it as IPv6
        "::ffff:cb00:7142": 403,  # 203.0.113.66 in hex
        "::ffff:198.51.100.1": 403,
        "0203.0.113.5": 403,  # leading zeros are not an address
    }.items():
        async with client_for(proxied, headers={"X-Forwarded-For": value}) as c:
            got = (await c.get(link)).status
            assert got == expected, (value, got)


async def test_connection_header_naming_forwarded_for_is_not_trusted(proxied: Running) -> None:
    sd = await seed(proxied, policy=_origins(allow_cidrs=["203.0.113.0/24"]))
    _rid, link = await create_forwarded(proxied, sd)
    ok = await _raw_get(proxied, link, [("X-Forwarded-For", "203.0.113.5"), ("Connection", "close")])
    assert ok == 200
    # A hop told to drop X-Forwarded-For did not vouch for the value that arrived.
    for connection in ("close, X-Forwarded-For", "x-forwarded-for", "keep-alive,  X-FORWARDED-FOR "):
        status = await _raw_get(
            proxied, link, [("X-Forwarded-For", "203.0.113.5"), ("Connection", connection)]
        )
        assert status == 403, connection


async def test_ipv6_clients_and_rules(tmp_path: Path, mailbox: tuple[Mailbox, int]) -> None:
    async with gateway_with(tmp_path, mailbox, public={"listen": "[::1]:0"}) as run:
        assert run.public_url.startswith("https://[::1]:")
        sd_v6 = await seed(run, policy=_origins(allow_cidrs=["::1/128"]))
        _rid, link_v6 = await create_forwarded(run, sd_v6)
        sd_v4 = await seed(
            run, email="bob@example.com", target=BOB_TARGET, policy=_origins(allow_cidrs=["127.0.0.0/8"])
        )
        _rid2, link_v4 = await create_forwarded(run, sd_v4)
        async with client_for(run) as user:
            await sign_in(run, user, link_v6, sd_v6.email)
            page = await user.get(link_v4)
            assert page.status == 403 and page.title == ORIGIN_TITLE


# countries ----------------------------------------------------------------------------
@pytest.fixture
def geo_db(tmp_path: Path) -> Path:
    return write_mmdb(
        tmp_path / "geo" / "countries.mmdb",
        {
            "203.0.113.0/24": country_record("DE"),
            "198.51.100.0/24": country_record("FR"),
            "2001:db8::/32": country_record("DE"),
        },
    )


async def test_country_rules_with_a_maxmind_database(
    tmp_path: Path, mailbox: tuple[Mailbox, int], geo_db: Path
) -> None:
    async with gateway_with(
        tmp_path,
        mailbox,
        public={"trusted_proxies": ["127.0.0.1/32"]},
        geoip={"database": str(geo_db)},
    ) as run:
        sd = await seed(run, policy=_origins(countries=["DE"]))
        _rid, link = await create_forwarded(run, sd)
        async with client_for(run, headers={"X-Forwarded-For": "203.0.113.9"}) as german:
            await sign_in(run, german, link, sd.email)
            assert (await german.get("/portal")).status == 200
        async with client_for(run, headers={"X-Forwarded-For": "2001:db8::5"}) as german_v6:
            assert (await german_v6.get(link)).status == 200
        for elsewhere in ("198.51.100.9", "192.0.2.1", "2001:db9::1"):
            async with client_for(run, headers={"X-Forwarded-For": elsewhere}) as c:
                page = await c.get(link)
                assert page.status == 403, elsewhere
                assert page.title == "Not allowed from this location"
                assert "approved country" in page.message


async def test_country_rules_without_a_database_fail_closed(running: Running) -> None:
    sd = await seed(running, policy=_origins(countries=["DE"]))
    _rid, link = await create_forwarded(running, sd)
    async with client_for(running) as user:
        page = await user.get(link)
        assert page.status == 403 and page.title == "Not allowed from this location"


async def test_a_missing_geoip_database_stops_start_up(tmp_path: Path, mailbox: tuple[Mailbox, int]) -> None:
    with pytest.raises(ConfigError, match=r"geoip\.database"):
        async with gateway_with(tmp_path, mailbox, geoip={"database": str(tmp_path / "nope.mmdb")}):
            pass
