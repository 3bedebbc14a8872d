"""Cut-off (issue #7): every way a grant or session ends closes its live connections within
one second, tells the user why, and forwards nothing after the cut.

Real peers on loopback: a TCP echo behind ``/ws/tcp/{target}``, a websocket upstream
behind the HTTP proxy, a real ``sshd`` behind the browser terminal and behind ``ssh -J``.
The websocket paths are driven by a raw client (TLS socket, hand-made frames) so that,
after the close frame has arrived, it can keep writing data frames as a misbehaving
client would; the peers count what reaches them, which must not move.

Covered elsewhere (not repeated): revoke of a tunnel (test_tunnel), of a proxied
websocket (test_proxy_websocket), of a browser terminal (test_ssh_terminal) and of an
``ssh -J`` connection (test_jump); window end of a tunnel (test_tunnel); cutting a tunnel
alone from the registry (test_tunnel, test_sessions_registry). Here: the other causes
on each path, the "nothing after the cut" check, and the two cut-off metrics.

Idle here: the session clock is moved past the grant's idle timeout and the tunnel's tick
(shortened) notices on its next check; the 1 s is counted from that moment. The idle
timer itself (no clock moved: real seconds of silence) is tested on every path in
test_idle.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from ..conftest import Running
from ..peers.sshd import Sshd, ensure_user, sshd_available
from ..peers.tcp import EchoServer
from .helpers import Seed, call, create_forwarded, login_direct, seed
from .test_jump import seed_ssh, sleeping_through_jump
from .test_ssh_terminal import PASSWORD, USER, Term, sign_in_to_target, signed_in, ws_client
from .test_tunnel import cli_login, metric, service_of, tcp_seed

pytestmark = pytest.mark.asyncio

WITHIN = 1.0  # the contract: every affected connection gone within one second
PROBE = b"are you there?"


# a raw websocket client ------------------------------------------------------------------
class RawWs:
    """A client websocket on a bare TLS stream: it can write after the close, as an
    attacker would, and records when the close frame arrived."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed_at = 0.0

    @classmethod
    async def open(cls, run: Running, path: str, headers: dict[str, str], local: str = "127.0.0.1") -> RawWs:
        port = run.gateway.port("public")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1", port, ssl=run.ssl, server_hostname="localhost", local_addr=(local, 0)
            ),
            10,
        )
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: localhost:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    def send(self, payload: bytes, opcode: int = 0x2) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode]) + (
            bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
        )
        self.writer.write(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    async def frame(self, timeout: float) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return b0 & 0x0F, await self.reader.readexactly(n)

    async def roundtrip(self, data: bytes = PROBE, opcode: int = 0x2) -> bytes:
        self.send(data, opcode)
        got = b""
        while len(got) < len(data):
            op, payload = await self.frame(5)
            assert op in (0x0, 0x1, 0x2), (op, payload)
            got += payload
        return got

    async def closed(self, timeout: float = 5.0) -> tuple[int, str]:
        """Read until the close frame (data frames still in flight are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    op, payload = await self.frame(timeout)
                except asyncio.IncompleteReadError:
                    self.closed_at = self.closed_at or time.monotonic()
                    return self.close_code or 1006, ""
                if op == 0x8:
                    self.closed_at = time.monotonic()
                    self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                    self.close_reason = payload[2:].decode()
                    return self.close_code, self.close_reason

    async def keep_writing(self, rounds: int = 5) -> None:
        """What a client that ignores the close does: more data (errors are the point)."""
        for i in range(rounds):
            try:
                self.send(b"after the cut %d" % i)
                await self.writer.drain()
            except (ConnectionError, RuntimeError):
                return
            await asyncio.sleep(0.02)

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (ConnectionError, TimeoutError, OSError):
            pass


# a websocket upstream that counts what reaches it ----------------------------------------
class CountingUpstream:
    def __init__(self) -> None:
        self.received = 0
        self.open = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        self.open += 1
        try:
            async for msg in sock:
                if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                    data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                    self.received += len(data)
                    await sock.send_bytes(data)
        finally:
            self.open -= 1
        return sock

    @asynccontextmanager
    async def running(self) -> AsyncIterator[CountingUpstream]:
        app = web.Application()
        app.router.add_get("/ws", self.ws)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/"
        try:
            yield self
        finally:
            await self._runner.cleanup()


# real sshd peers (the same set-up as test_jump and test_ssh_terminal) -------------------
@pytest.fixture
def target(tmp_path: Path) -> Iterator[Sshd]:
    """A key-only sshd for ``ssh -J``."""
    with Sshd.running(tmp_path / "target") as sshd:
        yield sshd


@pytest.fixture
def pam_sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A password sshd for the browser terminal."""
    if not sshd_available():
        pytest.skip("needs root and Debian openssh-server")
    ensure_user(USER, PASSWORD)
    with Sshd.running(tmp_path / "pam", password=True) as sshd:
        yield sshd


@asynccontextmanager
async def terminal(run: Running, cookie: str) -> AsyncIterator[Term]:
    async with ws_client(run, cookie) as s:
        ws = await s.ws_connect(
            f"{run.public_url}/ws/ssh/db01", headers={"Origin": run.public_url}, autoping=True
        )
        yield Term(ws)


# causes ----------------------------------------------------------------------------------
class ShiftedClock:
    """The wall clock plus an offset the test moves (for the idle timeout)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def revoke(run: Running, rid: str) -> None:
    async with run.admin() as s:
        st, body = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
        assert st == 200, body


async def terminate_session(run: Running) -> None:
    (live,) = run.gateway.sessions.live_sessions()
    async with run.admin(run.auditor_token) as s:
        st, body = await call(s, "DELETE", f"/api/v1/sessions/{live.id}")
        assert st == 204, body


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


REASONS = {
    "revoke": "revoked",
    "window_end": "ended",
    "logout": "signed out",
    "terminate": "terminated",
    "idle": "idle",
    "address_change": "address changed",
}


# TCP tunnel to a TCP echo ----------------------------------------------------------------
@pytest.mark.parametrize("cause", ["revoke", "window_end", "logout", "terminate", "idle", "address_change"])
async def test_tunnel_cut_closes_within_a_second_and_forwards_nothing_after(
    running: Running, cause: str
) -> None:
    service = service_of(running)
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        over: dict[str, Any] = {}
        end = None
        if cause == "window_end":  # a one-minute window with a few seconds left
            start = datetime.now(UTC) - timedelta(seconds=54)
            end = start + timedelta(minutes=1)
            over = {"start": start.isoformat(), "duration": {"value": 1, "unit": "minutes"}}
        rid, link = await create_forwarded(running, sd, **over)
        ticket = (await cli_login(running, sd, link))["ticket"]
        bearer = {"Authorization": f"Bearer {ticket}"}
        ws = await RawWs.open(running, "/ws/tcp/echo", bearer)
        try:
            assert await ws.roundtrip() == PROBE
            await wait_until(lambda: echo.received == len(PROBE))
            if cause == "idle":
                clock = ShiftedClock()
                running.gateway.sessions._clock = clock
                service.tick_interval = 0.05
                service._arm_tick()
                await asyncio.sleep(0.3)  # a tick counts the round trip as activity first
            t0 = time.monotonic()
            if cause == "revoke":
                await revoke(running, rid)
            elif cause == "window_end":
                assert end is not None
                t0 += (end - datetime.now(UTC)).total_seconds()
            elif cause == "logout":
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=running.ssl)) as s:
                    st, body = await call(
                        s, "POST", f"{running.public_url}/cli/v1/logout", {}, headers=bearer
                    )
                    assert st == 204, body
            elif cause == "terminate":
                await terminate_session(running)
            elif cause == "idle":
                (live,) = running.gateway.sessions.live_sessions()
                clock.offset = timedelta(seconds=live.grant.idle_timeout_seconds + 1)
            elif cause == "address_change":
                # The same ticket from another address: refused, and the session ends.
                other = await RawWs.open(running, "/ws/tcp/echo", bearer, local="127.0.0.2")
                code, reason = await other.closed()
                await other.aclose()
                assert code == 1008 and REASONS[cause] in reason, (code, reason)
            code, reason = await ws.closed(timeout=10 if cause == "window_end" else 5)
            elapsed = ws.closed_at - t0
            assert code == 1008 and REASONS[cause] in reason, (code, reason)
            assert elapsed < WITHIN, elapsed
            at_cut = echo.received
            await ws.keep_writing()
            # the gateway hung up on the target too (the echo sees the end of its stream)
            await wait_until(lambda: echo.half_closed == 1 or not echo.live, WITHIN)
            await asyncio.sleep(0.2)
            assert echo.received == at_cut == len(PROBE)
        finally:
            await ws.aclose()
        await wait_until(lambda: not service.open)
        assert running.gateway.sessions.connections() == []


# websocket through the HTTP proxy --------------------------------------------------------
async def _proxy_user(run: Running, up: CountingUpstream) -> tuple[Seed, str, str]:
    sd = await seed(run, email="ws@example.com", target={"name": "chat", "protocol": "http", "url": up.url})
    rid, link = await create_forwarded(run, sd)
    return sd, rid, await login_direct(run, sd, link)


@pytest.mark.parametrize("cause", ["logout", "terminate", "address_change"])
async def test_proxied_websocket_cut_closes_within_a_second_and_forwards_nothing_after(
    running: Running, cause: str
) -> None:
    async with CountingUpstream().running() as up:
        _sd, _rid, cookie = await _proxy_user(running, up)
        headers = {"Cookie": f"__Host-domum={cookie}"}
        ws = await RawWs.open(running, "/t/chat/ws", headers)
        try:
            assert await ws.roundtrip() == PROBE
            await wait_until(lambda: up.received == len(PROBE))
            t0 = time.monotonic()
            if cause == "logout":
                (live,) = running.gateway.sessions.live_sessions()
                await running.gateway.sessions.end(live, "signed out", f"user:{live.user_id}")
            elif cause == "terminate":
                await terminate_session(running)
            elif cause == "address_change":
                async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=running.ssl, local_addr=("127.0.0.2", 0)),
                    headers=headers,
                ) as s:
                    async with s.get(f"{running.public_url}/portal") as r:
                        assert r.status in (401, 403), r.status
            code, reason = await ws.closed()
            assert ws.closed_at - t0 < WITHIN, ws.closed_at - t0
            assert code == 1008 and REASONS[cause] in reason, (code, reason)
            at_cut = up.received
            await ws.keep_writing()
            await wait_until(lambda: up.open == 0, WITHIN)
            await asyncio.sleep(0.2)
            assert up.received == at_cut == len(PROBE)
        finally:
            await ws.aclose()


# browser SSH terminal to a real sshd -----------------------------------------------------
@pytest.mark.parametrize("cause", ["terminate", "window_end"])
async def test_terminal_cut_closes_within_a_second_with_the_reason(
    running: Running, pam_sshd: Sshd, cause: str
) -> None:
    if cause == "window_end":
        start = datetime.now(UTC) - timedelta(seconds=50)
        end = start + timedelta(minutes=1)
        spec = {
            "name": "db01",
            "protocol": "ssh",
            "host": "127.0.0.1",
            "port": pam_sshd.port,
            "ssh_host_key": pam_sshd.host_key_line,
        }
        sd = await seed(running, target=spec)
        _rid, link = await create_forwarded(
            running, sd, start=start.isoformat(), duration={"value": 1, "unit": "minutes"}
        )
        cookie = await login_direct(running, sd, link)
    else:
        _sd, _rid, cookie = await signed_in(running, pam_sshd)
    async with terminal(running, cookie) as term:
        await sign_in_to_target(term)
        await term.expect("$ ")
        t0 = time.monotonic()
        if cause == "terminate":
            await terminate_session(running)
        else:
            t0 += (end - datetime.now(UTC)).total_seconds()
        code, reason = await term.closed(12.0)
        elapsed = time.monotonic() - t0
    assert code == 1008 and REASONS[cause] in reason, (code, reason)
    assert elapsed < WITHIN, elapsed
    assert f"Session ended: {reason}." in term.seen.decode()
    await wait_until(lambda: running.gateway.sessions.connections() == [])


# native ssh -J through the jump server ---------------------------------------------------
async def test_jump_terminate_disconnects_within_a_second_with_the_reason(
    running: Running, target: Sshd, tmp_path: Path
) -> None:
    sd = await seed_ssh(running, target)
    _rid, link = await create_forwarded(running, sd)
    jc, proc = await sleeping_through_jump(running, target, tmp_path / "client", sd.email, link)
    t0 = time.monotonic()
    await terminate_session(running)
    result = await jc.finish(proc, 10)
    elapsed = time.monotonic() - t0
    assert result.returncode == 255
    assert "Domum Gateway: terminated by an administrator" in result.stderr
    assert elapsed < WITHIN + 0.5, elapsed  # includes the ssh client's own exit


# metrics ---------------------------------------------------------------------------------
def gauge(text: str, name: str) -> float:
    """An unlabelled sample from Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no sample {name}")


async def test_cutoff_and_grants_metrics_after_a_revoke(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        rid, link = await create_forwarded(running, sd)
        # a second grant, saved but not forwarded, and one in the future: neither counts
        async with running.admin() as s:
            body = {
                "group_id": sd.group_id,
                "user_id": sd.user_id,
                "justification": "later",
                "reason_id": sd.reason_id,
                "start": (datetime.now(UTC) + timedelta(days=1)).isoformat(),
                "duration": {"value": 1, "unit": "hours"},
            }
            st, later = await call(s, "POST", "/api/v1/access-requests", body)
            assert st == 201, later
            st, text = await call(s, "GET", "/metrics")
        assert gauge(text, "domum_grants_active") == 1
        assert metric(text, "domum_cutoff_seconds_count", cause="revoke") == 0
        bearer = {"Authorization": f"Bearer {(await cli_login(running, sd, link))['ticket']}"}
        tunnels = [await RawWs.open(running, "/ws/tcp/echo", bearer) for _ in range(3)]
        for ws in tunnels:
            assert await ws.roundtrip() == PROBE
        await revoke(running, rid)
        for ws in tunnels:
            assert (await ws.closed())[0] == 1008
            await ws.aclose()
        await wait_until(lambda: not service_of(running).open)
        async with running.admin() as s:
            st, text = await call(s, "GET", "/metrics")
    assert gauge(text, "domum_grants_active") == 0
    assert metric(text, "domum_cutoff_seconds_count", cause="revoke") == 3
    assert 0 < metric(text, "domum_cutoff_seconds_sum", cause="revoke") < 3 * WITHIN
    assert metric(text, "domum_cutoff_seconds_bucket", cause="revoke", le="+Inf") == 3
    assert metric(text, "domum_sessions_active", protocol="tcp") == 0
