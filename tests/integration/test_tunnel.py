"""``/ws/tcp/{target}`` and the ``connect`` client against a real gateway and a TCP echo peer.

Bulk integrity (sha256 of 100 MiB each way), many concurrent tunnels, half-close, and
every refusal: no credentials, foreign or ``null`` Origin, ungranted target, expired
ticket, ticket after revoke, window end during an open tunnel, oversize frame,
unreachable target.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from domum_gateway.proxy.context import COOKIE
from domum_gateway.proxy.tunnel import TUNNELS, TunnelService
from domum_gateway.settings import HostPort
from domum_gateway.tunnel_client import ConnectOptions, TunnelClient

from ..conftest import Running
from ..peers.public_client import gateway_with
from ..peers.smtp import Mailbox
from ..peers.tcp import EchoServer, closed_port
from .helpers import Seed, call, create_forwarded, login_direct, seed

pytestmark = pytest.mark.asyncio

MiB = 1024 * 1024


def service_of(run: Running) -> TunnelService:
    return run.gateway.public_app[TUNNELS]


def public_port(run: Running) -> int:
    return run.gateway.port("public")


def full_link(run: Running, link_path: str) -> str:
    """The personal link as the user gets it, pointing at the test gateway's real port."""
    return f"https://localhost:{public_port(run)}{link_path}"


async def tcp_seed(
    run: Running, port: int, *, name: str = "echo", protocol: str = "tcp", email: str = "alice@example.com"
) -> Seed:
    return await seed(
        run, email=email, target={"name": name, "protocol": protocol, "host": "127.0.0.1", "port": port}
    )


def token_asker(run: Running, email: str) -> Any:
    """A blocking ``ask_token`` for TunnelClient: waits for the next mail in the real SMTP box."""
    seen = len(run.mailbox.messages)

    def ask() -> str:
        deadline = time.monotonic() + 10
        while len(run.mailbox.messages) <= seen:
            if time.monotonic() > deadline:
                raise AssertionError("no token mail arrived")
            time.sleep(0.02)
        return run.mailbox.last_token(email)

    return ask


@asynccontextmanager
async def connected(
    run: Running, sd: Seed, link_path: str, target: str = "echo", **kw: Any
) -> AsyncIterator[TunnelClient]:
    """A started in-process ``connect`` client (logged in, listening)."""
    options = ConnectOptions(
        link=full_link(run, link_path),
        target=target,
        listen=HostPort("127.0.0.1", 0),
        ca=run.gateway.settings.tls.ca,
        status_interval=3600,
        **kw,
    )
    client = TunnelClient(options, token_asker(run, sd.email), out=io.StringIO(), err=io.StringIO())
    try:
        await client.start()
        yield client
    finally:
        await client.close(logout=True)


async def pump(port: int, payload: bytes, *, chunk: int = 256 * 1024) -> bytes:
    """Send ``payload`` to 127.0.0.1:port, half-close, read everything back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), chunk):
            writer.write(view[i : i + chunk])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = bytearray()
    while True:
        data = await reader.read(1024 * 1024)
        if not data:
            break
        received += data
    await sender
    writer.close()
    return bytes(received)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text, whatever the label order."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = set(line[len(name) + 1 : line.index("}")].split(","))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels}")


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# happy paths ------------------------------------------------------------------------------
async def test_hundred_mib_each_way_keeps_every_byte(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        payload = os.urandom(100 * MiB)
        async with connected(running, sd, link) as client:
            received = await asyncio.wait_for(pump(client.local_port, payload), 60)
            assert len(received) == len(payload)
            assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
            assert echo.half_closed == 1, "the client's FIN reached the target as a half-close"
            await wait_for(lambda: not client.open)
            up, down = client.bytes_moved()
            assert up == down == 100 * MiB


async def test_two_hundred_concurrent_tunnels_each_move_one_mib(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        async with connected(running, sd, link) as client:
            payloads = [os.urandom(MiB) for _ in range(200)]
            results = await asyncio.wait_for(
                asyncio.gather(*(pump(client.local_port, p, chunk=64 * 1024) for p in payloads)), 60
            )
            assert [hashlib.sha256(r).digest() for r in results] == [
                hashlib.sha256(p).digest() for p in payloads
            ]
            assert echo.connections == 200
            assert client.totals.connections == 200


# helpers for the raw websocket tests --------------------------------------------------------
def ws_url(run: Running, target: str) -> str:
    return f"wss://localhost:{public_port(run)}/ws/tcp/{target}"


def own_origin(run: Running) -> str:
    return f"https://localhost:{public_port(run)}"


async def cli_login(run: Running, sd: Seed, link_path: str) -> dict[str, Any]:
    """The connect client's login, by hand: token by mail, then verify -> ticket."""
    link = full_link(run, link_path)
    async with aiohttp.ClientSession(
        base_url=own_origin(run), connector=aiohttp.TCPConnector(ssl=run.ssl)
    ) as s:
        n = len(run.mailbox.messages)
        st, sent = await call(s, "POST", "/cli/v1/token", {"link": link})
        assert st == 202, sent
        await run.mailbox.wait_count(n + 1)
        token = run.mailbox.last_token(sd.email)
        st, granted = await call(s, "POST", "/cli/v1/verify", {"link": link, "token": token})
        assert st == 200, granted
    return dict(granted)


@asynccontextmanager
async def ws_open(
    run: Running, target: str, headers: dict[str, str]
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=run.ssl)) as s:
        async with s.ws_connect(ws_url(run, target), headers=headers, autoping=True) as ws:
            yield ws


async def handshake_status(run: Running, target: str, headers: dict[str, str]) -> int:
    """The HTTP status of a refused upgrade (fails if the upgrade succeeds)."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        async with ws_open(run, target, headers):
            pass
    return exc.value.status


async def closed_with(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> tuple[int, str]:
    """Read until the server closes; (code, reason)."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return int(ws.close_code or 0), str(msg.extra or "")


async def echo_roundtrip(ws: aiohttp.ClientWebSocketResponse, data: bytes = b"ping through") -> None:
    await ws.send_bytes(data)
    got = b""
    async with asyncio.timeout(5):
        while len(got) < len(data):
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            got += msg.data
    assert got == data


# authentication and origin ----------------------------------------------------------------
async def test_browser_cookie_needs_this_gateways_origin(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        cookie = await login_direct(running, sd, link)
        with_cookie = {"Cookie": f"{COOKIE}={cookie}"}
        # no credentials at all, or a cookie without a same-site Origin: refused before any upgrade
        assert await handshake_status(running, "echo", {}) == 403
        assert await handshake_status(running, "echo", {"Origin": own_origin(running)}) == 401
        assert await handshake_status(running, "echo", with_cookie) == 403
        assert await handshake_status(running, "echo", {**with_cookie, "Origin": "null"}) == 403
        evil = {**with_cookie, "Origin": "https://evil.example"}
        assert await handshake_status(running, "echo", evil) == 403
        port_twin = {**with_cookie, "Origin": f"https://localhost:{public_port(running) + 1}"}
        assert await handshake_status(running, "echo", port_twin) == 403
        assert echo.connections == 0
        # the gateway's own page may
        async with ws_open(running, "echo", {**with_cookie, "Origin": own_origin(running)}) as ws:
            await echo_roundtrip(ws)
        # so may the configured public base URL's origin
        async with ws_open(running, "echo", {**with_cookie, "Origin": "https://LOCALHOST:8443"}) as ws:
            await echo_roundtrip(ws)


async def test_ticket_opens_tunnels_and_bad_tickets_do_not(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        granted = await cli_login(running, sd, link)
        assert granted["ticket"].startswith("dgt_")
        assert granted["targets"] == [{"name": "echo", "protocol": "tcp", "port": echo.port, "tunnel": True}]
        bearer = {"Authorization": f"Bearer {granted['ticket']}"}
        for _ in range(2):  # reusable: one websocket per local connection
            async with ws_open(running, "echo", bearer) as ws:
                await echo_roundtrip(ws)
        assert await handshake_status(running, "echo", {"Authorization": "Bearer dgt_forged"}) == 401
        assert await handshake_status(running, "echo", {"Authorization": "Basic abc"}) == 401
        foreign = {**bearer, "Origin": "https://evil.example"}
        assert await handshake_status(running, "echo", foreign) == 403
        # the ticket is stored hashed only
        tickets = service_of(running).tickets
        assert granted["ticket"] not in repr(tickets._cache)
        assert granted["ticket"].encode() not in await running.database_bytes()


async def test_expired_ticket_is_refused_and_renewal_gives_a_fresh_one(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        tickets = service_of(running).tickets
        tickets.ttl = timedelta(seconds=1)
        granted = await cli_login(running, sd, link)
        async with aiohttp.ClientSession(
            base_url=own_origin(running), connector=aiohttp.TCPConnector(ssl=running.ssl)
        ) as s:
            st, renewed = await call(
                s, "POST", "/cli/v1/renew", {}, headers={"Authorization": f"Bearer {granted['ticket']}"}
            )
            assert st == 200 and renewed["ticket"] != granted["ticket"]
        await asyncio.sleep(1.2)
        status = await handshake_status(running, "echo", {"Authorization": f"Bearer {granted['ticket']}"})
        assert status == 401


async def test_ticket_is_worthless_after_revoke_and_open_tunnels_close_1008(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        rid, link = await create_forwarded(running, sd)
        granted = await cli_login(running, sd, link)
        bearer = {"Authorization": f"Bearer {granted['ticket']}"}
        async with ws_open(running, "echo", bearer) as ws:
            await echo_roundtrip(ws)
            async with running.admin() as s:
                st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
                assert st == 200
            revoked_at = time.monotonic()
            code, reason = await closed_with(ws)
            assert time.monotonic() - revoked_at < 1.0
            assert code == 1008 and "revoked" in reason
        assert await handshake_status(running, "echo", bearer) == 401
        async with aiohttp.ClientSession(
            base_url=own_origin(running), connector=aiohttp.TCPConnector(ssl=running.ssl)
        ) as s:
            st, body = await call(s, "POST", "/cli/v1/renew", {}, headers=bearer)
            assert st == 401, body


async def test_window_end_closes_an_open_tunnel_within_a_second(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        start = datetime.now(UTC) - timedelta(seconds=56)
        rid, link = await create_forwarded(
            running, sd, start=start.isoformat(), duration={"value": 1, "unit": "minutes"}
        )
        end = start + timedelta(minutes=1)
        granted = await cli_login(running, sd, link)
        async with ws_open(running, "echo", {"Authorization": f"Bearer {granted['ticket']}"}) as ws:
            await echo_roundtrip(ws)
            code, reason = await closed_with(ws, timeout=10)
            late = (datetime.now(UTC) - end).total_seconds()
        assert code == 1008 and "ended" in reason
        assert -0.1 < late < 1.0, late


# policy, protocol and target failures -----------------------------------------------------
async def test_ungranted_and_unknown_targets_close_1008_with_the_same_words(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        async with running.admin() as s:
            body = {"name": "other", "protocol": "rdp", "host": "127.0.0.1", "port": 9}
            st, other = await call(s, "POST", "/api/v1/targets", body)
            assert st == 201, other
        _rid, link = await create_forwarded(running, sd)
        bearer = {"Authorization": f"Bearer {(await cli_login(running, sd, link))['ticket']}"}
        reasons = []
        for name in ("other", "no-such-target"):
            async with ws_open(running, name, bearer) as ws:
                code, reason = await closed_with(ws)
                assert code == 1008
                reasons.append(reason)
        assert reasons[0] == reasons[1] and "does not include" in reasons[0]
        async with ws_open(running, "echo", bearer) as ws:  # the session itself is fine
            await echo_roundtrip(ws)


async def test_unreachable_target_closes_1011(running: Running) -> None:
    sd = await tcp_seed(running, closed_port())
    _rid, link = await create_forwarded(running, sd)
    bearer = {"Authorization": f"Bearer {(await cli_login(running, sd, link))['ticket']}"}
    async with ws_open(running, "echo", bearer) as ws:
        code, reason = await closed_with(ws)
    assert code == 1011 and "could not be reached" in reason
    assert "127.0.0.1" not in reason


async def test_target_that_never_accepts_is_given_up_on_after_proxy_connect_timeout(
    tmp_path: Path, mailbox: tuple[Mailbox, int]
) -> None:
    """``proxy.connect_timeout`` bounds every path's dial (here 1 s): a tunnel to a port whose
    TCP handshake never completes closes 1011 after about that long; the SSH paths read the
    same setting."""
    async with gateway_with(tmp_path, mailbox, proxy={"connect_timeout": 1.0}) as run:
        assert run.gateway.jump.connect_timeout == 1.0
        with socket.socket() as listener:  # backlog 0 plus one queued connection: SYNs dropped
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = int(listener.getsockname()[1])
            with socket.create_connection(("127.0.0.1", port), 1):
                sd = await tcp_seed(run, port)
                _rid, link = await create_forwarded(run, sd)
                bearer = {"Authorization": f"Bearer {(await cli_login(run, sd, link))['ticket']}"}
                started = time.monotonic()
                async with ws_open(run, "echo", bearer) as ws:
                    code, reason = await closed_with(ws)
                elapsed = time.monotonic() - started
        assert code == 1011 and "could not be reached" in reason, (code, reason)
        assert 0.9 <= elapsed < 3.0, elapsed


async def test_oversize_and_text_frames_are_refused(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        bearer = {"Authorization": f"Bearer {(await cli_login(running, sd, link))['ticket']}"}
        limit = service_of(running).max_frame
        async with ws_open(running, "echo", bearer) as ws:
            await echo_roundtrip(ws, os.urandom(limit))  # the limit itself is fine
            await ws.send_bytes(b"x" * (limit + 1))
            code, _reason = await closed_with(ws)
            assert code == 1009
        async with ws_open(running, "echo", bearer) as ws:
            await ws.send_str("hello")
            code, _reason = await closed_with(ws)
            assert code == 1003
        assert echo.received == limit


async def test_not_a_websocket_request_is_told_what_to_use(running: Running) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=running.ssl)) as s:
        async with s.get(f"{own_origin(running)}/ws/tcp/echo") as resp:
            assert resp.status == 426
            assert "domum-gateway connect" in (await resp.json(content_type=None))["detail"]


# keepalive, idle, audit and metrics ---------------------------------------------------------
async def test_silent_client_is_dropped_and_idle_tunnel_closed(running: Running) -> None:
    service = service_of(running)
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        async with connected(running, sd, link) as client:
            service.tick_interval = 0.1
            service._arm_tick()
            service.ping_interval = 0.3
            service.pong_timeout = 0.3
            # the connect client answers pings by itself; a client that never does is dropped
            reader, writer = await asyncio.open_connection("127.0.0.1", client.local_port)
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            bearer = {"Authorization": f"Bearer {client.ticket}"}
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=running.ssl)) as s:
                async with s.ws_connect(ws_url(running, "echo"), headers=bearer, autoping=False) as dead:
                    await echo_roundtrip(dead)
                    msg = await dead.receive(timeout=5)
                    assert msg.type is aiohttp.WSMsgType.PING  # never answered
                    msg = await dead.receive(timeout=5)
                    assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), msg
            assert len(client.open) == 1
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"
            # quiet for longer than the idle timeout: closed normally, the client keeps listening
            service.idle_timeout = 0.5
            assert await asyncio.wait_for(reader.read(), 5) == b""
            await wait_for(lambda: not client.open)
            assert client._done is not None and not client._done.done()
            writer.close()


async def test_audit_and_metrics_record_each_tunnel_once(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        rid, link = await create_forwarded(running, sd)
        async with connected(running, sd, link) as client:
            payload = os.urandom(3 * MiB + 17)
            assert await pump(client.local_port, payload) == payload
            await wait_for(lambda: not service_of(running).open)
        async with running.admin() as s:
            for _ in range(50):
                st, page = await call(s, "GET", f"/api/v1/audit?request_id={rid}&limit=500")
                assert st == 200
                events = {e["type"]: e for e in page["items"] if e["type"].startswith("tunnel.")}
                if "tunnel.closed" in events:
                    break
                await asyncio.sleep(0.05)
            st, metrics_text = await call(s, "GET", "/metrics")
        kinds = [e["type"] for e in page["items"] if e["type"].startswith("tunnel.")]
        assert sorted(kinds) == ["tunnel.closed", "tunnel.opened"]
        closed = events["tunnel.closed"]["details"]
        assert closed["bytes_up"] == closed["bytes_down"] == len(payload)
        assert closed["duration_seconds"] > 0 and closed["close_code"] == 1000
        assert closed["target"] == "echo" and closed["auth"] == "ticket"
        assert metric(metrics_text, "domum_tunnel_bytes_total", protocol="tcp", direction="up") == len(
            payload
        )
        assert metric(metrics_text, "domum_tunnel_bytes_total", protocol="tcp", direction="down") == len(
            payload
        )
        assert metric(metrics_text, "domum_sessions_active", protocol="tcp") == 0


async def test_policy_edit_that_drops_the_target_closes_its_tunnel(running: Running) -> None:
    service = service_of(running)
    service.tick_interval = 0.1
    service._arm_tick()
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        bearer = {"Authorization": f"Bearer {(await cli_login(running, sd, link))['ticket']}"}
        async with ws_open(running, "echo", bearer) as ws:
            await echo_roundtrip(ws)
            async with running.admin() as s:
                st, group = await call(s, "GET", f"/api/v1/groups/{sd.group_id}")
                assert st == 200, group
                policy = {**group["policy"], "targets": []}
                st, body = await call(s, "PATCH", f"/api/v1/groups/{sd.group_id}", {"policy": policy})
                assert st == 200, body
            code, reason = await closed_with(ws)
        assert code == 1008 and "does not include" in reason


async def test_gateway_shutdown_says_going_away_and_the_client_stops(running: Running) -> None:
    service = service_of(running)
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        async with connected(running, sd, link) as client:
            reader, writer = await asyncio.open_connection("127.0.0.1", client.local_port)
            writer.write(b"hi")
            assert await reader.readexactly(2) == b"hi"
            await service.on_shutdown(running.gateway.public_app)
            code, message = await asyncio.wait_for(client.wait(), 5)
            assert code == 3 and "shutting down" in message
            assert not service.open
            writer.close()


async def test_open_tunnel_shows_in_the_live_registry_and_can_be_cut_alone(running: Running) -> None:
    """An auditor sees the tunnel under its session, with its bytes, and can cut just it."""
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        granted = await cli_login(running, sd, link)
        async with ws_open(running, "echo", {"Authorization": f"Bearer {granted['ticket']}"}) as ws:
            await echo_roundtrip(ws)
            async with running.admin(running.auditor_token) as s:
                st, page = await call(s, "GET", "/api/v1/sessions")
                assert st == 200
                (item,) = page["items"]
                (conn,) = item["connections"]
                assert conn["protocol"] == "tcp" and conn["target"] == "echo"
                assert conn["id"].startswith("con_")
                st, _ = await call(s, "DELETE", f"/api/v1/sessions/{conn['id']}")
                assert st == 204
            code, reason = await closed_with(ws, timeout=5)
        assert code == 1008 and "terminated" in reason
        assert running.gateway.sessions.connections() == []
        # The session itself lives on: a new tunnel opens.
        async with ws_open(running, "echo", {"Authorization": f"Bearer {granted['ticket']}"}) as ws:
            await echo_roundtrip(ws)
