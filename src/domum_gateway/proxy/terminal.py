"""The browser SSH terminal: page ``/ssh/{target}`` and websocket ``/ws/ssh/{target}``.

The page runs xterm.js (from npm at build time, served from ``/static/vendor/xterm/``)
and our own ``/static/terminal/*.js``; no inline script or style, so the gateway's strict
Content-Security-Policy holds. The websocket carries terminal bytes as binary frames
both ways; the browser sends ``{"type": "resize", "cols": C, "rows": R}`` as text frames.

The gateway is the SSH client (asyncssh). Before anything is sent to the target it
checks the target's host key against the key registered for it (``ssh_host_key``):
a missing or different key stops the connection with a message in the terminal and an
audit event; nothing is ever trusted on first use. The user signs in to the target with
the target's own password or keyboard-interactive prompts, relayed through the terminal
by a small line editor here: the user name first, then each prompt. What is typed is
passed to asyncssh and forgotten; it is never stored or logged.

Two limits apply once TCP connects: the target has ``ssh.handshake_timeout`` seconds to
exchange versions and keys and ask for credentials (a host that accepts the connection
and then says nothing, or stalls mid-exchange, is given up on quickly), and the person
has ``_LOGIN_TIMEOUT`` to sign in. asyncssh's own ``connect_timeout`` cannot be the first
(it also counts the person's typing), nor its ``login_timeout`` (the same, from TCP on).

The banner names the user, the target and when access ends; a warning line appears five
minutes before the window closes. The connection is attached to the session: revoke,
window end, idle, logout or terminate close the SSH connection and the websocket (code
1008, with the reason) at once.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import socket
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import asyncssh
import jinja2
from aiohttp import WSMsgType, web

from ..auth.decide import Deny, DenyReason, explain
from ..auth.origin import IPAddress
from ..errors import Forbidden, Unauthorized
from ..model import Target
from .context import CTX, PublicContext, client_of, session_of
from .sessions import Connection, LiveSession
from .ssh_common import (
    CLIENT_ENCRYPTION,
    CLIENT_KEX,
    CLIENT_MAC,
    SessionWatch,
    SshTargets,
    audit,
    parse_host_key,
)
from .watch import Channel, WatchHub

__all__ = ["WARN_BEFORE", "LineEditor", "SignInFirst", "TerminalRefused", "add_terminal_routes"]

log = logging.getLogger("domum.ssh.terminal")

WARN_BEFORE = timedelta(minutes=5)
"""How long before the access window closes the terminal shows a warning line."""

_STATIC = Path(__file__).resolve().parent.parent / "static"
_CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    )
)
_LOGIN_TIMEOUT = 180.0  # the person types a password: minutes, not seconds
_HANDSHAKE_HELP = (
    "The host accepted the connection but did not answer as an SSH server should; "
    "try again later or tell your administrator."
)
_MAX_AUTH_ATTEMPTS = 3
_MAX_PENDING = 64 * 1024
_MAX_MESSAGE = 1024 * 1024
_CLOSE_POLICY = 1008
_CLOSE_GOING_AWAY = 1001

_env = jinja2.Environment(
    loader=jinja2.PackageLoader("domum_gateway", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


class SignInFirst(Unauthorized):
    type = "sign-in-first"
    title = "Sign in first"


class TerminalRefused(Forbidden):
    type = "terminal-refused"
    title = "The terminal cannot open"


_TARGETS = web.AppKey("ssh_terminal_targets", SshTargets)


class _Registry:
    """The live terminals of one app, so shutdown can tell each why it ends."""

    def __init__(self) -> None:
        self.live: set[_Terminal] = set()


_LIVE = web.AppKey("ssh_terminals", _Registry)
_HUB = web.AppKey("ssh_watch_hub", WatchHub)


def add_terminal_routes(app: web.Application, watch: WatchHub | None = None) -> None:
    """Register the terminal page, its websocket and its static files on the public app.

    ``watch`` is the hub auditors watch terminals through (``proxy/watch.py``); the
    composition root shares it with the admin listener.
    """
    ctx = app[CTX]
    app[_TARGETS] = SshTargets(ctx.store, ctx.bus)
    app[_LIVE] = _Registry()
    app[_HUB] = watch if watch is not None else WatchHub()
    app.router.add_get("/ssh/{target}", _page)
    app.router.add_get("/ws/ssh/{target}", _socket)
    app.router.add_static("/static/terminal/", _STATIC / "terminal")
    vendor = _STATIC / "vendor" / "xterm"
    if vendor.is_dir():
        app.router.add_static("/static/vendor/xterm/", vendor)
    else:
        log.warning("terminal.assets_missing path=%s (run `make assets`)", vendor)

    async def on_shutdown(app: web.Application) -> None:
        for term in list(app[_LIVE].live):
            term.terminate("the gateway is shutting down", _CLOSE_GOING_AWAY)

    async def on_cleanup(app: web.Application) -> None:
        app[_TARGETS].close()

    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)


# page --------------------------------------------------------------------------------
async def _allowed_target(request: web.Request) -> tuple[PublicContext, LiveSession, Target, IPAddress]:
    """The session and target of a terminal request, or a refusal the user can act on."""
    ctx = request.app[CTX]
    live = await session_of(request)
    if live is None:
        raise SignInFirst(
            "Open the personal link from your message and sign in, then open the terminal from your portal."
        )
    peer = client_of(request)
    target = await request.app[_TARGETS].get(request.match_info["target"])
    if target is None or target.id not in live.grant.targets:
        # The same words whether the target exists or not.
        ctx.metrics.denied.labels(DenyReason.TARGET_NOT_GRANTED.value).inc()
        raise TerminalRefused(explain(DenyReason.TARGET_NOT_GRANTED, live.grant))
    decision = ctx.sessions.check(live, peer, target.id)
    if isinstance(decision, Deny):
        if live.ended:
            raise SignInFirst(explain(decision.reason, live.grant))
        raise TerminalRefused(explain(decision.reason, live.grant))
    return ctx, live, target, peer


async def _page(request: web.Request) -> web.Response:
    """GET /ssh/{target}: the terminal page."""
    _ctx, live, target, _peer = await _allowed_target(request)
    assets = (_STATIC / "vendor" / "xterm" / "xterm.mjs").is_file()
    body = _env.get_template("public/terminal.html").render(
        title=f"SSH · {target.name}",
        target=target.name,
        endpoint=f"{target.host}:{target.port}",
        ends=_at(live),
        socket_path=f"/ws/ssh/{target.name}",
        assets=assets,
    )
    return web.Response(
        text=body,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Content-Security-Policy": _CSP},
    )


# websocket -----------------------------------------------------------------------------
def _origin_allowed(request: web.Request) -> bool:
    """Only the gateway's own pages may open a terminal (cross-site websocket hijacking).

    The Origin must be the configured ``public.base_url`` or the origin this request was
    made to (scheme of the connection, Host header), compared exactly after normalising
    default ports. A missing Origin (not a browser, or a stripped header) is refused too.
    """
    origin = request.headers.get("Origin")
    if not origin:
        return False
    mine = {
        _normal_origin(request.app[CTX].settings.public.base_url),
        _normal_origin(f"{request.scheme}://{request.host}"),
    }
    return _normal_origin(origin) in mine - {None}


def _normal_origin(text: str) -> tuple[str, str, int] | None:
    scheme, sep, rest = text.strip().partition("://")
    if not sep or not rest or "/" in rest.rstrip("/"):
        return None
    scheme = scheme.lower()
    host, port = rest.rstrip("/").lower(), {"https": 443, "http": 80}.get(scheme)
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        name, tail = host[: end + 1], host[end + 1 :]
    else:
        name, _, tail = host.partition(":")
        tail = f":{tail}" if tail else ""
    if tail:
        if not tail.startswith(":") or not tail[1:].isdigit():
            return None
        port = int(tail[1:])
    if port is None or not name:
        return None
    return scheme, name, port


async def _socket(request: web.Request) -> web.StreamResponse:
    """GET /ws/ssh/{target}: the terminal's websocket."""
    ctx = request.app[CTX]
    if not _origin_allowed(request):
        ctx.metrics.denied.labels("origin_mismatch").inc()
        log.info("terminal.origin_refused origin=%r", request.headers.get("Origin", "")[:200])
        raise web.HTTPForbidden(text="This terminal can only be opened from the gateway's own page.\n")
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=_MAX_MESSAGE, compress=False)
    await ws.prepare(request)
    try:
        _ctx, live, target, peer = await _allowed_target(request)
    except (SignInFirst, TerminalRefused) as exc:
        await _refuse_ws(ws, exc.detail)
        return ws
    terminal = _Terminal(ctx, ws, live, target, peer)
    terminal.hub = request.app[_HUB]
    request.app[_LIVE].live.add(terminal)
    try:
        await terminal.run()
    finally:
        request.app[_LIVE].live.discard(terminal)
    return ws


async def _refuse_ws(ws: web.WebSocketResponse, message: str) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_bytes(_notice(message, error=True))
        await ws.close(code=_CLOSE_POLICY, message=_close_reason(message))


def _notice(text: str, *, error: bool = False) -> bytes:
    colour = "1;31" if error else "1;33"
    return f"\r\n\x1b[{colour}m{text}\x1b[0m\r\n".encode()


def _close_reason(text: str) -> bytes:
    """A websocket close reason: at most 123 bytes of UTF-8, cut on a character boundary."""
    data = text.encode()
    if len(data) <= 123:
        return data
    return data[:120].decode(errors="ignore").encode() + b"..."


def _at(live: LiveSession) -> str:
    return f"{live.grant.end:%Y-%m-%d %H:%M} UTC"


class _Ended(Exception):
    """The person cancelled at a prompt (Ctrl-C, Ctrl-D) or the socket went away."""


class LineEditor:
    """One line of input from raw keystrokes, as a terminal's cooked mode would read it.

    Pure: :meth:`feed` takes bytes from the browser and returns what to echo, the
    finished line (or None) and the bytes after the Enter key. Echo is off for secrets.
    Understood: printable text (UTF-8), Backspace/DEL, Ctrl-U (erase line), Enter (CR
    or LF), Ctrl-C and Ctrl-D on an empty line (cancel); escape sequences (arrows, ...)
    are skipped.
    """

    CANCEL = "\x00cancel"

    def __init__(self, echo: bool, limit: int = 1024) -> None:
        self.echo = echo
        self.limit = limit
        self._chars: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._escape = 0  # 0: none, 1: after ESC, 2: inside CSI/SS3

    def feed(self, data: bytes) -> tuple[bytes, str | None, bytes]:
        out: list[str] = []
        for i in range(len(data)):
            byte = data[i : i + 1]
            if self._escape:
                self._escape = self._skip_escape(byte)
                continue
            if byte == b"\x1b":
                self._escape = 1
                continue
            if byte in (b"\r", b"\n"):
                rest = data[i + 1 :]
                if byte == b"\r" and rest.startswith(b"\n"):
                    rest = rest[1:]
                out.append("\r\n")
                line = "".join(self._chars)
                self._chars.clear()
                return "".join(out).encode(), line, rest
            if byte in (b"\x03", b"\x04") and (byte == b"\x03" or not self._chars):
                out.append("^C\r\n" if byte == b"\x03" else "\r\n")
                return "".join(out).encode(), self.CANCEL, b""
            if byte in (b"\x7f", b"\x08"):
                if self._chars:
                    self._chars.pop()
                    if self.echo:
                        out.append("\b \b")
                continue
            if byte == b"\x15":
                if self.echo:
                    out.append("\b \b" * len(self._chars))
                self._chars.clear()
                continue
            if byte[0] < 0x20:
                continue
            for ch in self._decoder.decode(byte):
                if len(self._chars) < self.limit and ch.isprintable():
                    self._chars.append(ch)
                    if self.echo:
                        out.append(ch)
        return "".join(out).encode(), None, b""

    @staticmethod
    def _skip_escape(byte: bytes) -> int:
        if byte in (b"[", b"O"):
            return 2
        code = byte[0]
        # Inside CSI: parameters and intermediates until a final byte 0x40-0x7E.
        return 2 if 0x20 <= code < 0x40 else 0


class _TargetClient(asyncssh.SSHClient):
    """asyncssh's callbacks for one terminal: host key pinning and relayed prompts."""

    def __init__(self, terminal: _Terminal) -> None:
        self._terminal = terminal
        self.presented: asyncssh.SSHKey | None = None
        self._attempts = 0
        self.answered = False  # the target answered a sign-in request: the handshake is done
        self.timed_out = False  # the handshake deadline passed and cancelled the connect
        self._deadline: asyncio.TimerHandle | None = None

    def start_deadline(self, within: float, connecting: asyncio.Future[Any]) -> None:
        """Cancel ``connecting`` unless the target asks for credentials within ``within`` s."""

        def expire() -> None:
            self.timed_out = True
            connecting.cancel()

        self._deadline = asyncio.get_running_loop().call_later(within, expire)
        connecting.add_done_callback(lambda _: self.stop_deadline())

    def stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _answered(self) -> None:
        # Versions and keys are exchanged and the target answered the first sign-in
        # request: from here on the person's typing sets the pace (login_timeout).
        self.answered = True
        self.stop_deadline()

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # Only reached when the key is not the registered one: remember it for the message.
        self.presented = key
        return False

    def auth_banner_received(self, msg: str, lang: str) -> None:
        self._answered()
        self._terminal.write_soon(_crlf(msg).encode())

    def public_key_auth_requested(self) -> None:
        return None

    def kbdint_auth_requested(self) -> str:
        self._answered()
        return ""

    async def kbdint_challenge_received(
        self, name: str, instructions: str, lang: str, prompts: Sequence[tuple[str, bool]]
    ) -> list[str] | None:
        if prompts:
            if not self._next_attempt():
                return None
        for text in (name, instructions):
            if text:
                await self._terminal.write(_crlf(text.rstrip("\n") + "\n").encode())
        answers = []
        for prompt, echo in prompts:
            answers.append(await self._terminal.read_line(_crlf(prompt), echo=echo))
        return answers

    async def password_auth_requested(self) -> str | None:
        self._answered()
        if not self._next_attempt():
            return None
        return await self._terminal.read_line(
            f"{self._terminal.login}@{self._terminal.target.name}'s password: ", echo=False
        )

    def _next_attempt(self) -> bool:
        if self._attempts >= _MAX_AUTH_ATTEMPTS:
            return False
        if self._attempts:
            self._terminal.write_soon(b"Permission denied, please try again.\r\n")
        self._attempts += 1
        return True


def _crlf(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "\r\n")


class _Terminal:
    """One browser terminal: websocket <-> SSH session, tied to a gateway session."""

    def __init__(
        self,
        ctx: PublicContext,
        ws: web.WebSocketResponse,
        live: LiveSession,
        target: Target,
        peer: IPAddress,
    ) -> None:
        self.ctx = ctx
        self.ws = ws
        self.live = live
        self.target = target
        self.peer = peer
        self.login = ""
        self.cols, self.rows = 80, 24
        self._pending = bytearray()
        self._input = asyncio.Event()
        self._stdin: asyncssh.SSHWriter[bytes] | None = None
        self._conn: asyncssh.SSHClientConnection | None = None
        self._main: asyncio.Task[None] | None = None
        self._ending: tuple[int, str] | None = None
        self._warning: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._up = self._down = self._flushed_up = self._flushed_down = 0
        self._watch = SessionWatch(
            ctx.sessions, live, peer, target.id, self.terminate, on_tick=self._flush_bytes
        )
        self._opened = False
        self._outcome = "closed"
        self._announced = False  # the reason for ending was already written to the terminal
        self._registered: Connection | None = None
        self.hub: WatchHub | None = None
        self._tap: Channel | None = None  # auditors watching (read-only, nothing kept)

    # lifecycle ---------------------------------------------------------------------
    async def run(self) -> None:
        sessions = self.ctx.sessions
        # In the live registry (GET /api/v1/sessions), cut with its session or on its own.
        self._registered = sessions.open_connection(
            self.live, "ssh-terminal", self.target.name, str(self.peer), self._closer, count=False
        )
        if self.hub is not None:
            self._tap = self.hub.open(self._registered.id, self.cols, self.rows, self.write_soon)
        self._watch.start()
        reader = asyncio.ensure_future(self._read_socket())
        self._main = asyncio.ensure_future(self._serve())
        try:
            await asyncio.wait({reader, self._main}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (self._main, reader):
                task.cancel()
            for task in (self._main, reader):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._cleanup()

    async def _cleanup(self) -> None:
        if self.hub is not None and self._tap is not None:
            self.hub.close(self._tap, *(self._ending or (1000, "the SSH session ended")))
        self._watch.cancel()
        if self._warning is not None:
            self._warning.cancel()
        if self._conn is not None:
            self._conn.close()
        self._flush_bytes()
        # The user hears why first; the registry (which times the cut-off) and the audit
        # log learn once the websocket is closed.
        code, reason = self._ending or (1000, "the SSH session ended")
        try:
            if not self.ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError, asyncio.CancelledError):
                    if self._ending is not None and not self._announced:
                        await self.ws.send_bytes(_notice(f"Session ended: {reason}.", error=code != 1000))
                    await self.ws.close(code=code, message=_close_reason(reason))
        finally:
            if self._registered is not None:
                self.ctx.sessions.close_connection(self._registered)
        if self._opened:
            self.ctx.metrics.sessions_active.labels("ssh").dec()
            await self._audit(
                "ssh.terminal.closed",
                "ok",
                {"bytes_up": self._up, "bytes_down": self._down, "reason": self._outcome},
            )

    def _closer(self, reason: str) -> None:
        # The session manager calls this synchronously when the session ends.
        self.terminate(reason)

    def terminate(self, reason: str, code: int = _CLOSE_POLICY) -> None:
        """End this terminal now with ``reason`` (shown, and sent as the close reason)."""
        if self._ending is None:
            self._ending = (code, reason)
            self._outcome = reason
        if self._conn is not None:
            self._conn.close()
        if self._main is not None:
            self._main.cancel()

    # the session ----------------------------------------------------------------------
    async def _serve(self) -> None:
        await self.write(await self._banner())
        self._schedule_warning()
        key = parse_host_key(self.target.ssh_host_key)
        if key is None:
            await self._refuse(
                "host_key_missing",
                f"No host key is registered for {self.target.name}, so the gateway cannot check it is "
                "talking to the real host and will not connect. Ask your administrator to register "
                "the target's SSH host key.",
                {},
            )
            return
        try:
            self.login = await self._ask_login()
            conn = await self._connect(key)
        except _Ended:
            if self._ending is None:
                self._ending, self._announced = (1000, "cancelled"), True
            return
        if conn is None:
            return
        self._conn = conn
        try:
            stdin, stdout, stderr = await conn.open_session(
                term_type="xterm-256color",
                term_size=(self.cols, self.rows),
                encoding=None,
                request_pty="force",
            )
        except (asyncssh.Error, OSError) as exc:
            await self._refuse("session_refused", f"{self.target.name} refused to start a shell: {exc}.", {})
            return
        self._stdin = stdin
        if self._pending:  # typed ahead while connecting; before anything typed from now on
            data = bytes(self._pending)
            self._pending.clear()
            self._to_target(data)
        self._opened = True
        self.ctx.metrics.sessions_active.labels("ssh").inc()
        await self._audit("ssh.terminal.opened", "ok", {})
        await asyncio.gather(self._pump(stdout), self._pump(stderr))

    async def _banner(self) -> bytes:
        user = await self.ctx.store.get_user(self.live.user_id)
        who = user.name if user is not None else self.live.user_id
        if user is not None and user.email:
            who += f" <{user.email}>"
        lines = [
            "\x1b[1mDomum Gateway\x1b[0m SSH terminal",
            f"  User:        {who}",
            f"  Target:      {self.target.name} ({self.target.host}:{self.target.port})",
            f"  Access ends: {_at(self.live)}",
            "  This session is recorded in the audit log (not what you type).",
            "",
        ]
        return ("\r\n".join(lines) + "\r\n").encode()

    def _schedule_warning(self) -> None:
        left = (self.live.grant.end - self.ctx.clock.now()).total_seconds()
        lead = WARN_BEFORE.total_seconds()
        if left <= lead:
            self._warn()
        elif left - lead < 40 * 86400:
            self._warning = asyncio.get_running_loop().call_later(left - lead, self._warn)

    def _warn(self) -> None:
        left = max(0, round((self.live.grant.end - self.ctx.clock.now()).total_seconds() / 60))
        when = "in less than a minute" if left < 1 else f"in {left} minute{'s' if left != 1 else ''}"
        self.write_soon(
            _notice(f"*** Your access ends at {_at(self.live)} ({when}). Save your work now. ***")
        )

    async def _ask_login(self) -> str:
        while True:
            login = (await self.read_line("login as: ", echo=True)).strip()
            if login and len(login) <= 64 and all(c.isprintable() and not c.isspace() for c in login):
                return login
            await self.write(b"Type the user name to sign in to the target with.\r\n")

    async def _connect(self, key: asyncssh.SSHKey) -> asyncssh.SSHClientConnection | None:
        target = self.target
        assert target.host is not None and target.port is not None
        client = _TargetClient(self)
        try:
            sock = await _tcp_connect(target.host, target.port, self.ctx.settings.proxy.connect_timeout)
        except OSError:
            await self._refuse("unreachable", f"{target.name} could not be reached from the gateway.", {})
            return None
        within = self.ctx.settings.ssh.handshake_timeout
        connecting = asyncio.ensure_future(
            asyncssh.connect(
                sock=sock,
                host=target.host,
                port=target.port,
                client_factory=lambda: client,
                config=[],
                known_hosts=([key], [], []),
                x509_trusted_certs=None,
                username=self.login,
                client_keys=[],
                agent_path=None,
                agent_forwarding=False,
                x11_forwarding=False,
                public_key_auth=False,
                host_based_auth=False,
                gss_kex=False,
                gss_auth=False,
                kbdint_auth=True,
                password_auth=True,
                preferred_auth=("keyboard-interactive", "password"),
                kex_algs=CLIENT_KEX,
                encryption_algs=CLIENT_ENCRYPTION,
                mac_algs=CLIENT_MAC,
                compression_algs=("none",),
                connect_timeout=None,
                login_timeout=_LOGIN_TIMEOUT,
                keepalive_interval=30.0,
                keepalive_count_max=3,
            )
        )
        client.start_deadline(within, connecting)
        try:
            conn = await connecting
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not client.timed_out or (task is not None and task.cancelling()):
                raise  # the terminal itself is ending; asyncssh closed the connection
            sock.close()
            log.info("terminal.handshake_timeout target=%s within=%g", target.name, within)
            await self._refuse(
                "handshake_timeout",
                f"{target.name} did not complete the SSH handshake within {within:g} s. {_HANDSHAKE_HELP}",
                {"timeout": f"{within:g}"},
            )
            return None
        except asyncssh.HostKeyNotVerifiable:
            sock.close()
            presented = client.presented.get_fingerprint() if client.presented is not None else "unknown"
            await self._refuse(
                "host_key_mismatch",
                f"The host key {target.name} presented ({presented}) is not the one registered for it "
                f"({key.get_fingerprint()}). The gateway stopped before signing in, because this can "
                "mean the connection is being intercepted. Tell your administrator.",
                {"presented": presented, "registered": key.get_fingerprint()},
            )
            return None
        except asyncssh.PermissionDenied:
            sock.close()
            await self._refuse("auth_failed", f"Signing in to {target.name} failed.", {})
            return None
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            sock.close()
            log.info("terminal.connect_failed target=%s type=%s", target.name, type(exc).__name__)
            if not client.answered:
                message = f"{target.name} did not complete the SSH handshake. {_HANDSHAKE_HELP}"
                await self._refuse("handshake_failed", message, {})
            else:
                await self._refuse("unreachable", f"The SSH connection to {target.name} failed.", {})
            return None
        return conn

    async def _refuse(self, reason: str, message: str, details: dict[str, str | int]) -> None:
        self._outcome = reason
        self.ctx.metrics.denied.labels(f"ssh_{reason}").inc()
        await self._audit("ssh.terminal.refused", reason, details)
        await self.write(_notice(message, error=True))
        short = message.split(". ")[0].rstrip(".")
        if self._ending is None:
            self._ending, self._announced = (_CLOSE_POLICY, short), True

    async def _audit(self, action: str, outcome: str, extra: dict[str, str | int]) -> None:
        live = self.live
        await audit(
            self.ctx.store,
            f"user:{live.user_id}",
            action,
            self.target.id,
            outcome,
            str(self.peer),
            {
                "request_id": live.request_id,
                "session_id": live.id,
                "target": self.target.name,
                "kind": "terminal",
                **extra,
            },
        )

    # bytes in and out -----------------------------------------------------------------
    async def _pump(self, reader: asyncssh.SSHReader[bytes]) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            self._down += len(data)
            await self.ws.send_bytes(data)
            if self._tap is not None:
                self._tap.publish(data)

    async def _read_socket(self) -> None:
        async for msg in self.ws:
            if msg.type is WSMsgType.BINARY:
                data: bytes = msg.data
                self._watch.mark()
                if self._stdin is not None:
                    self._to_target(data)
                    await self._stdin.drain()
                elif len(self._pending) + len(data) <= _MAX_PENDING:
                    self._pending += data
                    self._input.set()
            elif msg.type is WSMsgType.TEXT:
                self._control(msg.data)
            else:
                return

    def _to_target(self, data: bytes) -> None:
        assert self._stdin is not None
        self._up += len(data)
        self._stdin.write(data)

    def _control(self, text: str) -> None:
        try:
            message: Any = json.loads(text)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("type") != "resize":
            return
        cols, rows = message.get("cols"), message.get("rows")
        if not (isinstance(cols, int) and isinstance(rows, int) and 0 < cols <= 1000 and 0 < rows <= 1000):
            return
        self.cols, self.rows = cols, rows
        if self._tap is not None:
            self._tap.resize(cols, rows)
        if self._stdin is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                channel = cast(asyncssh.SSHClientChannel[bytes], self._stdin.channel)
                channel.change_terminal_size(cols, rows)

    async def read_line(self, prompt: str, *, echo: bool) -> str:
        """Show ``prompt`` and read one line typed in the terminal (echoed or not)."""
        await self.write(prompt.encode())
        editor = LineEditor(echo)
        while True:
            if self._pending:
                data = bytes(self._pending)
                self._pending.clear()
                out, line, rest = editor.feed(data)
                if out:
                    await self.write(out)
                if line is not None:
                    self._pending[:0] = rest
                    if line == LineEditor.CANCEL:
                        raise _Ended
                    return line
            self._input.clear()
            await self._input.wait()

    async def write(self, data: bytes) -> None:
        if not self.ws.closed:
            await self.ws.send_bytes(data)
            if self._tap is not None:
                self._tap.publish(data)

    def write_soon(self, data: bytes) -> None:
        """Write from a synchronous callback (ordering with awaited writes is kept per call)."""
        task = asyncio.ensure_future(self._write_quietly(data))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write_quietly(self, data: bytes) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.write(data)

    def _flush_bytes(self) -> None:
        if self._registered is not None:
            self._registered.bytes_in, self._registered.bytes_out = self._up, self._down
        metrics = self.ctx.metrics.tunnel_bytes
        if self._up != self._flushed_up:
            metrics.labels("ssh", "up").inc(self._up - self._flushed_up)
            self._flushed_up = self._up
        if self._down != self._flushed_down:
            metrics.labels("ssh", "down").inc(self._down - self._flushed_down)
            self._flushed_down = self._down


async def _tcp_connect(host: str, port: int, within: float) -> socket.socket:
    """A connected, non-blocking TCP socket to ``host:port`` (first address that answers)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"{host}:{port}: no address")
    for family, kind, proto, _name, addr in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, addr), within)
        except (OSError, TimeoutError) as exc:
            sock.close()
            last = exc if isinstance(exc, OSError) else OSError(str(exc))
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last
