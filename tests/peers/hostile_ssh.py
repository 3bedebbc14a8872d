"""Hostile SSH "targets" for the SSH paths' tests: TCP servers that greet like an SSH
server (or not) and then never finish the handshake; and the wait for the gateway's live
registry to empty after them."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from types import TracebackType
from typing import Any

__all__ = ["GREETINGS", "HostileTarget", "registry_empty"]

GREETINGS = {
    "silent": b"",
    "banner_only": b"SSH-2.0-x\r\n",
    "banner_and_garbage": b"SSH-2.0-x\r\n" + b"\xde\xad\xbe\xef" * 64,
    # A packet header promising 1 KiB, then 100 bytes of it: a stall inside the first packet.
    "banner_and_half_a_packet": b"SSH-2.0-x\r\n" + struct.pack(">IB", 1020, 8) + bytes(95),
}


class HostileTarget:
    """A TCP "SSH target" on 127.0.0.1: greets each connection with ``greeting``, then
    reads whatever comes and never answers, until the peer closes."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting
        self.accepted = 0
        self.received = bytearray()
        self.port = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> HostileTarget:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._open):
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2)
        await self._server.wait_closed()

    @property
    def open(self) -> int:
        """Connections the gateway still holds to this target."""
        return len(self._open)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.accepted += 1
        self._open.add(writer)
        try:
            writer.write(self.greeting)
            await writer.drain()
            while data := await reader.read(65536):
                self.received += data
        except ConnectionError:
            pass
        finally:
            self._open.discard(writer)
            writer.close()
            self._handlers.discard(task)
            self._changed.set()

    async def all_closed(self, timeout: float = 3.0) -> None:
        """Wait until every connection to this target was closed by the gateway."""
        deadline = time.monotonic() + timeout
        while self._open:
            self._changed.clear()
            left = deadline - time.monotonic()
            assert left > 0, f"the gateway still holds {len(self._open)} connection(s) to the target"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


async def registry_empty(run: Any, timeout: float = 3.0) -> None:
    """Wait (bounded) until the gateway of ``run`` holds no live connection."""
    deadline = time.monotonic() + timeout
    while run.gateway.sessions.connections():
        assert time.monotonic() < deadline, run.gateway.sessions.connections()
        await asyncio.sleep(0.02)
