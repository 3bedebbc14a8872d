"""SMS and SMTP providers that refuse, stall or drop the connection, through the real login flow.

A real gateway sends one-time tokens (``POST /a/{link}/token``) to a provider on
loopback that misbehaves on cue. The user gets the one clear error page (502, nothing
internal), the log says what the provider did, the failed send is audited, its token
is dead even if the message got through, and it does not use up the hourly send
allowance: once the provider is back, the user can still ask for every token allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from domum_gateway.control.notifier import build_notifier
from domum_gateway.proxy.context import COOKIE
from domum_gateway.proxy.login import MAX_SENDS_PER_HOUR
from domum_gateway.store.base import AuditFilter

from ..conftest import Running
from ..integration.helpers import call, window_now
from ..peers.public_client import client_for
from ..peers.smtp import Mailbox
from .conftest import fault_gateway

TIMEOUT = 1.0  # the notifier's provider timeout in these tests
LEAKS = ("Traceback", "127.0.0.1", "aiohttp", "aiosmtplib", "SMTP", "HTTP ", "provider", "Error", "+4179")
PHONE = "+41795554567"
EMAIL = "sam@example.com"


class Provider:
    """A loopback SMS (HTTP) or SMTP server whose behaviour is switched by ``mode``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.mode = "ok"
        self.bodies: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(
                self._http(reader, writer) if self.kind == "sms" else self._smtp(reader, writer), 10
            )
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        found = re.search(rb"content-length:\s*(\d+)", head, re.I)
        body = await reader.readexactly(int(found.group(1)) if found else 0)
        self.bodies.append(json.loads(body)["body"])
        if self.mode == "ok":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        elif self.mode == "refuse":
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy"
            )
        elif self.mode == "stall":
            await reader.read()  # say nothing until the gateway gives up and hangs up
        elif self.mode == "drop":
            writer.write(b"HTTP/1.1 20")  # half a status line, then the connection is gone
        await writer.drain()

    async def _smtp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 mail.test ESMTP\r\n")
        await writer.drain()
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250 mail.test\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                writer.write(b"250 OK\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                data = await reader.readuntil(b"\r\n.\r\n")
                self.bodies.append(data.decode("utf-8", "replace"))
                if self.mode == "drop":
                    return  # the whole message arrived, the acknowledgement never does
                writer.write(b"250 queued\r\n")
            else:
                writer.write(b"502 not here\r\n")
            await writer.drain()


@asynccontextmanager
async def _gateway(
    tmp_path: Path, smtp: tuple[Mailbox, int], provider: Provider
) -> AsyncIterator[tuple[Running, str]]:
    """A gateway whose only working channel is ``provider``; yields it and the link path."""
    notifier = build_notifier(
        smtp_host="127.0.0.1" if provider.kind == "email" else "",
        smtp_port=provider.port,
        starttls=False,
        username="",
        password="",
        sender="gateway@example.com",
        sms_url=f"http://127.0.0.1:{provider.port}/send" if provider.kind == "sms" else "",
        sms_token="sms-secret",
        outbox_dir=tmp_path / "outbox",
        timeout=TIMEOUT,
    )
    async with fault_gateway(tmp_path, smtp, notifier=notifier) as run:
        try:
            async with run.admin() as s:
                st, t = await call(
                    s,
                    "POST",
                    "/api/v1/targets",
                    {"name": "wiki", "protocol": "http", "url": "http://127.0.0.1:9/"},
                )
                assert st == 201, t
                policy = {"targets": [t["id"]], "channels": ["email", "sms"]}
                st, g = await call(s, "POST", "/api/v1/groups", {"name": "g", "policy": policy})
                assert st == 201, g
                person = {"channel": "sms", "phone": PHONE} if provider.kind == "sms" else {"email": EMAIL}
                st, u = await call(s, "POST", "/api/v1/users", {"group_id": g["id"], "name": "Sam", **person})
                assert st == 201, u
                st, r = await call(s, "POST", "/api/v1/reasons", {"label": "r"})
                assert st == 201, r
                body = {
                    "group_id": g["id"],
                    "user_id": u["id"],
                    "justification": "j",
                    "reason_id": r["id"],
                    **window_now(),
                }
                st, req = await call(s, "POST", "/api/v1/access-requests", body)
                assert st == 201, req
                st, fwd = await call(s, "POST", f"/api/v1/access-requests/{req['id']}/forward")
                assert st == 200, fwd
            link = re.search(r"/a/[A-Za-z0-9_-]+", provider.bodies[-1])
            assert link, provider.bodies
            yield run, link.group(0)
        finally:
            await notifier.close()


def _token(provider: Provider) -> str:
    found = re.search(r"\b(\d{8})\b", provider.bodies[-1].split("\r\n\r\n", 1)[-1])
    assert found, provider.bodies[-1]
    return found.group(1)


@pytest.mark.parametrize(
    ("kind", "mode", "logged"),
    [
        ("sms", "refuse", "refused: HTTP 503"),
        ("sms", "stall", "failed: "),
        ("sms", "drop", "failed: "),
        ("email", "drop", "failed: "),
    ],
    ids=["sms-refuses", "sms-stalls", "sms-drops", "smtp-drops-after-data"],
)
async def test_a_failing_provider_gives_a_clear_page_and_costs_nothing(
    tmp_path: Path,
    smtp: tuple[Mailbox, int],
    caplog: pytest.LogCaptureFixture,
    kind: str,
    mode: str,
    logged: str,
) -> None:
    provider = Provider(kind)
    await provider.start()
    try:
        async with _gateway(tmp_path, smtp, provider) as (run, link):
            async with client_for(run) as user:
                page = await user.get(link)
                assert page.status == 200, page.text
                provider.mode = mode
                sent = len(provider.bodies)
                started = time.monotonic()
                with caplog.at_level(logging.INFO):
                    page = await user.post(f"{link}/token")
                assert time.monotonic() - started < TIMEOUT + 5  # a stalled provider is given up on
                assert page.status == 502, page.text
                assert page.title == "Could not send your token"
                assert not any(leak in page.text for leak in LEAKS), page.text
                what = "SMS" if kind == "sms" else "e-mail"
                assert any(
                    r.name == "domum_gateway.control.notifier"
                    and what in r.getMessage()
                    and logged in r.getMessage()
                    for r in caplog.records
                ), caplog.text
                assert "pages.delivery_failed" in caplog.text
                assert PHONE not in caplog.text and "sms-secret" not in caplog.text
                events = await run.gateway.store.list_audit(AuditFilter(type="token.send_failed"))
                assert [e.outcome for e in events.items] == ["error"]
                if len(provider.bodies) > sent:
                    # The message arrived although the send failed: its token must be dead.
                    dead = _token(provider)
                    await user.get(link)
                    page = await user.post(f"{link}/verify", {"token": dead}, allow_redirects=False)
                    assert page.status != 303 and user.cookie(COOKIE) is None, page.text
                # The provider is back: the failed send did not use up the hourly allowance.
                provider.mode = "ok"
                for _ in range(MAX_SENDS_PER_HOUR):
                    await user.get(link)
                    page = await user.post(f"{link}/token")
                    assert page.status == 200, page.text
                page = await user.post(f"{link}/verify", {"token": _token(provider)}, allow_redirects=False)
                assert page.status == 303, page.text
                assert user.cookie(COOKIE)
    finally:
        await provider.stop()
