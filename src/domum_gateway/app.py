"""Composition root: the only module that imports every layer and wires them together.

Start-up order: store (migrations) -> notifier -> services and caches -> admin listener
-> public listener -> SSH jump listener -> scheduler.

Shutdown order (the reverse, and why):
1. stop accepting on every listener, so no new work arrives: the SSH jump listener first
   (it also disconnects its clients with the reason, since asyncssh keeps connections
   open after its listener closes), then the HTTPS listeners;
2. let in-flight requests finish, bounded by ``grace`` seconds, then close what is left
   (long-lived tunnels and terminals are told the gateway is going away);
3. stop the scheduler, so no timer writes into a closing store;
4. close the notifier (its HTTP session) and last the store, which everything above used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from .bus import Bus
from .clock import Clock, SystemClock
from .control.api import ApiContext, add_api_routes, api_auth_middleware
from .control.console import add_console_routes
from .control.evidence import EvidenceBuilder
from .control.notifier import Notifier, build_notifier, render_token_message
from .control.ops import add_ops_routes
from .control.problems import problem_middleware
from .control.retention import Retention
from .control.scheduler import Scheduler
from .control.service import AdminService
from .errors import ConfigError
from .metrics import Metrics
from .model import Channel, RemoteUser
from .pki import ensure_ssh_host_key, server_ssl_context
from .proxy.context import CTX, PublicContext
from .proxy.geoip import open_country_lookup
from .proxy.headers import install_security_headers
from .proxy.http_proxy import add_http_proxy_routes, public_site
from .proxy.jump import JumpServer
from .proxy.login import LoginService
from .proxy.pages import add_login_routes, error_page_middleware
from .proxy.sessions import SessionManager
from .proxy.terminal import add_terminal_routes
from .proxy.tunnel import add_tunnel_routes
from .proxy.watch import WatchHub
from .settings import Settings
from .store.base import Store
from .store.postgres import PostgresStore
from .store.sqlite import SqliteStore

__all__ = ["Gateway", "build_store"]

log = logging.getLogger("domum.app")


def build_store(settings: Settings, clock: Clock | None = None) -> Store:
    """The store named by ``storage.url``."""
    if settings.storage.kind == "sqlite":
        path = settings.storage.sqlite_path
        assert path is not None
        return SqliteStore(path, clock)
    return PostgresStore(
        settings.storage.url,
        clock,
        pool_size=settings.storage.pool_size,
        statement_timeout=settings.storage.statement_timeout,
    )


@dataclass
class _Listener:
    runner: web.AppRunner
    addresses: list[tuple[str, int]] = field(default_factory=list)


class Gateway:
    """One gateway process: listeners, store, notifier, scheduler."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        store: Store | None = None,
        notifier: Notifier | None = None,
        grace: float = 10.0,
        tls: bool = True,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.store = store or build_store(settings, self.clock)
        self.notifier: Notifier = notifier or build_notifier(
            smtp_host=settings.email.smtp_host,
            smtp_port=settings.email.smtp_port,
            starttls=settings.email.starttls,
            username=settings.email.username,
            password=settings.email.password.reveal(),
            sender=settings.email.sender or "domum-gateway@localhost",
            sms_url=settings.sms.url,
            sms_token=settings.sms.token.reveal(),
            outbox_dir=settings.outbox.dir,
        )
        self.metrics = Metrics()
        self.bus = Bus()
        self.grace = grace
        self.tls = tls
        self.service = AdminService(
            self.store,
            self.notifier,
            self.clock,
            self.bus,
            settings.public.base_url,
            on_link_sent=lambda ch, outcome: self.metrics.links_sent.labels(ch, outcome).inc(),
        )
        self.retention = Retention(self.store, self.clock, self.bus, settings.retention.days)
        self.scheduler = Scheduler(self.service, self.store, self.retention, metrics=self.metrics)
        # A replica's name in the shared connection registry: the id its notifications and
        # its listening connection already carry on PostgreSQL (random per start anyway).
        shared = isinstance(self.store, PostgresStore)
        replica = self.store.instance_id if isinstance(self.store, PostgresStore) else None
        self.sessions = SessionManager(
            self.store, self.clock, self.bus, self.metrics, replica=replica, shared=shared
        )
        self.login = LoginService(self.store, self.clock, self.sessions, self._send_token, self.metrics)
        self.public_ctx = PublicContext(
            settings, self.store, self.clock, self.bus, self.metrics, self.sessions, self.login
        )
        self._listeners: dict[str, _Listener] = {}
        # Auditors watch browser terminals (public listener) from the admin listener.
        self.watch = WatchHub()
        self.admin_app = self._build_admin_app()
        self.public_app = self._build_public_app()

    # building ------------------------------------------------------------------
    def _build_admin_app(self) -> web.Application:
        app = web.Application(
            middlewares=[problem_middleware, api_auth_middleware],
            client_max_size=1024 * 1024,
        )
        evidence = EvidenceBuilder(
            self.store, self.clock, self.settings.public.base_url, self.settings.ssh.host_key
        )
        api = ApiContext(self.store, self.service, self.clock, evidence, self.retention)
        api.connections = self.sessions.registry
        api.cut_connection = self.sessions.terminate_connection
        api.cut_elsewhere = self.sessions.cut_elsewhere
        api.replica = self.sessions.replica
        api.watch = self.watch
        add_api_routes(app, api)
        add_ops_routes(app, self.store, self.metrics)
        add_console_routes(app, store=self.store, service=self.service, clock=self.clock, evidence=evidence)
        return app

    async def _send_token(self, user: RemoteUser, token: str) -> None:
        to = (user.email if user.channel is Channel.EMAIL else user.phone) or ""
        await self.notifier.send(
            render_token_message(user.channel.value, to, user_name=user.name, token=token)
        )

    def _build_public_app(self) -> web.Application:
        # error pages outermost, so every failure below (DomumError, 404, a crash) is a page.
        app = web.Application(middlewares=[error_page_middleware], client_max_size=1024 * 1024)
        app[CTX] = self.public_ctx
        install_security_headers(app)
        countries = open_country_lookup(self.settings.geoip.database)
        if countries is not None:
            # One reader serves every door: login (pages, SSH jump) and the session checks.
            self.login.countries = countries
            self.sessions.countries = countries

            async def close_countries(_: web.Application) -> None:
                countries.close()

            app.on_cleanup.append(close_countries)
        add_login_routes(app, self.public_ctx)
        add_terminal_routes(app, self.watch)
        add_tunnel_routes(app, self.public_ctx)
        # /t/ requests normally never reach aiohttp: public_site() starts each connection in
        # the proxy's own protocol, which hands everything else to this app.
        add_http_proxy_routes(app, self.public_ctx, grace=self.grace)
        # Not an aiohttp app, but it serves the same people with the same context.
        self.jump = JumpServer(self.public_ctx)
        return app

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        tls = self.settings.tls
        for p in (tls.cert, tls.key):
            if not Path(p).exists():
                raise ConfigError(f"{self.settings.path}: tls: {p} does not exist; run `domum-gateway init`")
        return server_ssl_context(tls.cert, tls.key)

    # running -------------------------------------------------------------------
    async def start(self) -> None:
        await self.store.open()
        if isinstance(self.store, PostgresStore):
            # Replicas share changes over LISTEN/NOTIFY: theirs are published here only
            # locally, ours go out through the bus's remote hook.
            await self.store.listen(lambda change: self.bus.publish(change, local_only=True))
            self.bus.set_remote(self.store.notify)
        ctx = self._ssl()
        await self._listen(
            "admin", self.admin_app, self.settings.admin.listen.host, self.settings.admin.listen.port, ctx
        )
        await self._listen(
            "public",
            self.public_app,
            self.settings.public.listen.host,
            self.settings.public.listen.port,
            ctx,
            site=public_site,
        )
        ssh = self.settings.ssh
        if ensure_ssh_host_key(ssh.host_key):
            log.warning("gateway.ssh_host_key_created path=%s (clients see a new host key)", ssh.host_key)
        await self.jump.start(ssh.listen.host, ssh.listen.port, ssh.host_key)
        if self.public_ctx.ssh_port is None:
            self.public_ctx.ssh_port = self.jump.port
        self.scheduler.start()
        self.sessions.start()
        log.info(
            "gateway.started public=%s admin=%s ssh=%s store=%s",
            self.url("public"),
            self.url("admin"),
            self.jump.addresses,
            self.store.kind,
        )

    async def _listen(
        self,
        name: str,
        app: web.Application,
        host: str,
        port: int,
        ctx: ssl.SSLContext | None,
        site: Callable[..., web.BaseSite] = web.TCPSite,
    ) -> None:
        runner = web.AppRunner(
            app,
            shutdown_timeout=self.grace,
            access_log=None,
            handle_signals=False,
            # aiohttp keeps an idle keep-alive connection for an hour by default; a
            # browser reconnects in a blink, so hold idle sockets no longer than nginx.
            keepalive_timeout=75.0,
        )
        await runner.setup()
        listener = site(runner, host, port, ssl_context=ctx, backlog=1024)
        await listener.start()
        addrs = [(str(a[0]), int(a[1])) for a in runner.addresses]
        self._listeners[name] = _Listener(runner, addrs)

    def port(self, name: str) -> int:
        return self._listeners[name].addresses[0][1]

    def url(self, name: str) -> str:
        host, port = self._listeners[name].addresses[0]
        scheme = "https" if self.tls else "http"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"

    def ssh_port(self) -> int:
        """The port the SSH jump listener is bound to."""
        return self.jump.port

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.jump.stop()
        for listener in self._listeners.values():
            # cleanup() stops accepting, waits for handlers up to shutdown_timeout, then closes.
            with contextlib.suppress(Exception):
                await listener.runner.cleanup()
        self._listeners.clear()
        await self.scheduler.stop()
        await self.sessions.stop()
        close = getattr(self.notifier, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
        self.bus.set_remote(None)
        await self.store.close()
        log.info("gateway.stopped")

    async def serve_forever(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
