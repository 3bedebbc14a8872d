"""Hostile SSH clients against the jump listener, speaking the binary protocol by hand.

The OpenSSH-driven refusals (agent, X11, ``-L`` outside the grant, ``-R``, shells) are
in ``tests/integration/test_jump.py``; these cases need a client no real one would be.
The last tests put hostile targets behind the jump (accept TCP and never finish the SSH
handshake, or never accept at all): the gateway only relays bytes to them, so only its
TCP connect timeout is its own business; the handshake is the client's, end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import asyncssh
import pytest

from ..conftest import Running
from ..integration.helpers import Seed, create_forwarded, seed
from ..integration.test_jump import audit_events, jump_client, seed_ssh
from ..peers.askpass import JumpClient
from ..peers.hostile_ssh import GREETINGS, HostileTarget, registry_empty
from ..peers.sshd import Sshd, sshd_available

pytestmark = pytest.mark.asyncio

MSG_DISCONNECT, MSG_IGNORE, MSG_KEXINIT = 1, 2, 20
_NAME_LISTS = (
    "kex",
    "host_key",
    "enc_cs",
    "enc_sc",
    "mac_cs",
    "mac_sc",
    "comp_cs",
    "comp_sc",
    "lang_cs",
    "lang_sc",
)


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _packet(payload: bytes) -> bytes:
    """An unencrypted binary packet (RFC 4253 section 6), padded to a multiple of 8."""
    pad = 8 - (len(payload) + 5) % 8
    if pad < 4:
        pad += 8
    return struct.pack(">IB", len(payload) + pad + 1, pad) + payload + os.urandom(pad)


def _kexinit(strict: bool = True) -> bytes:
    kex = b"curve25519-sha256" + (b",kex-strict-c-v00@openssh.com" if strict else b"")
    lists = [kex, b"ssh-ed25519", *[b"aes128-gcm@openssh.com"] * 2, *[b"hmac-sha2-256"] * 2]
    lists += [b"none", b"none", b"", b""]
    return bytes([MSG_KEXINIT]) + os.urandom(16) + b"".join(map(_string, lists)) + b"\0" + b"\0" * 4


def _parse_kexinit(payload: bytes) -> dict[str, list[str]]:
    assert payload[0] == MSG_KEXINIT
    pos = 17
    out: dict[str, list[str]] = {}
    for name in _NAME_LISTS:
        (n,) = struct.unpack(">I", payload[pos : pos + 4])
        out[name] = payload[pos + 4 : pos + 4 + n].decode().split(",") if n else []
        pos += 4 + n
    return out


async def _read_packet(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    head = await asyncio.wait_for(reader.readexactly(5), timeout)
    length, pad = struct.unpack(">IB", head)
    assert 5 <= length < 35000
    body = await asyncio.wait_for(reader.readexactly(length - 1), timeout)
    return body[: length - 1 - pad]


async def _connect(run: Running) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", run.gateway.ssh_port())


async def _banner_and_kexinit(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    banner = await asyncio.wait_for(reader.readline(), 5)
    assert banner.startswith(b"SSH-2.0-"), banner
    return banner, await _read_packet(reader)


async def _closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes; fails if it is still open at ``timeout``."""
    got = b""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(4096), left)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"server still open after {timeout}s; got {got[:200]!r}")


async def test_kexinit_advertises_strict_kex_and_no_terrapin_prone_ciphers(running: Running) -> None:
    """Read the server's own KEXINIT bytes: strict KEX is offered, and no ChaCha20-Poly1305
    or CBC cipher (the Terrapin-prone modes) nor any non-EtM MAC appears."""
    reader, writer = await _connect(running)
    try:
        writer.write(b"SSH-2.0-hostile_1.0\r\n")
        writer.write(_packet(_kexinit()))
        banner, payload = await _banner_and_kexinit(reader)
        assert b"DomumGateway" in banner
        lists = _parse_kexinit(payload)
        assert "kex-strict-s-v00@openssh.com" in lists["kex"]
        assert "kex-strict-c-v00@openssh.com" not in lists["kex"]
        for direction in ("enc_cs", "enc_sc"):
            assert lists[direction], lists
            for cipher in lists[direction]:
                assert "chacha20" not in cipher and not cipher.endswith("-cbc"), cipher
                assert cipher.endswith("-gcm@openssh.com") or "-ctr" in cipher, cipher
        for direction in ("mac_cs", "mac_sc"):
            assert all(mac.endswith("-etm@openssh.com") for mac in lists[direction]), lists[direction]
        assert lists["comp_cs"] == lists["comp_sc"] == ["none"]
    finally:
        writer.close()


async def test_packet_injected_before_kexinit_is_a_strict_kex_violation(running: Running) -> None:
    """Terrapin shifts sequence numbers with messages sent before KEXINIT; under strict KEX
    (both sides advertise it) the gateway disconnects on the first such packet."""
    reader, writer = await _connect(running)
    try:
        writer.write(b"SSH-2.0-hostile_1.0\r\n")
        writer.write(_packet(bytes([MSG_IGNORE]) + _string(b"shift the sequence")))
        writer.write(_packet(_kexinit(strict=True)))
        await _banner_and_kexinit(reader)
        rest = await _closed_within(reader, 5)
        assert b"Strict key exchange violation" in rest, rest
    finally:
        writer.close()


async def test_same_exchange_without_injection_stays_open(running: Running) -> None:
    """The control for the case above: without the injected packet the server waits for
    our key exchange message instead of disconnecting."""
    reader, writer = await _connect(running)
    try:
        writer.write(b"SSH-2.0-hostile_1.0\r\n")
        writer.write(_packet(_kexinit(strict=True)))
        await _banner_and_kexinit(reader)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 1.0)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64 + b"\r\n",
        b"SSH-1.5-ancient\r\n",
        b"\xff" * 300 + b"\r\n",
    ],
)
async def test_garbage_instead_of_a_banner_is_dropped(running: Running, garbage: bytes) -> None:
    reader, writer = await _connect(running)
    try:
        writer.write(garbage)
        rest = await _closed_within(reader, 10)
        assert rest.startswith(b"SSH-2.0-") or rest == b"", rest[:100]
    finally:
        writer.close()
    reader, writer = await _connect(running)
    try:
        writer.write(b"SSH-2.0-after_1.0\r\n")
        await _banner_and_kexinit(reader)
    finally:
        writer.close()


async def test_clients_that_stall_in_key_exchange_do_not_block_others(running: Running) -> None:
    """Fifty clients send a banner (or a banner and KEXINIT) and stall; the login grace
    (120 s) drops them eventually, and meanwhile a new client is served at once."""
    assert running.gateway.jump.login_timeout <= 120
    stalled = []
    for i in range(50):
        reader, writer = await _connect(running)
        writer.write(b"SSH-2.0-stall_1.0\r\n")
        if i % 2:
            writer.write(_packet(_kexinit()))
        stalled.append((reader, writer))
    # Half a banner and nothing more: a slowloris at the version line.
    reader, writer = await _connect(running)
    writer.write(b"SSH-2.0-")
    stalled.append((reader, writer))
    try:
        for _ in range(3):
            started = time.monotonic()
            reader, writer = await _connect(running)
            try:
                writer.write(b"SSH-2.0-fresh_1.0\r\n")
                writer.write(_packet(_kexinit()))
                _banner, payload = await _banner_and_kexinit(reader)
                assert "kex-strict-s-v00@openssh.com" in _parse_kexinit(payload)["kex"]
            finally:
                writer.close()
            assert time.monotonic() - started < 2
    finally:
        for _reader, w in stalled:
            w.close()


@pytest.mark.skipif(not sshd_available(), reason="needs root and Debian openssh-server")
async def test_subsystem_request_is_refused(running: Running, tmp_path: Path) -> None:
    """``ssh -s gw sftp``: a subsystem is a session channel like a shell; the gateway runs
    none (shells, commands, agent and X11 are in tests/integration/test_jump.py)."""
    with Sshd.running(tmp_path / "target") as sshd:
        sd = await seed_ssh(running, sshd)
        _rid, link = await create_forwarded(running, sd)
        jc = jump_client(running, sshd, tmp_path / "client", sd.email)
        result = await jc.run(
            "-s", "gw", "sftp", link=link, mailbox=running.mailbox, email=sd.email, timeout=30
        )
    assert result.returncode == 255, result.stderr
    assert "does not run shells or commands" in result.stderr


# hostile targets behind the jump ------------------------------------------------------
class _SignIn(asyncssh.SSHClient):
    """Answers the jump server's prompts: the personal link, then the token from the mail."""

    def __init__(self, run: Running, email: str, link: str) -> None:
        self._run, self._email, self._link = run, email, link
        self._before = 0

    def kbdint_auth_requested(self) -> str:
        return ""

    async def kbdint_challenge_received(
        self, name: str, instructions: str, lang: str, prompts: Sequence[tuple[str, bool]]
    ) -> list[str]:
        if not prompts:
            return []
        if prompts[0][0] == "Personal link: ":
            self._before = len(self._run.mailbox.messages)
            return [self._link]
        await self._run.mailbox.wait_count(self._before + 1)
        return [self._run.mailbox.last_token(self._email)]


async def _seed_target(run: Running, port: int) -> tuple[Seed, str]:
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    sd = await seed(
        run,
        target={"name": "db01", "protocol": "ssh", "host": "127.0.0.1", "port": port, "ssh_host_key": key},
    )
    _rid, link = await create_forwarded(run, sd)
    return sd, link


async def _jump(run: Running, sd: Seed, link: str) -> asyncssh.SSHClientConnection:
    """An SSH connection to the jump listener, signed in as ``sd``'s user."""
    host_key = run.gateway.settings.ssh.host_key
    pinned = asyncssh.read_public_key(host_key.with_name(host_key.name + ".pub"))
    client = _SignIn(run, sd.email, link)
    return await asyncio.wait_for(
        asyncssh.connect(
            "127.0.0.1",
            run.gateway.ssh_port(),
            username=sd.email,
            client_factory=lambda: client,
            known_hosts=([pinned], [], []),
            config=[],
            client_keys=[],
            agent_path=None,
            password_auth=False,
            kbdint_auth=True,
        ),
        15,
    )


@pytest.mark.parametrize("behaviour", list(GREETINGS))
async def test_channel_to_a_stalling_target_opens_at_once_and_relays_it_verbatim(
    running: Running, behaviour: str
) -> None:
    """The gateway waits for nothing from the target after TCP connects: the channel opens
    at once, whatever the target sends (or not) reaches the client unparsed, and when the
    client gives up on it the gateway lets go of the target; the jump connection lives on."""
    greeting = GREETINGS[behaviour]
    async with HostileTarget(greeting) as target:
        sd, link = await _seed_target(running, target.port)
        async with await _jump(running, sd, link) as conn:
            started = time.monotonic()
            reader, writer = await asyncio.wait_for(conn.open_connection("127.0.0.1", target.port), 5)
            assert time.monotonic() - started < 1
            assert await asyncio.wait_for(reader.readexactly(len(greeting)), 5) == greeting
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.3)
            writer.write(b"SSH-2.0-client\r\n")
            deadline = time.monotonic() + 3
            while bytes(target.received) != b"SSH-2.0-client\r\n":
                assert time.monotonic() < deadline, bytes(target.received)
                await asyncio.sleep(0.02)
            assert [c.protocol for c in running.gateway.sessions.connections()] == ["ssh-jump"]
            writer.close()  # the client's ssh gives up on the handshake
            await target.all_closed()
            # The same signed-in connection opens the next channel just as fast.
            _reader, writer = await asyncio.wait_for(conn.open_connection("db01", 22), 5)
            writer.close()
            await target.all_closed()
            assert target.accepted == 2
        await registry_empty(running)
    [opened, _again] = await audit_events(running, "ssh.channel.opened", 2)
    assert opened["details"]["target"] == "db01"


@contextlib.contextmanager
def _blackhole() -> Iterator[int]:
    """A port whose TCP handshake never completes: a listener with a full accept queue
    (backlog 0 and one connection never accepted), so Linux drops further SYNs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), 1):
            yield port


async def test_target_that_never_accepts_tcp_fails_the_channel_within_connect_timeout(
    running: Running,
) -> None:
    running.gateway.jump.connect_timeout = 1.0
    with _blackhole() as port:
        sd, link = await _seed_target(running, port)
        async with await _jump(running, sd, link) as conn:
            started = time.monotonic()
            with pytest.raises(asyncssh.ChannelOpenError) as exc:
                await asyncio.wait_for(conn.open_connection("127.0.0.1", port), 5)
            elapsed = time.monotonic() - started
            assert 0.9 <= elapsed < 2.5, elapsed
            assert exc.value.code == asyncssh.OPEN_CONNECT_FAILED
            assert exc.value.reason == "db01 could not be reached from the gateway"
            assert len(running.gateway.sessions.connections()) == 1  # the jump itself lives on
        await registry_empty(running)
    [event] = await audit_events(running, "ssh.channel.refused", 1)
    assert event["details"]["reason"] == "unreachable" and event["details"]["target"] == "db01"


async def test_client_leaving_during_the_tcp_connect_leaves_no_target_connection(
    running: Running,
) -> None:
    """The client closes its SSH connection while the gateway still dials the target; when
    the dial completes later, the gateway closes it at once instead of holding it open."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        listener.setblocking(False)
        port = int(listener.getsockname()[1])
        filler = socket.create_connection(("127.0.0.1", port), 1)  # the accept queue is full
        sd, link = await _seed_target(running, port)
        conn = await _jump(running, sd, link)
        opening = asyncio.ensure_future(conn.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.3)  # the request reached the gateway, whose SYN was dropped
        conn.close()
        await conn.wait_closed()
        with contextlib.suppress(asyncssh.Error, OSError):
            await opening
        # Make room: the gateway's SYN, sent again after a second, now gets through.
        accepted, _ = listener.accept()
        accepted.close()
        filler.close()
        dialled, _ = await asyncio.wait_for(loop.sock_accept(listener), 3)
        with dialled:
            dialled.setblocking(False)
            assert await asyncio.wait_for(loop.sock_recv(dialled, 1), 2) == b""  # closed at once
    await registry_empty(running)
    assert 'domum_sessions_active{protocol="ssh"} 0.0' in running.gateway.metrics.render().decode()


async def test_openssh_through_the_jump_bounds_a_silent_target_itself(
    running: Running, tmp_path: Path
) -> None:
    """The real client over ``-J``: its own ConnectTimeout covers the target's banner,
    end to end through the channel, and its exit ends the gateway's side too."""
    async with HostileTarget(b"") as target:
        sd, link = await _seed_target(running, target.port)
        host_key = running.gateway.settings.ssh.host_key
        key_pub = host_key.with_name(host_key.name + ".pub").read_text()
        jc = JumpClient(tmp_path / "client", running.gateway.ssh_port(), key_pub, sd.email)
        started = time.monotonic()
        result = await jc.run(
            "-o",
            "ConnectTimeout=2",
            "-o",
            "BatchMode=yes",
            "-J",
            "gw",
            "-p",
            str(target.port),
            "root@127.0.0.1",
            "true",
            link=link,
            mailbox=running.mailbox,
            email=sd.email,
            timeout=10,
        )
        assert time.monotonic() - started < 8
        assert result.returncode == 255, result.stderr
        assert "timed out during banner exchange" in result.stderr, result.stderr
        await target.all_closed()
    await registry_empty(running)
