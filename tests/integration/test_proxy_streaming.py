"""Bodies stream both ways with bounded memory; slow, stalled and absent targets fail cleanly.

Large transfers are checked by size and hash against a real aiohttp target and by the
gateway process's RSS (it runs in this test process, so the test's own buffers are kept
small: generated on the fly, hashed and dropped). Server-sent events must arrive as the
target sends them, not when the stream ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ..peers.smtp import Mailbox
from ..peers.upstreams import (
    ProxyEnv,
    Upstream,
    gateway_with,
    grant_targets,
    raw_exchange,
    start_upstream,
    status_of,
)

pytestmark = pytest.mark.asyncio

MiB = 1024 * 1024


@dataclass
class Env:
    run: Any
    up: Upstream
    user: ProxyEnv

    def client(self, **kw: Any) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            base_url=self.run.public_url,
            headers=self.user.headers(),
            connector=aiohttp.TCPConnector(ssl=self.run.ssl),
            **kw,
        )


@pytest.fixture
async def env(tmp_path: Path, mailbox: tuple[Mailbox, int]) -> AsyncIterator[Env]:
    async with (
        gateway_with(tmp_path, mailbox, proxy={"read_timeout": 1.0, "connect_timeout": 1.0}) as run,
        start_upstream() as up,
    ):
        user = await grant_targets(run, {"up": up.url + "/", "dead": "http://127.0.0.1:9/"})
        yield Env(run, up, user)


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _upload(env: Env, size: int, chunked: bool) -> dict[str, Any]:
    block = os.urandom(256 * 1024)
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            digest.update(piece)
            sent += len(piece)
            yield piece

    headers = {} if chunked else {"Content-Length": str(size)}
    async with env.client() as c:
        r = await c.post("/t/up/upload?hash=1", data=body(), headers=headers)
        assert r.status == 200
        result: dict[str, Any] = await r.json()
    assert result["received"] == size
    assert result["sha256"] == digest.hexdigest()
    return result


async def _download(env: Env, size: int, chunked: bool) -> None:
    expected = hashlib.sha256()
    block = bytes(range(256)) * 256
    got = hashlib.sha256()
    total = 0
    async with env.client(timeout=aiohttp.ClientTimeout(total=120)) as c:
        r = await c.get("/t/up/download", params={"n": str(size), "chunked": "1" if chunked else "0"})
        assert r.status == 200
        async for chunk in r.content.iter_chunked(256 * 1024):
            got.update(chunk)
            total += len(chunk)
    sent = 0
    while sent < size:
        piece = block[: min(len(block), size - sent)]
        expected.update(piece)
        sent += len(piece)
    assert total == size
    assert got.hexdigest() == expected.hexdigest()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_upload_and_download_64_mib(env: Env, chunked: bool) -> None:
    await _upload(env, 64 * MiB, chunked)
    await _download(env, 64 * MiB, chunked)


@pytest.mark.slow
async def test_one_gib_each_way_with_flat_memory(env: Env) -> None:
    """1 GiB up and 1 GiB down through the gateway; its RSS grows by less than 64 MiB."""
    await _upload(env, 8 * MiB, False)  # warm pools and buffers first
    await _download(env, 8 * MiB, False)
    before = _rss_kib()
    started = time.monotonic()
    await _upload(env, 1024 * MiB, False)
    await _download(env, 1024 * MiB, True)
    grown = (_rss_kib() - before) / 1024
    assert grown < 64, f"RSS grew by {grown:.1f} MiB"
    assert time.monotonic() - started < 60


async def test_server_sent_events_arrive_as_sent(env: Env) -> None:
    arrivals: list[float] = []
    async with env.client() as c:
        start = time.monotonic()
        r = await c.get("/t/up/sse", params={"count": "3", "interval": "0.4"})
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            if line.startswith(b"data:"):
                arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 3
    # Each event is delivered when sent (0.4 s apart), not held back until the stream ends.
    assert arrivals[1] - arrivals[0] > 0.25
    assert arrivals[2] - arrivals[1] > 0.25


async def test_slow_target_gets_504_naming_it(env: Env) -> None:
    async with env.client() as c:
        r = await c.get("/t/up/slow", params={"delay": "3"}, headers={"Accept": "text/html"})
        text = await r.text()
    assert r.status == 504
    assert "up did not answer in time" in text
    assert "127.0.0.1" not in text


async def test_unreachable_target_gets_502_without_details(env: Env) -> None:
    async with env.client() as c:
        r = await c.get("/t/dead/", headers={"Accept": "text/html"})
        text = await r.text()
    assert r.status == 502
    assert "dead could not be reached" in text
    for leak in ("127.0.0.1", ":9", "Connection", "refused", "Traceback"):
        assert leak not in text


async def test_stall_mid_body_breaks_the_response(env: Env) -> None:
    """Headers went out; the target then stalls: the client sees a broken body, not a hang."""
    async with env.client() as c:
        r = await c.get("/t/up/stall")
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(r.read(), 10)


async def test_read_timeout_does_not_cut_a_slow_reader(env: Env) -> None:
    """A client that reads slowly pauses the target; that is not the target timing out."""
    async with env.client(read_bufsize=64 * 1024) as c:
        r = await c.get("/t/up/download", params={"n": str(8 * MiB)})
        total = 0
        async for chunk in r.content.iter_chunked(1024 * 1024):
            total += len(chunk)
            if total < 2 * MiB:
                await asyncio.sleep(1.5)  # longer than the gateway's read timeout (1 s)
        assert total == 8 * MiB


async def test_expect_100_continue(env: Env) -> None:
    data = b"e" * 5000
    out = await raw_exchange(
        env.user,
        b"POST /t/up/echo HTTP/1.1\r\nHost: g\r\nCookie: __Host-domum="
        + env.user.cookie.encode()
        + b"\r\nExpect: 100-continue\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n"
        + data,
    )
    assert b"HTTP/1.1 100 Continue" in out or status_of(out) == 200
    assert b'"body_len": 5000' in out
