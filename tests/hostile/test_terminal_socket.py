"""Hostile websocket clients on the browser terminal ``/ws/ssh/{target}``, framed by hand.

Missing cookie, a foreign Origin, ``Origin: null`` and revoke during a live SSH session
are in ``tests/integration/test_ssh_terminal.py``; here the cases a browser would never
send. The target points at a closed port: everything below happens at the ``login as:``
prompt, before the gateway dials the target. The last tests dial hostile targets instead
(:class:`HostileTarget`): hosts that accept TCP and never finish the SSH handshake.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from ..conftest import Running
from ..integration.helpers import call, create_forwarded, login_direct, seed
from ..integration.test_ssh_terminal import PASSWORD, USER
from ..peers.hostile_ssh import GREETINGS, HostileTarget, registry_empty
from ..peers.public_client import gateway_with
from ..peers.smtp import Mailbox
from ..peers.sshd import Sshd, ensure_user, sshd_available
from .raw import open_raw

pytestmark = pytest.mark.asyncio

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING = 0x0, 0x1, 0x2, 0x8, 0x9


def _frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", first, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack(">BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack(">BBQ", first, 0x80 | 127, n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask_fast(payload, mask)
    return head + mask + masked


def _mask_fast(payload: bytes, mask: bytes) -> bytes:
    key = int.from_bytes(mask * ((len(payload) + 3) // 4), "big") >> (8 * (-len(payload) % 4))
    return (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")


class RawSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.seen = b""

    async def frame(self, timeout: float = 5) -> tuple[int, bytes]:
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack(">H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", await self.reader.readexactly(8))
        return b0 & 0x0F, await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def until(self, needle: bytes, timeout: float = 5) -> None:
        while needle not in self.seen:
            opcode, data = await self.frame(timeout)
            assert opcode != OP_CLOSE, (self.seen, data)
            self.seen += data

    async def close_code(self, timeout: float = 5) -> tuple[int, str]:
        """Read until the server's close frame; return its code and reason."""
        while True:
            opcode, data = await self.frame(timeout)
            if opcode == OP_CLOSE:
                (code,) = struct.unpack(">H", data[:2])
                return code, data[2:].decode()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


async def _handshake(run: Running, cookie: str | None, origin: bytes | None) -> tuple[bytes, RawSocket]:
    reader, writer = await open_raw(run.public_url, run.ssl)
    host = run.public_url.split("//", 1)[1].encode()
    key = base64.b64encode(os.urandom(16))
    head = [
        b"GET /ws/ssh/db01 HTTP/1.1",
        b"Host: " + host,
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key,
        b"Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        head.append(b"Origin: " + origin)
    if cookie:
        head.append(b"Cookie: __Host-domum=" + cookie.encode())
    writer.write(b"\r\n".join(head) + b"\r\n\r\n")
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return response, RawSocket(reader, writer)


@pytest.fixture
async def cookie(running: Running) -> tuple[str, str]:
    """A signed-in session granted the SSH target ``db01``; returns (cookie, request id)."""
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    sd = await seed(
        running,
        target={"name": "db01", "protocol": "ssh", "host": "127.0.0.1", "port": 9, "ssh_host_key": key},
    )
    rid, link = await create_forwarded(running, sd)
    return await login_direct(running, sd, link), rid


async def _open(run: Running, cookie: str) -> RawSocket:
    response, sock = await _handshake(run, cookie, run.public_url.encode())
    assert response.startswith(b"HTTP/1.1 101"), response
    await sock.until(b"login as: ")
    return sock


@pytest.mark.parametrize(
    "origin",
    [
        b"https://localhost:8443.evil.example",
        b"https://evil.example#@localhost:8443",
        b"https://localhost:8443@evil.example",
        b"http://localhost:8443",
        b"https://LOCALHOST:8443/../evil",
        b"https://localhost:8443\x00.evil.example",
        b"null",
        b"*",
    ],
)
async def test_lookalike_origins_are_refused_before_upgrade(
    running: Running, cookie: tuple[str, str], origin: bytes
) -> None:
    response, sock = await _handshake(running, cookie[0], origin)
    sock.close()
    assert response.split(b" ")[1] in (b"400", b"403"), response


async def test_oversized_frame_is_closed_with_1009(running: Running, cookie: tuple[str, str]) -> None:
    sock = await _open(running, cookie[0])
    try:
        # Only the head and the first KiB: the frame is refused on its declared length,
        # before the gateway reads (or buffers) its payload.
        frame = _frame(OP_BINARY, os.urandom(2 * 1024 * 1024))
        await sock.send(frame[:1024])
        code, _reason = await sock.close_code()
        assert code == 1009
    finally:
        sock.close()
    (await _open(running, cookie[0])).close()  # the session and the listener are unharmed


async def test_fragment_flood_is_closed_with_1009(running: Running, cookie: tuple[str, str]) -> None:
    """Thousands of small continuation frames that never end: the reassembled message is
    bounded by the same 1 MiB limit, so the socket is closed rather than buffering forever."""
    sock = await _open(running, cookie[0])
    try:
        closing = asyncio.ensure_future(sock.close_code(10))
        piece = os.urandom(1024)
        await sock.send(_frame(OP_BINARY, piece, fin=False))
        sent = 1
        with contextlib.suppress(ConnectionError):
            while sent < 4096 and not closing.done():  # 4 MiB if nothing stopped it
                await sock.send(b"".join(_frame(OP_CONT, piece, fin=False) for _ in range(32)))
                sent += 32
                await asyncio.sleep(0)
        code, _reason = await closing
        assert code == 1009
        assert sent < 4096
    finally:
        sock.close()


async def test_reserved_opcode_is_a_protocol_error(running: Running, cookie: tuple[str, str]) -> None:
    sock = await _open(running, cookie[0])
    try:
        await sock.send(_frame(0x3, b"x"))
        code, _reason = await sock.close_code()
        assert code == 1002
    finally:
        sock.close()


async def test_ping_flood_is_answered_and_the_terminal_still_works(
    running: Running, cookie: tuple[str, str]
) -> None:
    sock = await _open(running, cookie[0])
    try:
        await sock.send(b"".join(_frame(OP_PING, b"p" * 125) for _ in range(2000)))
        await sock.send(_frame(OP_BINARY, b"zz"))
        await sock.until(b"zz", timeout=10)  # the login prompt echoes what is typed
    finally:
        sock.close()


@pytest.mark.xfail(
    strict=True,
    reason="aiohttp's server does not enforce client masking: RFC 6455 section 5.1 says it MUST "
    "close on an unmasked client frame; the terminal echoes it instead (low impact: masking "
    "protects intermediaries from browser-crafted bytes, not the gateway)",
)
async def test_unmasked_client_frame_is_a_protocol_error(running: Running, cookie: tuple[str, str]) -> None:
    sock = await _open(running, cookie[0])
    try:
        await sock.send(struct.pack(">BB", 0x80 | OP_BINARY, 1) + b"x")
        code, _reason = await sock.close_code(3)
        assert code == 1002
    finally:
        sock.close()


async def test_frames_after_revoke_reach_nothing(running: Running, cookie: tuple[str, str]) -> None:
    value, rid = cookie
    sock = await _open(running, value)
    try:
        async with running.admin() as s:
            st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
            assert st == 200
        code, reason = await sock.close_code()
        assert code == 1008 and reason == "access revoked"
        # The client keeps typing: nothing comes back but the end of the connection.
        try:
            for _ in range(20):
                await sock.send(_frame(OP_BINARY, b"root\r"))
                await sock.send(_frame(OP_TEXT, b'{"type": "resize", "cols": 80, "rows": 24}'))
            await sock.send(_frame(OP_CLOSE, struct.pack(">H", 1000)))
        except ConnectionError:
            pass
        rest = await asyncio.wait_for(sock.reader.read(), 5)  # the server ends the TCP connection
        assert b"root" not in rest and b"login as" not in rest and b"assword" not in rest
    finally:
        sock.close()
    response, again = await _handshake(running, value, running.public_url.encode())
    try:
        assert response.startswith(b"HTTP/1.1 101")
        await again.until(b"sign in")
        code, _reason = await again.close_code()
        assert code == 1008
    finally:
        again.close()


# hostile targets ---------------------------------------------------------------------
HANDSHAKE = 1.0  # ssh.handshake_timeout of the gateway below (the default is 15 s)


@pytest.fixture
async def quick(tmp_path: Path, mailbox: tuple[Mailbox, int]) -> AsyncIterator[Running]:
    """A gateway whose browser terminal gives SSH targets ``HANDSHAKE`` seconds to handshake."""
    async with gateway_with(tmp_path, mailbox, ssh={"handshake_timeout": HANDSHAKE}) as run:
        yield run


async def _grant(run: Running, port: int) -> tuple[str, str]:
    """Sign in with a grant for target ``db01`` at 127.0.0.1:``port``; (target id, cookie)."""
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    sd = await seed(
        run,
        target={"name": "db01", "protocol": "ssh", "host": "127.0.0.1", "port": port, "ssh_host_key": key},
    )
    _rid, link = await create_forwarded(run, sd)
    return sd.target_id, await login_direct(run, sd, link)


@pytest.mark.parametrize("behaviour", list(GREETINGS))
async def test_target_that_never_finishes_the_handshake_is_given_up_on(
    quick: Running, behaviour: str
) -> None:
    """Silent, banner then nothing, banner then garbage, banner then half a packet: within
    ``ssh.handshake_timeout`` of dialling (not the 3 minutes a person has to type a
    password) the terminal says so, closes with 1008, audits it and lets go of the target."""
    async with HostileTarget(GREETINGS[behaviour]) as target:
        _tid, cookie = await _grant(quick, target.port)
        sock = await _open(quick, cookie)
        try:
            await sock.send(_frame(OP_BINARY, b"root\r"))
            started = time.monotonic()
            await sock.until(b"did not complete the SSH handshake", timeout=HANDSHAKE + 3)
            code, reason = await sock.close_code(HANDSHAKE + 3)
            elapsed = time.monotonic() - started
            await sock.send(_frame(OP_CLOSE, struct.pack(">H", 1000)))
        finally:
            sock.close()
        assert target.accepted == 1
        assert target.received.startswith(b"SSH-2.0-")  # the gateway did dial it as SSH
        assert elapsed < HANDSHAKE + 1.5, elapsed
        if behaviour != "banner_and_garbage":  # garbage may be refused sooner, on sight
            assert elapsed >= HANDSHAKE - 0.1, elapsed
        assert code == 1008, (code, reason)
        assert reason.startswith("db01 did not complete the SSH handshake"), reason
        text = sock.seen.decode(errors="replace")
        for leak in ("Traceback", "asyncssh", "Error", "\ufffd", "\xde"):
            assert leak not in text, text  # no stack trace, exception name or target bytes
        await target.all_closed()
    await registry_empty(quick)
    async with quick.admin() as s:
        st, page = await call(s, "GET", "/api/v1/audit?type=ssh.terminal.refused&limit=10")
    assert st == 200, page
    [event] = page["items"]
    assert event["details"]["target"] == "db01"
    if behaviour == "banner_and_garbage":
        assert event["outcome"] in ("handshake_timeout", "handshake_failed"), event
    else:
        assert event["outcome"] == "handshake_timeout", event
        assert event["details"]["timeout"] == f"{HANDSHAKE:g}"
        assert "within 1 s." in text


@pytest.mark.skipif(not sshd_available(), reason="needs root and Debian openssh-server")
async def test_real_sshd_after_a_hostile_one_and_a_slow_typist(quick: Running, tmp_path: Path) -> None:
    """The handshake limit ends when the target asks for credentials: a person who takes
    longer than it to type the password still signs in, on the same gateway and session
    right after a silent target was given up on."""
    async with HostileTarget(b"") as target:
        tid, cookie = await _grant(quick, target.port)
        sock = await _open(quick, cookie)
        try:
            await sock.send(_frame(OP_BINARY, b"root\r"))
            await sock.until(b"did not complete the SSH handshake", timeout=HANDSHAKE + 3)
            await sock.close_code()
        finally:
            sock.close()
        await target.all_closed()
    await registry_empty(quick)
    ensure_user(USER, PASSWORD)
    with Sshd.running(tmp_path / "pam", password=True) as sshd:
        async with quick.admin() as s:
            body = {"port": sshd.port, "ssh_host_key": sshd.host_key_line}
            st, t = await call(s, "PATCH", f"/api/v1/targets/{tid}", body)
            assert st == 200, t
        sock = await _open(quick, cookie)
        try:
            await sock.send(_frame(OP_BINARY, f"{USER}\r".encode()))
            await sock.until(b"assword: ", timeout=10)
            await asyncio.sleep(HANDSHAKE * 1.5)  # a slow typist
            await sock.send(_frame(OP_BINARY, f"{PASSWORD}\r".encode()))
            await sock.send(_frame(OP_BINARY, b"echo $((6*7))\r"))
            await sock.until(b"42", timeout=10)
            assert len(quick.gateway.sessions.connections()) == 1
        finally:
            sock.close()
    await registry_empty(quick)
