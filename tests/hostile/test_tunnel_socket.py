"""Hostile websocket clients on the TCP tunnel ``/ws/tcp/{target}``, framed by hand.

The tunnel has its own RFC 6455 parser (``proxy/tunnel_wire.py``), so every case the
browser terminal's hostile suite covers is repeated here against a real TCP echo target:
credentials and Origin checked before the upgrade, frames refused on their declared
length, fragment and ping floods bounded, masking and opcodes enforced, and nothing
reaching the target once the grant is revoked. ``echo.received`` counts the bytes the
target got, so a test can prove a refused frame never reached it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
import time
from collections.abc import AsyncIterator

import pytest

from ..conftest import Running
from ..integration.helpers import call, create_forwarded, login_direct, seed
from ..peers.tcp import EchoServer
from .raw import open_raw, rss_kib
from .test_terminal_socket import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, RawSocket, _frame

pytestmark = pytest.mark.asyncio


class Env:
    def __init__(self, run: Running, echo: EchoServer, cookie: str, request_id: str) -> None:
        self.run, self.echo, self.cookie, self.request_id = run, echo, cookie, request_id

    @property
    def origin(self) -> bytes:
        return self.run.public_url.encode()


@pytest.fixture
async def env(running: Running) -> AsyncIterator[Env]:
    async with EchoServer() as echo:
        sd = await seed(
            running, target={"name": "echo", "protocol": "tcp", "host": "127.0.0.1", "port": echo.port}
        )
        rid, link = await create_forwarded(running, sd)
        cookie = await login_direct(running, sd, link)
        yield Env(running, echo, cookie, rid)


async def _handshake(
    run: Running, cookie: str | None, origin: bytes | None, *, extra: list[bytes] | None = None
) -> tuple[bytes, RawSocket]:
    reader, writer = await open_raw(run.public_url, run.ssl)
    host = run.public_url.split("//", 1)[1].encode()
    head = [
        b"GET /ws/tcp/echo HTTP/1.1",
        b"Host: " + host,
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)),
        b"Sec-WebSocket-Version: 13",
        *(extra or []),
    ]
    if origin is not None:
        head.append(b"Origin: " + origin)
    if cookie:
        head.append(b"Cookie: __Host-domum=" + cookie.encode())
    writer.write(b"\r\n".join(head) + b"\r\n\r\n")
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return response, RawSocket(reader, writer)


async def _open(env: Env) -> RawSocket:
    response, sock = await _handshake(env.run, env.cookie, env.origin)
    assert response.startswith(b"HTTP/1.1 101"), response
    await _echo(sock, b"hello")
    return sock


async def _echo(sock: RawSocket, data: bytes, timeout: float = 5) -> None:
    got = b""
    await sock.send(_frame(OP_BINARY, data))
    while len(got) < len(data):
        opcode, payload = await sock.frame(timeout)
        assert opcode == OP_BINARY, (opcode, payload)
        got += payload
    assert got == data


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("with_cookie", "origin", "status"),
    [
        pytest.param(False, None, 403, id="nothing"),
        pytest.param(False, b"OWN", 401, id="own-origin-no-cookie"),
        pytest.param(True, None, 403, id="cookie-without-origin"),
        pytest.param(True, b"null", 403, id="origin-null"),
        pytest.param(True, b"https://evil.example", 403, id="foreign-origin"),
        pytest.param(True, b"https://localhost:8443.evil.example", 403, id="suffix-lookalike"),
        pytest.param(True, b"https://localhost:8443@evil.example", 403, id="userinfo-lookalike"),
        pytest.param(True, b"http://localhost:8443", 403, id="plain-http"),
        pytest.param(True, b"https://evil.example#@localhost:8443", 403, id="fragment-lookalike"),
        pytest.param(True, b"*", 403, id="star"),
    ],
)
async def test_cookie_and_origin_are_checked_before_the_upgrade(
    env: Env, with_cookie: bool, origin: bytes | None, status: int
) -> None:
    response, sock = await _handshake(
        env.run, env.cookie if with_cookie else None, env.origin if origin == b"OWN" else origin
    )
    sock.close()
    assert _status(response) == status, response
    assert b"Upgrade: websocket" not in response
    assert env.echo.connections == 0


async def test_a_ticket_does_not_excuse_a_foreign_origin(env: Env) -> None:
    """A bearer ticket is for the ``connect`` client; a web page naming another origin
    cannot use one either (and a cookie does not turn into a ticket)."""
    for auth in (b"Bearer " + env.cookie.encode(), b"Basic " + base64.b64encode(b"a:b"), b"Bearer "):
        response, sock = await _handshake(env.run, None, None, extra=[b"Authorization: " + auth])
        sock.close()
        assert _status(response) == 401, response
    response, sock = await _handshake(
        env.run, None, b"https://evil.example", extra=[b"Authorization: Bearer " + env.cookie.encode()]
    )
    sock.close()
    assert _status(response) == 403, response
    assert env.echo.connections == 0


async def test_oversized_frame_is_refused_on_its_declared_length(env: Env) -> None:
    """Only the head of a 2 MiB frame is sent: 1009 comes back at once and not one byte of
    it reaches the target."""
    sock = await _open(env)
    before = env.echo.received
    try:
        frame = _frame(OP_BINARY, os.urandom(2 * 1024 * 1024))
        await sock.send(frame[:4096])
        code, _reason = await sock.close_code()
        assert code == 1009
    finally:
        sock.close()
    await asyncio.sleep(0.2)
    assert env.echo.received == before
    (await _open(env)).close()  # the session and the listener are unharmed


async def test_frame_claiming_an_exabyte_is_refused(env: Env) -> None:
    sock = await _open(env)
    try:
        head = struct.pack(">BBQ", 0x80 | OP_BINARY, 0x80 | 127, 1 << 62) + os.urandom(4)
        await sock.send(head + b"x" * 100)
        code, _reason = await sock.close_code()
        assert code == 1009
        # The gateway hangs up within its close wait even though the frame "continues".
        assert await asyncio.wait_for(sock.reader.read(), 5) == b""
    finally:
        sock.close()


async def test_fragment_flood_streams_through_and_buffers_nothing(running: Running, env: Env) -> None:
    """A tunnel message never ends (FIN never set): the tunnel is a byte stream, so each
    fragment goes on to the target as it arrives instead of being reassembled. 16 MiB in
    16,384 fragments come back from the echo target while the message is still open,
    and the gateway's memory does not grow by the message's size."""
    sock = await _open(env)
    rss_before = rss_kib()
    try:
        piece = os.urandom(1024)
        await sock.send(_frame(OP_BINARY, piece, fin=False))
        total, back = 1024, 0

        async def read_back() -> None:
            nonlocal back
            while back < 16 * 1024 * 1024:
                opcode, payload = await sock.frame(10)
                assert opcode == OP_BINARY, (opcode, payload)
                back += len(payload)

        reading = asyncio.ensure_future(read_back())
        try:
            batch = b"".join(_frame(OP_CONT, piece, fin=False) for _ in range(64))
            while total < 16 * 1024 * 1024:
                await asyncio.wait_for(sock.send(batch), 10)
                total += len(batch) // (len(piece) + 6) * len(piece)
            await asyncio.wait_for(reading, 20)
        finally:
            reading.cancel()
        assert back == total
        assert rss_kib() - rss_before < 12 * 1024
        # Ten thousand empty fragments, then the end of the message: still a working tunnel.
        await sock.send(b"".join(_frame(OP_CONT, b"", fin=False) for _ in range(10000)))
        await sock.send(_frame(OP_CONT, b"!", fin=True))
        opcode, payload = await sock.frame()
        assert (opcode, payload) == (OP_BINARY, b"!")
        await _echo(sock, b"after the flood")
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        pytest.param(struct.pack(">BB", 0x80 | OP_BINARY, 1) + b"x", 1002, id="unmasked"),
        pytest.param(_frame(0x3, b"x"), 1002, id="reserved-opcode"),
        pytest.param(_frame(0xB, b"x"), 1002, id="reserved-control-opcode"),
        pytest.param(bytes([0xC2]) + _frame(OP_BINARY, b"x")[1:], 1002, id="rsv1-without-extension"),
        pytest.param(_frame(OP_PING, b"p", fin=False), 1002, id="fragmented-ping"),
        pytest.param(_frame(OP_PING, b"p" * 126), 1002, id="long-ping"),
        pytest.param(_frame(OP_CONT, b"x"), 1002, id="continuation-without-start"),
        pytest.param(_frame(OP_BINARY, b"x", fin=False) + _frame(OP_BINARY, b"y"), 1002, id="nested-message"),
        pytest.param(_frame(OP_TEXT, b"hi"), 1003, id="text"),
    ],
)
async def test_protocol_violations_close_with_their_code(env: Env, frame: bytes, code: int) -> None:
    sock = await _open(env)
    before = env.echo.received
    try:
        await sock.send(frame)
        got, _reason = await sock.close_code()
        assert got == code
    finally:
        sock.close()
    await asyncio.sleep(0.1)
    assert env.echo.received - before <= 1  # at most the first fragment of a nested message


async def test_ping_flood_from_a_client_that_never_reads_is_bounded(running: Running, env: Env) -> None:
    """48 MiB of pings, the pongs never read: the gateway answers only while the client
    reads its answers (RFC 6455 section 5.5.3 lets it skip pongs for older pings), so its
    memory stays bounded instead of queueing a pong for every ping."""
    sock = await _open(env)
    rss_before = rss_kib()
    sent = 0
    try:
        batch = b"".join(_frame(OP_PING, os.urandom(125)) for _ in range(2048))
        with contextlib.suppress(TimeoutError, ConnectionError):
            while sent < 48 * 1024 * 1024:
                await asyncio.wait_for(sock.send(batch), 10)
                sent += len(batch)
        assert sent >= 48 * 1024 * 1024, "the gateway stopped reading pings"
        grown = rss_kib() - rss_before
        assert grown < 24 * 1024, f"gateway grew {grown} KiB for {sent} bytes of unread pongs"
        # The client now reads: pongs, then the tunnel still echoes.
        got = b""
        await sock.send(_frame(OP_BINARY, b"still here"))
        deadline = time.monotonic() + 20
        while b"still here" not in got and time.monotonic() < deadline:
            opcode, payload = await sock.frame(10)
            if opcode == OP_BINARY:
                got += payload
        assert got == b"still here"
    finally:
        sock.close()


async def test_frames_after_revoke_reach_nothing(env: Env) -> None:
    sock = await _open(env)
    try:
        async with env.run.admin() as s:
            st, _ = await call(s, "POST", f"/api/v1/access-requests/{env.request_id}/revoke")
            assert st == 200
        code, reason = await sock.close_code()
        assert code == 1008 and "revoked" in reason
        before = env.echo.received
        with contextlib.suppress(ConnectionError):
            for _ in range(50):
                await sock.send(_frame(OP_BINARY, b"after revoke"))
            await sock.send(_frame(OP_CLOSE, struct.pack(">H", 1000)))
        rest = await asyncio.wait_for(sock.reader.read(), 5)  # the gateway ends the connection
        assert b"after revoke" not in rest
        await asyncio.sleep(0.2)
        assert env.echo.received == before
    finally:
        sock.close()
    response, again = await _handshake(env.run, env.cookie, env.origin)
    again.close()
    assert _status(response) == 401, response
