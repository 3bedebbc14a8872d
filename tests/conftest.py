"""Fixtures shared by the suite: a gateway on ephemeral loopback ports with a real SMTP server.

Every test that builds a gateway runs once per store: SQLite, and PostgreSQL (a
throwaway server for the session, a fresh database per test). ``--stores sqlite`` (or
``DOMUM_TEST_STORES=sqlite``, or ``postgresql``) narrows that. A test builds a gateway
through the ``running`` fixture or through a helper that calls :func:`make_settings`
with the ``mailbox`` fixture's SMTP port (``gateway_with`` in ``peers``); both get the
test's store: ``mailbox`` depends on ``store_url``, which makes it the default storage
of :func:`make_settings` for that test. Tests that start their own PostgreSQL database
(``pg_url``/``pg_server`` requested directly, like the replica tests) are not
parametrised, and neither are tests that build no gateway.
"""

from __future__ import annotations

import os
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

from .peers.postgres import PostgresServer, pg_server, pg_url  # noqa: F401  (fixtures)
from .peers.smtp import LoopbackController, Mailbox

STORES = ("sqlite", "postgresql")

# The storage URL the current test's gateways use unless they name one (see the docstring).
_default_storage: str | None = None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--stores",
        default=os.environ.get("DOMUM_TEST_STORES", ""),
        help="comma-separated stores every gateway-building test runs on (sqlite,postgresql); default: both",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_kind" not in metafunc.fixturenames:
        return
    option = str(metafunc.config.getoption("--stores"))
    chosen = [kind.strip() for kind in option.split(",") if kind.strip()]
    unknown = sorted(set(chosen) - set(STORES))
    if unknown:
        raise pytest.UsageError(f"--stores: unknown store {', '.join(unknown)}; use {', '.join(STORES)}")
    if not chosen:
        chosen = list(STORES)
    if {"pg_url", "pg_server"} & set(metafunc.fixturenames):
        return  # the test runs its own PostgreSQL database (replicas, dialect comparisons)
    if metafunc.definition.get_closest_marker("sqlite_only") is not None:
        chosen = ["sqlite"]
    if chosen != ["sqlite"]:  # SQLite-only keeps the test ids unchanged
        metafunc.parametrize("store_kind", chosen, indirect=True)


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """The store the ``running`` gateway uses (parametrised by ``pytest_generate_tests``)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path, store_kind: str) -> str:
    """``storage.url`` for the ``running`` gateway: a file, or a fresh PostgreSQL database."""
    if store_kind == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite:///{tmp_path}/var/domum.db"


@pytest.fixture
def mailbox(store_url: str) -> Iterator[tuple[Mailbox, int]]:
    """A real SMTP server; also makes ``store_url`` this test's default storage."""
    global _default_storage
    box = Mailbox()
    controller = LoopbackController(box, hostname="127.0.0.1", port=0)
    controller.start()
    if not store_url.startswith("sqlite:"):
        _default_storage = store_url  # SQLite: each gateway keeps its own file under its folder
    try:
        yield box, int(controller.port)
    finally:
        _default_storage = None
        controller.stop()


def make_settings(tmp: Path, smtp_port: int | None = None, **overrides: Any) -> Settings:
    cert, key, ca = make_test_pki(tmp / "certs")
    data: dict[str, Any] = {
        "public": {"listen": "127.0.0.1:0", "base_url": "https://localhost:8443"},
        "ssh": {"listen": "127.0.0.1:0"},
        "admin": {"listen": "127.0.0.1:0"},
        "tls": {"cert": str(cert), "key": str(key), "ca": str(ca)},
        "storage": {"url": _default_storage or f"sqlite:///{tmp}/var/domum.db"},
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
    pg: PostgresServer | None = None

    async def database_bytes(self) -> bytes:
        """Everything the store has written: the SQLite file and its WAL, or a pg_dump."""
        storage = self.gateway.settings.storage
        if self.pg is not None:
            return self.pg.dump(storage.url)
        db = storage.sqlite_path
        assert db is not None
        files = [db.with_name(db.name + suffix) for suffix in ("", "-wal")]
        return b"".join(p.read_bytes() for p in files if p.exists())

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
async def running(
    request: pytest.FixtureRequest, tmp_path: Path, mailbox: tuple[Mailbox, int], store_url: str
) -> AsyncIterator[Running]:
    box, port = mailbox
    settings = make_settings(tmp_path, smtp_port=port, storage={"url": store_url})
    pg = request.getfixturevalue("pg_server") if settings.storage.kind == "postgresql" else None
    gw = Gateway(settings, grace=1.0)
    await gw.start()
    try:
        admin = await _token(gw, "admin", Role.ADMIN)
        auditor = await _token(gw, "auditor", Role.AUDITOR)
        yield Running(
            gw,
            gw.url("admin"),
            gw.url("public"),
            admin,
            auditor,
            client_ssl_context(settings.tls.ca),
            box,
            pg=pg,
        )
    finally:
        await gw.stop()
