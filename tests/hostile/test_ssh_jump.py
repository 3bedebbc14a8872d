"""Hostile SSH clients against the jump listener, speaking the binary protocol by hand.

The OpenSSH-driven refusals (agent, X11, ``-L`` outside the grant, ``-R``, shells) are
in ``tests/integration/test_jump.py``; these cases need a client no real one would be.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path

import pytest

from ..conftest import Running
from ..integration.helpers import create_forwarded
from ..integration.test_jump import jump_client, seed_ssh
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
