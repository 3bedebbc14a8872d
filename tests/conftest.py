"""Fixtures shared by the suite: a gateway on ephemeral loopback ports with a real SMTP server."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from domum_gateway.app import Gateway
from domum_gateway.audit import AuditEntry
from domum_gateway.auth.secrets import hash_secret, new_api_token
from domum_gateway.clock import SystemClock
from domum_gateway.model import Role
from domum_gateway.pki import client_ssl_context, make_test_pki
from domum_gateway.settings import Settings, settings_from_mapping

from .peers.smtp import LoopbackController, Mailbox


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    controller = LoopbackController(box, hostname="127.0.0.1", port=0)
    controller.start()
    try:
        yield box, int(controller.port)
    finally:
        controller.stop()


def make_settings(tmp: Path, smtp_port: int | None = None, **overrides: Any) -> Settings:
    cert, key, ca = make_test_pki(tmp / "certs")
    data: dict[str, Any] = {
        "public": {"listen": "127.0.0.1:0", "base_url": "https://localhost:8443"},
        "ssh": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
        "tls": {"cert": str(cert), "key": str(key), "ca": str(ca)},
        "storage": {"url": f"sqlite:///{tmp}/var/domum.db"},
        "outbox": {"dir": str(tmp / "var" / "outbox")},
    }
    if smtp_port is not None:
        data["email"] = {
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp_port,
            "starttls": False,
            "sender": "gateway@example.com",
        }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return settings_from_mapping(data, tmp / "config" / "domum.toml")


@dataclass
class Running:
    gateway: Gateway
    admin_url: str
    public_url: str
    admin_token: str
    auditor_token: str
    ssl: ssl.SSLContext
    mailbox: Mailbox

    def admin(self, token: str | None = None) -> aiohttp.ClientSession:
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        return aiohttp.ClientSession(
            base_url=self.admin_url,
            headers=headers,
            connector=aiohttp.TCPConnector(ssl=self.ssl),
        )


async def _token(gw: Gateway, name: str, role: Role) -> str:
    token = new_api_token()
    await gw.store.create_api_token(
        name,
        role,
        hash_secret(token),
        SystemClock().now(),
        AuditEntry(actor="test", action="token.created", subject=f"token:{name}"),
    )
    return token


@pytest.fixture
async def running(tmp_path: Path, mailbox: tuple[Mailbox, int]) -> AsyncIterator[Running]:
    box, port = mailbox
    settings = make_settings(tmp_path, smtp_port=port)
    gw = Gateway(settings, grace=1.0)
    await gw.start()
    try:
        admin = await _token(gw, "admin", Role.ADMIN)
        auditor = await _token(gw, "auditor", Role.AUDITOR)
        yield Running(
            gw, gw.url("admin"), gw.url("public"), admin, auditor, client_ssl_context(settings.tls.ca), box
        )
    finally:
        await gw.stop()
