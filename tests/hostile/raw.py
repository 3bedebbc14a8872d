"""Raw bytes over TLS to a gateway listener: what a hostile client sends, unnormalised."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from urllib.parse import urlsplit

__all__ = ["exchange", "open_raw", "rss_kib", "status_of"]


async def open_raw(url: str, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS connection to the listener behind ``url`` (``https://host:port``)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port, ssl=ctx, limit=1 << 20)


async def exchange(url: str, ctx: ssl.SSLContext, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` then read until the server closes or ``timeout`` passes; return what came."""
    reader, writer = await open_raw(url, ctx)
    got = b""
    try:
        writer.write(data)
        await writer.drain()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except (TimeoutError, ConnectionError, ssl.SSLError):
                break
            if not chunk:
                break
            got += chunk
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass
    return got


def status_of(response: bytes) -> int | None:
    """The status code of the first response in ``response``, or None if nothing came."""
    if not response:
        return None
    line = response.split(b"\r\n", 1)[0].split(b" ")
    assert line[0].startswith(b"HTTP/1."), response[:200]
    return int(line[1])


def rss_kib() -> int:
    """This process's resident set size (the gateway runs in-process), from /proc."""
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")
