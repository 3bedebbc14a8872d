"""The tunnel on uvloop, as ``domum-gateway serve`` and ``connect`` run it.

uvloop differs where it matters here: its TLS layer hands decrypted bytes to buffered
protocols directly, and it starts reading a new connection right after
``connection_made`` even when the protocol paused it (so the first bytes of a target
that speaks first arrive before the websocket side exists).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import uvloop

from domum_gateway.app import Gateway
from domum_gateway.model import Role
from domum_gateway.pki import client_ssl_context

from ..conftest import Running, _token, make_settings
from ..peers.smtp import Mailbox
from ..peers.tcp import EchoServer
from .helpers import create_forwarded
from .test_tunnel import MiB, connected, pump, service_of, tcp_seed


def test_uvloop_target_speaking_first_and_bulk_both_ways(
    tmp_path: Path, mailbox: tuple[Mailbox, int]
) -> None:
    box, port = mailbox

    async def on_uvloop() -> None:
        assert "uvloop" in type(asyncio.get_running_loop()).__module__
        gw = Gateway(make_settings(tmp_path, smtp_port=port), grace=1.0)
        await gw.start()
        try:
            admin = await _token(gw, "admin", Role.ADMIN)
            ssl = client_ssl_context(gw.settings.tls.ca)
            run = Running(gw, gw.url("admin"), gw.url("public"), admin, "", ssl, box)
            await _speaking_first_and_bulk(run)
        finally:
            await gw.stop()

    uvloop.run(on_uvloop())


async def _speaking_first_and_bulk(running: Running) -> None:
    greeting = b"SSH-2.0-Greeter\r\n"
    async with EchoServer(greeting=greeting) as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        async with connected(running, sd, link) as client:
            payload = os.urandom(32 * MiB)
            received = await asyncio.wait_for(pump(client.local_port, payload), 60)
            assert received[: len(greeting)] == greeting
            assert hashlib.sha256(received[len(greeting) :]).digest() == hashlib.sha256(payload).digest()
            # many short connections, each greeted before it sends anything
            results = await asyncio.gather(*(pump(client.local_port, b"x" * 1000) for _ in range(50)))
            assert all(r == greeting + b"x" * 1000 for r in results)
        assert not service_of(running).open
