"""A remote user's sign-in through the public pages, for clients that sign many users in.

Used by the load mix (``tests/load/mix.py``) and the benchmarks (``bench/replicas.py``,
``bench/ssh.py``), which import it as ``tests.load.signin`` with the repository root on
``sys.path``; so it imports nothing from the tests' conftest or from the gateway.

``sign_in`` is the browser flow on a session the caller made (its address, connection
limit and timeout are the caller's): the personal link page, "Send token", the token
from wherever the caller reads it, verify, the portal. ``Inbox`` is one such place: an
aiosmtpd handler that queues each message per recipient, so every login waits for its
own token.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from email.message import EmailMessage
from typing import Any

import aiohttp

__all__ = ["COOKIE", "LINK", "TOKEN", "Inbox", "browser", "page", "sign_in"]

COOKIE = "__Host-domum"
TOKEN = re.compile(r"\b(\d{8})\b")
LINK = re.compile(r"https?://\S+?(/a/[A-Za-z0-9_-]+)")
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Inbox:
    """aiosmtpd handler (runs in the controller's thread) that hands each message's body to
    ``loop``, queued per recipient."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queues: dict[str, asyncio.Queue[str]] = {}
        self.count = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        part = msg.get_body(("plain",))
        body = str(part.get_content()) if part is not None else ""
        for rcpt in envelope.rcpt_tos:
            self.loop.call_soon_threadsafe(self._deliver, str(rcpt).lower(), body)
        return "250 Message accepted"

    def _queue(self, rcpt: str) -> asyncio.Queue[str]:
        queue = self.queues.get(rcpt)
        if queue is None:
            queue = self.queues[rcpt] = asyncio.Queue()
        return queue

    def _deliver(self, rcpt: str, body: str) -> None:
        self.count += 1
        self._queue(rcpt).put_nowait(body)

    async def next(self, rcpt: str, pattern: re.Pattern[str], timeout: float = 30.0) -> str:
        """The first group of ``pattern`` in the next message to ``rcpt`` that has it."""
        async with asyncio.timeout(timeout):
            while True:
                m = pattern.search(await self._queue(rcpt.lower()).get())
                if m:
                    return m.group(1)

    def forget(self, rcpt: str) -> None:
        self.queues.pop(rcpt.lower(), None)


def browser(
    base_url: str,
    ssl_ctx: ssl.SSLContext,
    local: str | None = None,
    *,
    timeout: float = 300.0,
    headers: Mapping[str, str] | None = None,
) -> aiohttp.ClientSession:
    """A browser-like client: one keep-alive connection (from ``local`` when given), cookies
    kept (``unsafe``: the gateway is reached by IP address and its cookies are ``__Host-``),
    ``timeout`` seconds for each request."""
    return aiohttp.ClientSession(
        base_url=base_url,
        connector=aiohttp.TCPConnector(ssl=ssl_ctx, local_addr=(local, 0) if local else None, limit=1),
        cookie_jar=aiohttp.CookieJar(unsafe=True),
        timeout=aiohttp.ClientTimeout(total=timeout),
        headers=dict(headers or {}),
    )


async def page(s: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> tuple[int, str, str]:
    """(status, body, final path) of one request, redirects followed unless told otherwise."""
    async with s.request(method, path, **kw) as r:
        return r.status, await r.text(), r.url.path


async def sign_in(
    s: aiohttp.ClientSession, link: str, token: Callable[[], Awaitable[str]]
) -> tuple[str, str]:
    """The remote user's login on ``s``, as a browser does it; returns (session cookie, the
    portal's HTML: its sign-out form carries the CSRF field).

    Args:
        s: a session whose base URL is the gateway's public side (see ``browser``).
        link: the personal link's path, ``/a/...``.
        token: reads the one-time token once "Send token" was pressed.

    Raises:
        RuntimeError: a page was not the one the flow expects, or no cookie came.
    """
    status, text, _ = await page(s, "GET", link)
    m = _CSRF.search(text)
    if status != 200 or m is None:
        raise RuntimeError(f"link page: {status} {text[:200]}")
    status, text, _ = await page(s, "POST", f"{link}/token", data={"csrf": m.group(1)})
    m = _CSRF.search(text)
    if status != 200 or m is None:
        raise RuntimeError(f"token page: {status} {text[:200]}")
    code = await token()
    status, text, path = await page(s, "POST", f"{link}/verify", data={"csrf": m.group(1), "token": code})
    if status != 200 or path != "/portal":
        raise RuntimeError(f"verify: {status} {path} {text[:200]}")
    cookie = next((c.value for c in s.cookie_jar if c.key == COOKIE), "")
    if not cookie:
        raise RuntimeError("no session cookie after verify")
    return cookie, text
