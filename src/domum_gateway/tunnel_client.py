"""``domum-gateway connect``: reach an RDP/TCP target through the gateway, no VPN.

    domum-gateway connect https://gateway:8443/a/<link> --target rdp01 --listen 127.0.0.1:13389

1. The link names the gateway (``https://host:port``; plain http is refused, there is no
   insecure mode: the certificate is checked against ``--ca FILE`` or the system's trust
   store).
2. ``POST /cli/v1/token`` has a one-time token sent to the user; the user types it
   (``--token-stdin`` reads one line, for scripts); ``POST /cli/v1/verify`` trades it for
   a short-lived tunnel ticket, renewed in the background while the session lives.
3. The client listens on ``--listen``; each accepted connection becomes one websocket
   ``wss://host:port/ws/tcp/<target>`` (``Authorization: Bearer <ticket>``), bridged by
   the same pump the gateway uses (:mod:`domum_gateway.proxy.tunnel_wire`).
4. A status line on stderr shows live connections and bytes. When the gateway ends the
   grant (a websocket closed with 1008, or the ticket cannot be renewed) the client
   says why and exits with status 1.

Exit status: 0 stopped by the user (Ctrl-C, SIGTERM: the session is signed out),
1 access refused or ended, 2 bad usage (arguments, unknown target, port in use),
3 the gateway could not be reached, its certificate not verified, or it shut down.

A client-side module: it imports the wire format and the settings/PKI helpers, nothing
of the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import ipaddress
import json
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, cast
from urllib.parse import quote

import aiohttp
from yarl import URL

from . import __version__
from .pki import client_ssl_context
from .proxy.tunnel_wire import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    Scratch,
    TcpEnd,
    WsEnd,
    accept_key,
    new_key,
)
from .settings import HostPort

__all__ = [
    "ConnectError",
    "ConnectOptions",
    "Forwarder",
    "TunnelClient",
    "add_connect_arguments",
    "connect_main",
    "format_bytes",
    "run_connect",
]

EXIT_STOPPED = 0
EXIT_ACCESS = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_MAX_HANDSHAKE = 64 * 1024
_HANDSHAKE_TIMEOUT = 15.0


class ConnectError(Exception):
    """Stops the client with ``exit_code`` and a sentence for the user."""

    def __init__(self, message: str, exit_code: int, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status  # the gateway's HTTP status, when it answered


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    link: str
    target: str
    listen: HostPort
    token_stdin: bool = False
    ca: Path | None = None
    rdp_file: Path | None = None
    status_interval: float | None = None  # None: 1 s on a terminal, 30 s otherwise


@dataclass(frozen=True, slots=True)
class _Gateway:
    base: URL  # https://host:port
    host: str
    port: int
    link: str


def _parse_link(link: str) -> _Gateway:
    try:
        url = URL(link.strip())
    except ValueError:
        raise ConnectError(f"{link!r} is not a personal link (https://gateway/a/...)", EXIT_USAGE) from None
    if url.scheme != "https" or not url.host:
        raise ConnectError(
            "The personal link must start with https:// (the gateway is only reached over TLS).", EXIT_USAGE
        )
    if "/a/" not in url.path:
        raise ConnectError("That is not a personal link: it should contain /a/<code>.", EXIT_USAGE)
    port = url.port or 443
    return _Gateway(URL.build(scheme="https", host=url.host, port=port), url.host, port, str(url))


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


class _Local(TcpEnd):
    """A connection accepted on the local listener."""

    __slots__ = ("client", "opener")

    def __init__(self, client: Forwarder) -> None:
        super().__init__()
        self.client = client
        self.opener: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.client._accepted(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ws is None and self.opener is not None:
            self.opener.cancel()  # gone before its websocket was up
        super().connection_lost(exc)


class _ClientWs(WsEnd):
    """The websocket of one local connection: HTTP upgrade, then the shared pump."""

    __slots__ = ("_headers", "_hs", "_key_text", "_status", "gone", "handshake", "owner", "refusal")

    def __init__(self, client: Forwarder, local: _Local) -> None:
        super().__init__(client.scratch, local, client=True)
        self.owner = client
        self._key_text = new_key()
        self._hs = bytearray()
        self._status = 0
        self._headers: dict[str, str] | None = None
        self.handshake: asyncio.Future[None] = self._loop.create_future()
        self.gone: asyncio.Future[None] = self._loop.create_future()
        self.refusal: tuple[int, str] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = t = cast(asyncio.Transport, transport)
        owner = self.owner
        host = f"[{owner.host}]" if ":" in owner.host else owner.host
        request = (
            f"GET {owner.path} HTTP/1.1\r\n"
            f"Host: {host}:{owner.port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key_text}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"{owner.request_headers()}"
            f"User-Agent: domum-gateway-connect/{__version__}\r\n"
            "\r\n"
        )
        t.write(request.encode("ascii"))

    def buffer_updated(self, nbytes: int) -> None:
        if self.handshake.done():
            if self.refusal is None:
                self.feed(self.scratch.view[:nbytes])
            return
        self._hs += self.scratch.view[:nbytes]
        if self._headers is not None:  # a refusal's body
            if len(self._hs) > _MAX_HANDSHAKE:
                self._refused(self._status, f"the gateway answered HTTP {self._status}")
            else:
                self._maybe_refusal_done(eof=False)
            return
        end = self._hs.find(b"\r\n\r\n")
        if end < 0:
            if len(self._hs) > _MAX_HANDSHAKE:
                self._refused(0, "the gateway sent an oversized answer")
            return
        status_line, *lines = bytes(self._hs[:end]).decode("latin-1").split("\r\n")
        del self._hs[: end + 4]
        parts = status_line.split(" ", 2)
        self._status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self._headers = headers
        if self._status != 101:
            self._maybe_refusal_done(eof=False)
            return
        if headers.get("upgrade", "").lower() != "websocket" or headers.get(
            "sec-websocket-accept"
        ) != accept_key(self._key_text):
            self._refused(0, "the gateway's websocket answer was not valid")
            return
        rest = bytes(self._hs)
        self._hs = bytearray()
        self.handshake.set_result(None)
        assert self.transport is not None
        self.start(self.transport, rest)

    def _maybe_refusal_done(self, *, eof: bool) -> None:
        """A refused upgrade: wait for its (small) body, then keep its ``detail``."""
        headers = self._headers or {}
        length = headers.get("content-length", "")
        if not eof and (not length.isdigit() or len(self._hs) < int(length)):
            return
        detail = ""
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            data = json.loads(bytes(self._hs))
            if isinstance(data, dict) and isinstance(data.get("detail"), str):
                detail = data["detail"]
        self._refused(self._status, detail or f"the gateway answered HTTP {self._status}")

    def _refused(self, status: int, detail: str) -> None:
        self.refusal = (status, detail)
        if not self.handshake.done():
            self.handshake.set_result(None)
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool:
        if not self.handshake.done():
            if self._headers is not None:
                self._maybe_refusal_done(eof=True)
            else:
                self._refused(0, "the gateway closed the connection during the handshake")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self._refused(0, "the gateway closed the connection during the handshake")
        local = self.tcp.transport
        if self.refusal is not None and local is not None:
            local.abort()
        super().connection_lost(exc)

    def closed(self) -> None:
        if not self.gone.done():
            self.gone.set_result(None)
        self.owner._ws_closed(self)


@dataclass
class _Totals:
    up: int = 0
    down: int = 0
    connections: int = 0
    refusals: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Forwarder:
    """A local listener whose every connection becomes one websocket to ``wss://host:port/path``.

    The transport half of ``connect``, usable on its own (the benchmark points it at
    websockify). Subclasses supply extra request headers and react to refusals and
    closes; by default they are only counted.
    """

    def __init__(self, host: str, port: int, path: str, ssl_context: ssl.SSLContext) -> None:
        self.host = host
        self.port = port
        self.path = path
        self.ssl = ssl_context
        self.scratch = Scratch()
        self.totals = _Totals()
        self.open: set[_ClientWs] = set()
        self.local_port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def request_headers(self) -> str:
        """Extra header lines (each ending in CRLF) for the upgrade request."""
        return ""

    async def listen(self, sock: socket.socket) -> int:
        """Accept on the bound, listening ``sock``; returns its port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Local(self), sock=sock)
        self.local_port = int(sock.getsockname()[1])
        return self.local_port

    async def shutdown(self) -> None:
        """Stop accepting and close every tunnel (waiting briefly for the handshakes)."""
        if self._server is not None:
            self._server.close()
        for ws in list(self.open):
            ws.close(CLOSE_NORMAL, "the client is exiting")
        for task in list(self._tasks):
            task.cancel()
        if self.open:
            await asyncio.wait([ws.gone for ws in self.open], timeout=3.0)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def bytes_moved(self) -> tuple[int, int]:
        """(up, down): bytes sent to and received from the target so far."""
        up = self.totals.up + sum(ws.tx for ws in self.open)
        down = self.totals.down + sum(ws.rx for ws in self.open)
        return up, down

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # hooks ------------------------------------------------------------------------------
    def on_refused(self, status: int, detail: str) -> None:
        """The gateway answered the upgrade with ``status`` (0: no valid answer)."""

    def on_closed(self, ws: _ClientWs) -> None:
        """An established tunnel ended (``ws.close_code``, ``ws.close_reason``)."""

    def on_failed(self, message: str, fatal: bool) -> None:
        """No websocket could be opened; ``fatal`` when retrying cannot help (TLS trust)."""

    # tunnels ----------------------------------------------------------------------------
    def _accepted(self, local: _Local) -> None:
        self.totals.connections += 1
        task = asyncio.ensure_future(self._open_ws(local))
        local.opener = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open_ws(self, local: _Local) -> None:
        loop = asyncio.get_running_loop()
        ws = _ClientWs(self, local)
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: ws, self.host, self.port, ssl=self.ssl, server_hostname=self.host
                ),
                _HANDSHAKE_TIMEOUT,
            )
            self.open.add(ws)
            await asyncio.wait_for(asyncio.shield(ws.handshake), _HANDSHAKE_TIMEOUT)
        except ssl.SSLCertVerificationError as exc:
            _abort(local.transport)
            self.on_failed(
                f"The gateway's certificate could not be verified ({exc.verify_message}). "
                "Pass --ca FILE with the gateway's CA certificate.",
                True,
            )
            return
        except (OSError, TimeoutError) as exc:
            _abort(local.transport)
            _abort(ws.transport)
            self.on_failed(f"Could not open a tunnel to the gateway: {exc or type(exc).__name__}.", False)
            return
        except asyncio.CancelledError:
            _abort(ws.transport)
            raise
        if ws.refusal is not None:
            self.totals.refusals += 1
            self.on_refused(*ws.refusal)

    def _ws_closed(self, ws: _ClientWs) -> None:
        self.open.discard(ws)
        self.totals.up += ws.tx
        self.totals.down += ws.rx
        if ws.refusal is None and ws.handshake.done():
            self.on_closed(ws)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _abort(transport: asyncio.Transport | None) -> None:
    if transport is not None:
        transport.abort()


class TunnelClient(Forwarder):
    """The running client: login state, the local listener, its tunnels.

    ``ask_token`` is called (in a thread) to read the one-time token; tests and
    ``--token-stdin`` pass their own. ``out`` receives the lines meant for the user.
    """

    def __init__(
        self,
        options: ConnectOptions,
        ask_token: Callable[[], str],
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.options = options
        self.gateway = _parse_link(options.link)
        context = client_ssl_context(options.ca) if options.ca else ssl.create_default_context()
        super().__init__(
            self.gateway.host, self.gateway.port, f"/ws/tcp/{quote(options.target, safe='')}", context
        )
        self._ask_token = ask_token
        self._out = out or sys.stdout
        self._err = err or sys.stderr
        self.ticket = ""
        self.ticket_expires: datetime | None = None
        self.target: dict[str, Any] = {}
        self._http: aiohttp.ClientSession | None = None
        self._listener: socket.socket | None = None
        self._done: asyncio.Future[tuple[int, str]] | None = None

    # output ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(text, file=self._out, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self._err, flush=True)

    # lifecycle ------------------------------------------------------------------------
    async def start(self) -> int:
        """Log in and listen; returns the local port. Raises :class:`ConnectError`."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._listener = self._bind()
        self._http = aiohttp.ClientSession(
            base_url=self.gateway.base,
            connector=aiohttp.TCPConnector(ssl=self.ssl),
            timeout=aiohttp.ClientTimeout(total=30),
            headers={"User-Agent": f"domum-gateway-connect/{__version__}"},
        )
        sent = await self._call("/cli/v1/token", {"link": self.gateway.link})
        where = {"email": "by e-mail", "sms": "by text message"}.get(str(sent.get("channel")), "")
        self.note(f"A one-time token was sent {where} to {sent.get('sent_to', 'you')}.".replace("  ", " "))
        token = (await loop.run_in_executor(None, self._ask_token)).strip()
        if not token:
            raise ConnectError("No token was entered.", EXIT_ACCESS)
        granted = await self._call("/cli/v1/verify", {"link": self.gateway.link, "token": token})
        self._take_ticket(granted)
        self.target = self._pick_target(granted.get("targets", []))
        await self.listen(self._listener)
        self._spawn(self._renew_loop())
        self._spawn(self._watch_loop())
        self._spawn(self._status_loop())
        self._announce(granted)
        return self.local_port

    def request_headers(self) -> str:
        return f"Authorization: Bearer {self.ticket}\r\n"

    def _bind(self) -> socket.socket:
        listen = self.options.listen
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((listen.host, listen.port))
            sock.listen(1024)
        except OSError as exc:
            sock.close()
            raise ConnectError(f"Cannot listen on {listen}: {exc.strerror}.", EXIT_USAGE) from None
        sock.setblocking(False)
        return sock

    async def wait(self) -> tuple[int, str]:
        """Until the client must stop: (exit code, message)."""
        assert self._done is not None
        return await self._done

    def stop(self, code: int, message: str) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result((code, message))

    async def close(self, *, logout: bool) -> None:
        """Stop listening, close every tunnel, sign out when asked."""
        if self._server is None and self._listener is not None:
            self._listener.close()
        await self.shutdown()
        if self._http is not None:
            if logout and self.ticket:
                with contextlib.suppress(ConnectError, aiohttp.ClientError, TimeoutError):
                    await self._call("/cli/v1/logout", None, bearer=True)
            await self._http.close()

    # the JSON API -----------------------------------------------------------------------
    async def _call(
        self, path: str, body: dict[str, str] | None, *, bearer: bool = False, seconds: float = 30
    ) -> dict[str, Any]:
        assert self._http is not None
        headers = {"Authorization": f"Bearer {self.ticket}"} if bearer else {}
        limit = aiohttp.ClientTimeout(total=seconds)
        try:
            async with self._http.post(path, json=body or {}, headers=headers, timeout=limit) as resp:
                text = await resp.text()
                status = resp.status
        except aiohttp.ClientConnectorCertificateError as exc:
            raise ConnectError(
                f"The gateway's certificate could not be verified ({exc.certificate_error}). "
                "Pass --ca FILE with the gateway's CA certificate.",
                EXIT_UNREACHABLE,
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConnectError(
                f"Cannot reach the gateway at {self.gateway.base}: {exc or type(exc).__name__}.",
                EXIT_UNREACHABLE,
            ) from None
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            data = {}
        if status >= 400:
            detail = data.get("detail") if isinstance(data, dict) else None
            code = EXIT_ACCESS if status < 500 or status == 502 else EXIT_UNREACHABLE
            raise ConnectError(str(detail or f"The gateway answered HTTP {status}."), code, status)
        if not isinstance(data, dict):
            raise ConnectError("The gateway sent an unexpected answer.", EXIT_UNREACHABLE)
        return data

    def _take_ticket(self, data: dict[str, Any]) -> None:
        ticket = data.get("ticket")
        if not isinstance(ticket, str) or not ticket:
            raise ConnectError("The gateway did not issue a tunnel ticket.", EXIT_UNREACHABLE)
        self.ticket = ticket
        try:
            self.ticket_expires = datetime.fromisoformat(str(data.get("expires_at")).replace("Z", "+00:00"))
        except ValueError:
            self.ticket_expires = None

    def _pick_target(self, targets: list[Any]) -> dict[str, Any]:
        wanted = self.options.target
        tunnels = [t for t in targets if isinstance(t, dict) and t.get("tunnel")]
        for t in tunnels:
            if t.get("name") == wanted:
                return dict(t)
        names = ", ".join(sorted(str(t.get("name")) for t in tunnels)) or "none"
        raise ConnectError(
            f"This access does not include a tunnel target named {wanted!r} "
            f"(targets you can reach this way: {names}).",
            EXIT_USAGE,
        )

    async def _renew_loop(self) -> None:
        failures = 0
        while True:
            expires = self.ticket_expires
            left = (expires - datetime.now(UTC)).total_seconds() if expires else 300.0
            await asyncio.sleep(max(5.0, left / 2) if failures == 0 else 5.0)
            try:
                self._take_ticket(await self._call("/cli/v1/renew", None, bearer=True))
                failures = 0
            except ConnectError as exc:
                if exc.exit_code == EXIT_ACCESS:
                    self.stop(EXIT_ACCESS, f"Access ended: {exc.message}")
                    return
                failures += 1
                if expires is not None and datetime.now(UTC) >= expires:
                    self.stop(EXIT_UNREACHABLE, f"The tunnel ticket could not be renewed: {exc.message}")
                    return

    async def _watch_loop(self) -> None:
        """Hold a long poll open so a revoke is noticed even with no tunnel open."""
        while True:
            try:
                await self._call("/cli/v1/wait", None, bearer=True, seconds=90)
            except ConnectError as exc:
                if exc.exit_code == EXIT_ACCESS or exc.status == 503:
                    self.stop(exc.exit_code, exc.message)
                    return
                await asyncio.sleep(5)

    # what to run next -------------------------------------------------------------------
    def _announce(self, granted: dict[str, Any]) -> None:
        port = self.local_port
        host = self.options.listen.host
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        name = self.target.get("name")
        protocol = self.target.get("protocol")
        self.say(f"Listening on {where} for {name} ({protocol}).")
        if not _is_loopback(host):
            self.note(
                f"Warning: {host} is not a loopback address; anyone who reaches {where} uses your access."
            )
        if protocol == "rdp":
            self.say(f"Next: xfreerdp /v:{where}   (Windows: mstsc /v:{where})")
        elif protocol == "ssh" or self.target.get("port") == 22:
            self.say(f"Next: ssh -p {port} <user>@{host}")
        else:
            self.say(f"Next: point your client at {where}")
        if self.options.rdp_file is not None:
            self._write_rdp_file(where)
        ends = granted.get("access_ends_at")
        if ends:
            self.say(f"Access ends at {ends}. Press Ctrl-C to disconnect and sign out.")

    def _write_rdp_file(self, where: str) -> None:
        path = self.options.rdp_file
        assert path is not None
        text = (
            f"full address:s:{where}\r\n"
            "prompt for credentials:i:1\r\n"
            "authentication level:i:2\r\n"
            "redirectclipboard:i:1\r\n"
        )
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            self.note(f"Could not write {path}: {exc.strerror}")
            return
        self.say(f"Wrote {path} (open it with your RDP client).")

    async def _status_loop(self) -> None:
        tty = self._err.isatty()
        interval = self.options.status_interval or (1.0 if tty else 30.0)
        last = ""
        while True:
            await asyncio.sleep(interval)
            up, down = self.bytes_moved()
            line = (
                f"domum: {len(self.open)} open, {self.totals.connections} total, "
                f"up {format_bytes(up)}, down {format_bytes(down)}"
            )
            if line == last:
                continue
            last = line
            if tty:
                print("\r" + line + "\x1b[K", end="", file=self._err, flush=True)
            else:
                self.note(line)

    # what the tunnels report ------------------------------------------------------------
    def on_refused(self, status: int, detail: str) -> None:
        if status in (401, 403):
            self.stop(EXIT_ACCESS, f"Access ended: {detail}")
        else:
            self.note(f"The gateway refused the tunnel: {detail}")

    def on_failed(self, message: str, fatal: bool) -> None:
        if fatal:
            self.stop(EXIT_UNREACHABLE, message)
        else:
            self.note(message)

    def on_closed(self, ws: _ClientWs) -> None:
        code, reason = ws.close_code, ws.close_reason
        if code == CLOSE_POLICY:
            self.stop(EXIT_ACCESS, f"Access ended: {reason or 'refused by policy'}")
        elif code == CLOSE_GOING_AWAY and reason.startswith("the gateway"):
            self.stop(EXIT_UNREACHABLE, f"The gateway closed the tunnel: {reason}. Run connect again.")
        elif code == CLOSE_INTERNAL:
            self.note(f"Tunnel closed: {reason or 'the target could not be reached'}")
        elif code not in (CLOSE_NORMAL, 1005, 1006):
            self.note(f"Tunnel closed with code {code}: {reason}")


def _stdin_token() -> str:
    return sys.stdin.readline()


def _prompt_token() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("Token: ")
    print("Token: ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline()


async def run_connect(options: ConnectOptions) -> int:
    """The ``connect`` subcommand: returns the exit status."""
    try:
        client = TunnelClient(options, _stdin_token if options.token_stdin else _prompt_token)
    except ConnectError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, client.stop, EXIT_STOPPED, "Disconnected.")
    started = time.monotonic()
    try:
        await client.start()
        code, message = await client.wait()
    except ConnectError as exc:
        code, message = exc.exit_code, exc.message
    await client.close(logout=code == EXIT_STOPPED)
    up, down = client.bytes_moved()
    if client.local_port:
        client.note(
            f"\n{message} {client.totals.connections} connection(s), up {format_bytes(up)}, "
            f"down {format_bytes(down)} in {time.monotonic() - started:.0f} s."
        )
    else:
        client.note(f"error: {message}")
    return code


def add_connect_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``connect`` subcommand's arguments."""
    parser.add_argument("link", help="your personal link, https://gateway/a/...")
    parser.add_argument("--target", required=True, help="the target's name, as shown in the portal")
    parser.add_argument(
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="local address to listen on, e.g. 127.0.0.1:13389",
    )
    parser.add_argument(
        "--token-stdin", action="store_true", help="read the one-time token as one line from stdin"
    )
    parser.add_argument("--ca", type=Path, metavar="FILE", help="CA certificate to verify the gateway with")
    parser.add_argument("--rdp-file", type=Path, metavar="FILE", help="write an .rdp file for the local port")
    parser.add_argument(
        "--status-interval", type=float, metavar="SECONDS", help="how often the status line is refreshed"
    )


def connect_main(args: argparse.Namespace) -> int:
    """Run ``connect`` from parsed arguments (uvloop when installed); returns the exit status."""
    try:
        listen = HostPort.parse(args.listen)
    except ValueError as exc:
        print(f"error: --listen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    options = ConnectOptions(
        link=args.link,
        target=args.target,
        listen=listen,
        token_stdin=args.token_stdin,
        ca=args.ca,
        rdp_file=args.rdp_file,
        status_interval=args.status_interval,
    )
    try:
        import uvloop

        return uvloop.run(run_connect(options))
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(run_connect(options))
