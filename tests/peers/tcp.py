"""Plain TCP peers on loopback: an echo server that honours half-close, and a port
where nothing listens."""

from __future__ import annotations

import asyncio
import socket
from typing import cast

__all__ = ["EchoServer", "closed_port"]


class _Echo(asyncio.Protocol):
    """Echoes every byte; answers the client's FIN with its own once all is written."""

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections += 1
        self.server.live.add(self)
        if self.server.greeting:
            self.transport.write(self.server.greeting)  # speaks first, like sshd

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.server.received += len(data)
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > 4 * 1024 * 1024:
            self.transport.pause_reading()  # the client is not reading: slow it down

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.server.half_closed += 1
        self.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.live.discard(self)


class EchoServer:
    """``async with EchoServer() as echo: echo.port``; ``greeting`` is sent on connect."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.port = 0
        self.connections = 0
        self.half_closed = 0
        self.received = 0
        self.live: set[_Echo] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> EchoServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Echo(self), "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in list(self.live):
            if conn.transport is not None:
                conn.transport.abort()
        await self._server.wait_closed()


def closed_port() -> int:
    """A loopback port nobody listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
