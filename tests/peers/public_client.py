"""A remote user's browser, reduced to what the login pages need, and gateway starters.

``PublicClient`` keeps cookies like a browser (the ``__Host-`` cookies are Secure, and
the gateway is reached by IP address, hence ``unsafe=True``), can bind to another
loopback address (``127.0.0.2``) to play a second network location, and lifts the CSRF
field out of the last page so form posts look like a person pressing the button.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from domum_gateway.app import Gateway
from domum_gateway.clock import Clock
from domum_gateway.model import Role
from domum_gateway.pki import client_ssl_context

from ..conftest import Running, _token, make_settings
from .smtp import Mailbox

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_MESSAGE = re.compile(r'<p class="message" data-role="message">(.*?)</p>', re.S)
_TITLE = re.compile(r"<h1[^>]*>(.*?)</h1>", re.S)


@dataclass
class Page:
    status: int
    text: str
    headers: CIMultiDictProxy[str]
    url: str
    history: tuple[int, ...] = ()

    @property
    def csrf(self) -> str | None:
        m = _CSRF.search(self.text)
        return m.group(1) if m else None

    @property
    def message(self) -> str:
        m = _MESSAGE.search(self.text)
        return m.group(1).strip() if m else ""

    @property
    def title(self) -> str:
        m = _TITLE.search(self.text)
        return m.group(1).strip() if m else ""

    def shape(self, *secrets: str) -> str:
        """The page with its variable message and the given secrets blanked out."""
        text = _MESSAGE.sub('<p class="message" data-role="message">…</p>', self.text)
        for s in secrets:
            text = text.replace(s, "SECRET")
        return text


class PublicClient:
    def __init__(
        self,
        base_url: str,
        ssl_ctx: ssl.SSLContext,
        *,
        local_addr: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        connector = aiohttp.TCPConnector(
            ssl=ssl_ctx, local_addr=(local_addr, 0) if local_addr else None, force_close=True
        )
        self.session = aiohttp.ClientSession(
            base_url=base_url,
            connector=connector,
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            headers=dict(headers or {}),
        )
        self.last: Page | None = None

    async def __aenter__(self) -> PublicClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    def cookie(self, name: str) -> str | None:
        for c in self.session.cookie_jar:
            if c.key == name:
                return c.value
        return None

    def set_cookie(self, name: str, value: str) -> None:
        url = self.session._base_url
        assert url is not None
        self.session.cookie_jar.update_cookies({name: value}, url)

    async def get(self, path: str, **kw: Any) -> Page:
        async with self.session.get(path, **kw) as r:
            page = Page(r.status, await r.text(), r.headers, str(r.url), tuple(h.status for h in r.history))
        self.last = page
        return page

    async def post(
        self,
        path: str,
        data: Mapping[str, str] | None = None,
        *,
        csrf: str | None = "auto",
        allow_redirects: bool = True,
        **kw: Any,
    ) -> Page:
        form = dict(data or {})
        if csrf == "auto":
            csrf = self.last.csrf if self.last is not None else None
        if csrf is not None:
            form.setdefault("csrf", csrf)
        async with self.session.post(path, data=form, allow_redirects=allow_redirects, **kw) as r:
            page = Page(r.status, await r.text(), r.headers, str(r.url), tuple(h.status for h in r.history))
        self.last = page
        return page


async def ask_token(run: Running, client: PublicClient, link: str, email: str) -> str:
    """Open the link page, press "Send token", read the token from the real mailbox."""
    page = await client.get(link)
    assert page.status == 200, page.text
    n = len(run.mailbox.messages)
    page = await client.post(f"{link}/token")
    assert page.status == 200, page.text
    assert page.url.endswith(f"{link}/token")
    await run.mailbox.wait_count(n + 1)
    return run.mailbox.last_token(email)


async def sign_in(run: Running, client: PublicClient, link: str, email: str) -> Page:
    """The whole remote-user login through the pages; returns the portal page."""
    token = await ask_token(run, client, link, email)
    page = await client.post(f"{link}/verify", {"token": token})
    assert page.status == 200 and page.url.endswith("/portal"), (page.status, page.text)
    return page


@asynccontextmanager
async def gateway_with(
    tmp_path: Path,
    mailbox: tuple[Mailbox, int],
    *,
    clock: Clock | None = None,
    **overrides: Any,
) -> AsyncIterator[Running]:
    """Like the ``running`` fixture, with a clock and settings overrides of the test's own."""
    box, port = mailbox
    settings = make_settings(tmp_path, smtp_port=port, **overrides)
    gw = Gateway(settings, clock=clock, grace=1.0)
    await gw.start()
    try:
        admin = await _token(gw, "admin", Role.ADMIN)
        auditor = await _token(gw, "auditor", Role.AUDITOR)
        yield Running(
            gw, gw.url("admin"), gw.url("public"), admin, auditor, client_ssl_context(settings.tls.ca), box
        )
    finally:
        await gw.stop()


def client_for(run: Running, **kw: Any) -> PublicClient:
    return PublicClient(run.public_url, run.ssl, **kw)
