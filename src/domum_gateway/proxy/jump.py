"""The native SSH jump server: ``ssh -J alice@example.com@gateway:2222 root@db01``.

An asyncssh server on ``ssh.listen``. The SSH user name is the remote user's e-mail
address (or user id). Sign-in is keyboard-interactive only and runs the web login's
code (:class:`~domum_gateway.proxy.login.LoginService`, shared, not copied): the first
prompt asks for the personal link (``Personal link:``, full URL or code), the gateway
sends a one-time token on the user's channel, the second prompt asks for it
(``Token:``). The same per-address limit, send limit, token tries and counters apply as
on the web; the SSH connection is one session of the grant.

After sign-in, the only channel the gateway opens is ``direct-tcpip`` to one of the
grant's SSH targets, named by registered host and port or by target name. The SSH
session inside that channel is between the user and the target (the gateway only
relays ciphertext, so target credentials never pass through it in clear). Everything
else — ``session`` (shell, exec, subsystem, hence scp/sftp, x11 and agent requests),
``tcpip-forward`` (``-R``), streamlocal and tun/tap — is refused and audited.

When the session ends (revoke, window end, idle, logout elsewhere, terminate) the
session manager calls the connection's closer, which disconnects with the reason; the
OpenSSH client prints it (``Received disconnect ...: Domum Gateway: access revoked``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import cast

import asyncssh
from asyncssh.constants import DEFAULT_LANG, MSG_DISCONNECT
from asyncssh.forward import SSHForwarder
from asyncssh.packet import String, UInt32

from ..auth.decide import Deny, DenyReason, explain
from ..auth.origin import IPAddress, normalise_address
from ..auth.secrets import mask_email, mask_phone
from ..errors import ConfigError, DomumError, TooManyRequests
from ..model import Channel
from .context import PublicContext
from .login import GENERIC_REFUSAL, LinkInfo, LoginRefused
from .sessions import Connection, LiveSession
from .ssh_common import SERVER_ENCRYPTION, SERVER_KEX, SERVER_MAC, SessionWatch, SshTargets, audit

__all__ = ["JumpServer"]

log = logging.getLogger("domum.ssh.jump")

_LINK_PROMPT = "Personal link: "
_TOKEN_PROMPT = "Token: "
_NOT_A_SHELL = (
    "This gateway does not run shells or commands. Reach your SSH target through it: "
    "ssh -J <your e-mail>@<gateway>:<port> <user>@<target>"
)
_WINDOW = 2 * 1024 * 1024
_MAX_PACKET = 32768


class _Meter:
    """Bytes relayed on one SSH connection, and whether the user sent any since the last tick.

    ``session`` (once signed in) has its activity stamped on every read from the user,
    which its idle timer reads; the target's output alone is not activity.
    """

    __slots__ = ("active", "down", "flushed_down", "flushed_up", "session", "up")

    def __init__(self) -> None:
        self.up = self.down = self.flushed_up = self.flushed_down = 0
        self.active = False
        self.session: LiveSession | None = None


class _Upstream(SSHForwarder):
    """The TCP connection to the target; what it reads goes down the SSH channel."""

    def __init__(self, meter: _Meter) -> None:
        super().__init__()
        self._meter = meter
        self._held: asyncio.ReadTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Nothing can go down yet: the channel opens only after this connect returns, and
        # an SSH server speaks first (its version line, at once). Leave what it says in the
        # socket until the channel is open instead of losing it.
        self._held = cast(asyncio.ReadTransport, transport)
        self._held.pause_reading()

    def release(self) -> None:
        """Start reading from the target: the channel to the client is open."""
        held, self._held = self._held, None
        if held is not None and not held.is_closing():
            held.resume_reading()

    def data_received(self, data: bytes, datatype: int | None = None) -> None:
        self._meter.down += len(data)
        super().data_received(data, datatype)

    def writelines(self, chunks: list[bytes]) -> None:
        transport = cast(asyncio.WriteTransport | None, self._transport)
        if transport is not None:
            with contextlib.suppress(OSError):
                transport.writelines(chunks)


class _ChannelSide(SSHForwarder):
    """The SSH channel's session; what it receives goes up to the target.

    One read from the client's socket holds several SSH packets (32 KiB of data each),
    and asyncssh hands them over one by one. Writing each to the target is one system
    call per packet, which costs more than decrypting it; so the packets of one read are
    gathered and written once, at the end of the event-loop turn.
    """

    def __init__(self, peer: _Upstream, meter: _Meter) -> None:
        super().__init__(peer)
        self._upstream = peer
        self._meter = meter
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._upstream.release()

    def data_received(self, data: bytes, datatype: int | None = None) -> None:
        meter = self._meter
        meter.up += len(data)
        meter.active = True
        if meter.session is not None:
            meter.session.active()
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            chunks, self._pending = self._pending, []
            self._upstream.writelines(chunks)

    def eof_received(self) -> bool:
        self._flush()
        return super().eof_received()

    def close(self) -> None:
        self._flush()
        super().close()
        if not self.closed.done():
            self.closed.set_result(None)


class JumpServer:
    """The SSH listener; owns its connections so shutdown and cut-off can reach them."""

    def __init__(
        self,
        ctx: PublicContext,
        *,
        login_timeout: float = 120.0,
        max_auth_tries: int = 3,
        max_channels: int = 32,
        connect_timeout: float | None = None,
        keepalive_interval: float = 30.0,
    ) -> None:
        self.ctx = ctx
        self.targets = SshTargets(ctx.store, ctx.bus)
        self.login_timeout = login_timeout
        self.max_auth_tries = max_auth_tries
        self.max_channels = max_channels
        # ``proxy.connect_timeout``, like every other path to a target.
        self.connect_timeout = (
            connect_timeout if connect_timeout is not None else ctx.settings.proxy.connect_timeout
        )
        self.keepalive_interval = keepalive_interval
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[_JumpConnection] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self.addresses: list[tuple[str, int]] = []

    async def start(self, host: str, port: int, host_key: Path) -> None:
        """Listen on ``host:port`` with the private key at ``host_key``.

        Raises:
            ConfigError: the key is missing or unreadable, or the address cannot be bound.
        """
        try:
            key = asyncssh.read_private_key(host_key)
        except (OSError, asyncssh.KeyImportError) as exc:
            raise ConfigError(
                f"ssh.host_key: cannot read {host_key}: {exc}; run `domum-gateway init`"
            ) from None
        try:
            self._acceptor = await asyncssh.create_server(
                lambda: _JumpConnection(self),
                host,
                port,
                server_host_keys=[key],
                server_version="DomumGateway",
                kex_algs=SERVER_KEX,
                encryption_algs=SERVER_ENCRYPTION,
                mac_algs=SERVER_MAC,
                compression_algs=("none",),
                public_key_auth=False,
                password_auth=False,
                host_based_auth=False,
                kbdint_auth=True,
                gss_kex=False,
                gss_auth=False,
                allow_pty=False,
                agent_forwarding=False,
                x11_forwarding=False,
                allow_scp=False,
                rdns_lookup=False,
                login_timeout=self.login_timeout,
                keepalive_interval=self.keepalive_interval,
                keepalive_count_max=3,
                window=_WINDOW,
                max_pktsize=_MAX_PACKET,
                backlog=1024,
                reuse_address=True,
            )
        except OSError as exc:
            raise ConfigError(f"ssh.listen: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.addresses = [(str(a[0]), int(a[1])) for a in self._acceptor.get_addresses()]
        log.info("jump.listening addresses=%s", self.addresses)

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    async def stop(self, reason: str = "the gateway is shutting down") -> None:
        """Stop accepting, disconnect every connection with ``reason``, finish audits."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        for conn in list(self._connections):
            conn.disconnect(reason)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        self.targets.close()

    def spawn(self, aw: Awaitable[None]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _JumpConnection(asyncssh.SSHServer):
    """One client connection: sign-in state, the session once signed in, its channels."""

    def __init__(self, server: JumpServer) -> None:
        self._server = server
        self._ctx = server.ctx
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer: IPAddress = normalise_address("0.0.0.0")
        self._origin = ""
        self._stage = "link"
        self._info: LinkInfo | None = None
        self._failures = 0
        self._token_tries = 0
        self._live: LiveSession | None = None
        self._watch: SessionWatch | None = None
        self._meter = _Meter()
        self._registered: Connection | None = None
        self._channels = 0

    # connection ----------------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self._origin = str(peer[0]) if peer else "0.0.0.0"
        with contextlib.suppress(ValueError):
            self._peer = normalise_address(self._origin)
        self._server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._flush_meter()
        live = self._live
        if live is None:
            return
        self._detach_closer()
        if not live.ended:
            self._server.spawn(self._end_session(live))

    async def _end_session(self, live: LiveSession) -> None:
        try:
            await self._ctx.sessions.end(
                live, "the SSH connection closed", f"user:{live.user_id}", self._origin
            )
        except DomumError as exc:
            log.warning("jump.session_end_not_recorded session=%s detail=%s", live.id, exc.detail)

    def disconnect(self, reason: str, code: int = asyncssh.DISC_BY_APPLICATION) -> None:
        conn = self._conn
        if conn is None:
            return
        text = f"Domum Gateway: {reason}"
        # asyncssh's disconnect() closes every channel before it sends DISCONNECT, and an
        # OpenSSH client forwarding stdio (-W, hence -J) exits on that channel close without
        # reading on, so the person would never see why. Send the reason first.
        with contextlib.suppress(Exception):
            conn.send_packet(MSG_DISCONNECT, UInt32(code), String(text), String(DEFAULT_LANG))
        conn.disconnect(code, text)

    def _closer(self, reason: str) -> None:
        # Called by the session manager, synchronously, when the session ends.
        self.disconnect(reason)

    def _detach_closer(self) -> None:
        if self._registered is not None:
            self._ctx.sessions.close_connection(self._registered)
            self._registered = None

    # authentication --------------------------------------------------------------
    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(
        self, username: str, lang: str, submethods: str
    ) -> asyncssh.auth.KbdIntChallenge:
        self._stage, self._info, self._token_tries = "link", None, 0
        return (
            "Domum Gateway sign-in",
            "Paste the personal link you received (the full URL or its code).",
            "",
            [(_LINK_PROMPT, False)],
        )

    async def validate_kbdint_response(
        self, username: str, responses: asyncssh.auth.KbdIntResponse
    ) -> asyncssh.auth.KbdIntChallenge:
        try:
            if self._stage == "link":
                return await self._on_link(username, responses)
            if self._stage == "token":
                return await self._on_token(responses)
            if self._stage == "welcome":
                return self._live is not None
        except (LoginRefused, TooManyRequests) as exc:
            return self._refuse(exc.detail or GENERIC_REFUSAL)
        except DomumError as exc:
            log.warning("jump.login_error peer=%s type=%s", self._origin, type(exc).__name__)
            return self._refuse(
                exc.detail if exc.status in (429, 502, 503, 504) and exc.detail else GENERIC_REFUSAL
            )
        return False

    async def _on_link(
        self, username: str, responses: asyncssh.auth.KbdIntResponse
    ) -> asyncssh.auth.KbdIntChallenge:
        login = self._ctx.login
        login.limit_client(self._origin)
        if len(responses) != 1:
            raise LoginRefused(GENERIC_REFUSAL, "invalid_link")
        user = await self._ctx.store.find_user_by_login(username.strip())
        info = await login.resolve_link(responses[0])
        if info is not None and (user is None or user.id != info.user.id):
            info = None  # a link used under someone else's name is no link at all
        await login.send_token(info, self._peer, self._origin)
        assert info is not None
        self._stage, self._info = "token", info
        return ("", f"A one-time token was sent to {_masked(info)}.", "", [(_TOKEN_PROMPT, True)])

    async def _on_token(self, responses: asyncssh.auth.KbdIntResponse) -> asyncssh.auth.KbdIntChallenge:
        login = self._ctx.login
        login.limit_client(self._origin)
        raw = responses[0] if len(responses) == 1 else ""
        try:
            _cookie, live = await login.verify(self._info, raw, self._peer, self._origin)
        except LoginRefused as exc:
            if exc.reason == "wrong_token" and self._token_tries + 1 < self._server.max_auth_tries:
                self._token_tries += 1
                return (
                    "",
                    "That token is not valid. Check the latest message and try again.",
                    "",
                    [(_TOKEN_PROMPT, True)],
                )
            raise
        self._signed_in(live)
        self._stage = "welcome"
        names = await self._target_names(live)
        ends = f"{live.grant.end:%Y-%m-%d %H:%M} UTC"
        return (
            "",
            f"Signed in. This access ends at {ends}. SSH targets: {names or 'none'}.",
            "",
            [],
        )

    def _signed_in(self, live: LiveSession) -> None:
        self._live = live
        self._meter.session = live
        # In the live registry (GET /api/v1/sessions) with its byte counts; cut with its session.
        self._registered = self._ctx.sessions.open_connection(
            live, "ssh-jump", None, self._origin, self._closer, count=False
        )
        self._watch = SessionWatch(
            self._ctx.sessions, live, self._peer, None, self.disconnect, on_tick=self._flush_meter
        )
        self._watch.start()
        log.info("jump.signed_in session=%s peer=%s", live.id, self._origin)

    async def _target_names(self, live: LiveSession) -> str:
        names = []
        for tid in sorted(live.grant.targets):
            target = await self._server.targets.get(tid)
            if target is not None:
                names.append(f"{target.name} ({target.host}:{target.port})")
        return ", ".join(names)

    def _refuse(self, message: str) -> bool:
        """Fail this round, saying why in an auth banner (OpenSSH prints it).

        A refusal after a token was sent ends the connection: another round would send
        another token, and the per-link send limit is better kept for a fresh attempt.
        """
        self._failures += 1
        final = self._stage == "token" or self._failures >= self._server.max_auth_tries
        self._stage, self._info = "link", None
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send_auth_banner(message.rstrip() + "\r\n")
            if final:
                reason = (
                    "sign-in failed; connect again to get a new token"
                    if self._failures < self._server.max_auth_tries
                    else "too many failed sign-in attempts"
                )
                asyncio.get_running_loop().call_soon(
                    self.disconnect, reason, asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE
                )
        return False

    # channels --------------------------------------------------------------------
    def session_requested(self) -> bool:
        self._refused("session", "", "not_allowed")
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, _NOT_A_SHELL)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Awaitable[asyncssh.SSHTCPSession[bytes]]:
        return cast("Awaitable[asyncssh.SSHTCPSession[bytes]]", self._open_direct(dest_host, dest_port))

    async def _open_direct(self, host: str, port: int) -> _ChannelSide:
        live = self._live
        requested = f"{host}:{port}"
        if live is None or live.ended:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "not signed in")
        if self._channels >= self._server.max_channels:
            self._refused("direct-tcpip", requested, "too_many_channels")
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_RESOURCE_SHORTAGE, f"at most {self._server.max_channels} channels at once"
            )
        target = await self._server.targets.resolve(host, port, live.grant.targets)
        if target is None or target.host is None or target.port is None:
            self._ctx.metrics.denied.labels(DenyReason.TARGET_NOT_GRANTED.value).inc()
            self._refused("direct-tcpip", requested, DenyReason.TARGET_NOT_GRANTED.value)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"{requested}: {explain(DenyReason.TARGET_NOT_GRANTED)}",
            )
        decision = self._ctx.sessions.check(live, self._peer, target.id)
        if isinstance(decision, Deny):
            self._refused("direct-tcpip", requested, decision.reason.value, target.name)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, explain(decision.reason, live.grant)
            )
        loop = asyncio.get_running_loop()
        meter = self._meter
        try:
            _transport, upstream = await asyncio.wait_for(
                loop.create_connection(lambda: _Upstream(meter), target.host, target.port),
                self._server.connect_timeout,
            )
        except (OSError, TimeoutError):
            self._refused("direct-tcpip", requested, "unreachable", target.name)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_CONNECT_FAILED, f"{target.name} could not be reached from the gateway"
            ) from None
        if self._conn is None or self._conn.is_closed():
            # The client left during the connect: asyncssh drops this channel without
            # telling its session, so nothing else would ever close the target connection.
            upstream.close()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "the SSH connection closed")
        side = _ChannelSide(upstream, meter)
        self._channels += 1
        self._ctx.metrics.sessions_active.labels("ssh").inc()
        side.closed.add_done_callback(self._channel_closed)
        self._server.spawn(
            audit(
                self._ctx.store,
                f"user:{live.user_id}",
                "ssh.channel.opened",
                target.id,
                "ok",
                self._origin,
                {
                    "request_id": live.request_id,
                    "session_id": live.id,
                    "target": target.name,
                    "kind": "direct-tcpip",
                },
            )
        )
        return side

    def _channel_closed(self, _: asyncio.Future[None]) -> None:
        self._channels -= 1
        self._ctx.metrics.sessions_active.labels("ssh").dec()

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self._refused("tcpip-forward", f"{listen_host}:{listen_port}", "not_allowed")
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self._refused("streamlocal-forward", "", "not_allowed")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._refused("direct-streamlocal", "", "not_allowed")
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "only TCP connections to your SSH targets"
        )

    def tun_requested(self, unit: int | None) -> bool:
        self._refused("tun", "", "not_allowed")
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "tunnels are not allowed")

    def tap_requested(self, unit: int | None) -> bool:
        self._refused("tap", "", "not_allowed")
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "tunnels are not allowed")

    def _refused(self, kind: str, requested: str, reason: str, target: str = "") -> None:
        live = self._live
        actor = f"user:{live.user_id}" if live is not None else "ssh:unauthenticated"
        details: dict[str, str | int] = {"kind": kind, "reason": reason}
        if requested:
            details["requested"] = requested
        if target:
            details["target"] = target
        if live is not None:
            details["request_id"] = live.request_id
            details["session_id"] = live.id
        log.info("jump.channel_refused kind=%s reason=%s peer=%s", kind, reason, self._origin)
        self._server.spawn(
            audit(
                self._ctx.store, actor, "ssh.channel.refused", target or kind, "denied", self._origin, details
            )
        )

    def _flush_meter(self) -> None:
        m = self._meter
        if self._registered is not None:
            self._registered.bytes_in, self._registered.bytes_out = m.up, m.down
        if m.active and self._watch is not None:
            self._watch.mark()
        m.active = False
        if m.up != m.flushed_up:
            self._ctx.metrics.tunnel_bytes.labels("ssh", "up").inc(m.up - m.flushed_up)
            m.flushed_up = m.up
        if m.down != m.flushed_down:
            self._ctx.metrics.tunnel_bytes.labels("ssh", "down").inc(m.down - m.flushed_down)
            m.flushed_down = m.down


def _masked(info: LinkInfo) -> str:
    user = info.user
    if user.channel is Channel.SMS:
        return mask_phone(user.phone or "")
    return mask_email(user.email or "")
