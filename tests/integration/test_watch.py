"""Live watch: an auditor follows a browser SSH terminal, read-only, against real sshd.

``GET /api/v1/sessions/{id}/watch`` on the admin listener (websocket). The user drives the
terminal through its real websocket (``/ws/ssh/{target}``) to a real OpenSSH server; the
watcher is a plain websocket client with a Bearer token or the admin console's cookie.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ..conftest import Running
from ..peers.sshd import Sshd, ensure_user, sshd_available
from ..peers.tcp import EchoServer
from .helpers import call, create_forwarded
from .test_console import Console
from .test_ssh_terminal import PASSWORD, USER, Term, sign_in_to_target, signed_in, ws_client
from .test_tunnel import connected, tcp_seed

WATCHING = "*** auditor (auditor) is watching this session ***"
STOPPED = "*** auditor (auditor) stopped watching this session ***"


@pytest.fixture(scope="module")
def target_user() -> str:
    if not sshd_available():
        pytest.skip("needs root and Debian openssh-server")
    ensure_user(USER, PASSWORD)
    return USER


@pytest.fixture
def pam_sshd(tmp_path: Path, target_user: str) -> Iterator[Sshd]:
    with Sshd.running(tmp_path / "pam", password=True) as sshd:
        yield sshd


@pytest.fixture
async def open_term(running: Running) -> AsyncIterator[Any]:
    """Opens the user's browser terminal websocket (as its page would)."""
    sessions: list[aiohttp.ClientSession] = []

    async def opener(cookie: str) -> Term:
        s = ws_client(running, cookie)
        sessions.append(s)
        ws = await s.ws_connect(
            f"{running.public_url}/ws/ssh/db01", headers={"Origin": running.public_url}, autoping=True
        )
        return Term(ws)

    yield opener
    for s in sessions:
        await s.close()


class Watch(Term):
    """The watcher's side: binary output like a terminal, plus the JSON size frames."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        super().__init__(ws)
        self.sizes: list[dict[str, Any]] = []

    async def _receive(self, timeout: float) -> None:
        try:
            msg = await self.ws.receive(timeout)
        except TimeoutError:
            return
        if msg.type is aiohttp.WSMsgType.TEXT:
            self.sizes.append(json.loads(msg.data))
        elif msg.type is aiohttp.WSMsgType.BINARY:
            self.seen += msg.data
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            self.close_code = self.ws.close_code
            self.close_reason = msg.extra or ""

    async def size(self, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = len(self.sizes)
        while len(self.sizes) == seen:
            left = deadline - time.monotonic()
            if left <= 0 or self.close_code is not None:
                raise AssertionError(f"no size frame; sizes {self.sizes}")
            await self._receive(left)
        return self.sizes[-1]


@pytest.fixture
async def clients() -> AsyncIterator[list[aiohttp.ClientSession]]:
    made: list[aiohttp.ClientSession] = []
    yield made
    for s in made:
        await s.close()


def _watch_url(run: Running, ref: str) -> str:
    return f"{run.admin_url}/api/v1/sessions/{ref}/watch"


async def open_watch(
    run: Running,
    clients: list[aiohttp.ClientSession],
    ref: str,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
) -> Watch:
    s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=run.ssl), cookies=cookies)
    clients.append(s)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return Watch(await s.ws_connect(_watch_url(run, ref), headers=sent, autoping=True))


async def handshake_status(
    run: Running,
    clients: list[aiohttp.ClientSession],
    ref: str,
    **kw: Any,
) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await open_watch(run, clients, ref, **kw)
    return exc.value.status


async def terminal_ids(run: Running, count: int = 1) -> list[tuple[str, str]]:
    """(session id, connection id) of the live browser terminals, once ``count`` are listed."""
    deadline = time.monotonic() + 10
    while True:
        async with run.admin(run.auditor_token) as s:
            st, page = await call(s, "GET", "/api/v1/sessions")
        assert st == 200, page
        found = [
            (item["id"], c["id"])
            for item in page["items"]
            for c in item["connections"]
            if c["protocol"] == "ssh-terminal"
        ]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, page
            return found
        await asyncio.sleep(0.05)


async def audit(run: Running, action: str) -> list[dict[str, Any]]:
    async with run.admin(run.auditor_token) as s:
        st, page = await call(s, "GET", f"/api/v1/audit?type={action}&limit=100")
    assert st == 200, page
    return list(page["items"])


async def shell(run: Running, sshd: Sshd, open_term: Any) -> tuple[str, Term]:
    """A user signed in to the gateway and, through the browser terminal, to the target."""
    _sd, rid, cookie = await signed_in(run, sshd)
    term = await open_term(cookie)
    await sign_in_to_target(term)
    await term.expect("$ ")
    return rid, term


async def test_auditor_watches_live_read_only_and_it_is_audited(
    running: Running, pam_sshd: Sshd, open_term: Any, clients: list[aiohttp.ClientSession]
) -> None:
    _rid, term = await shell(running, pam_sshd, open_term)
    await term.resize(100, 30)
    [(sid, cid)] = await terminal_ids(running)
    watch = await open_watch(running, clients, cid, token=running.auditor_token)
    # First the terminal's current size, then the user is told, by name and role.
    assert await watch.size() == {"type": "size", "cols": 100, "rows": 30}
    await term.expect(WATCHING)
    await watch.expect(WATCHING)

    await term.type("echo hello-$((6*7))-watch\r")
    await term.expect("hello-42-watch\r\n")
    await watch.expect("hello-42-watch\r\n")

    # Read-only: what the watcher sends never reaches the target, and its socket stays usable.
    await watch.ws.send_bytes(b"echo INJECTED-$((40+2))\r")
    await watch.ws.send_str("echo INJECTED-$((40+2))\r")
    await watch.ws.send_str(json.dumps({"type": "resize", "cols": 20, "rows": 5}))
    await term.type("echo after-$((1+1)); stty size\r")
    await term.expect("after-2\r\n30 100")
    await watch.expect("30 100")
    assert "INJECTED-42" not in term.seen.decode(errors="replace")
    assert "INJECTED-42" not in watch.seen.decode(errors="replace")

    # Resizes follow.
    await term.resize(120, 40)
    assert await watch.size() == {"type": "size", "cols": 120, "rows": 40}

    # The watcher leaves: the user is told, the terminal goes on.
    await watch.ws.close()
    await term.expect(STOPPED)
    await term.type("echo still-$((2+3))\r")
    await term.expect("still-5")

    [started] = await audit(running, "session.watch.started")
    [stopped] = await audit(running, "session.watch.stopped")
    for event in (started, stopped):
        assert event["actor"] == "token:auditor" and event["subject"] == cid
        details = event["details"]
        assert details["session_id"] == sid and details["target"] == "db01"
        assert details["role"] == "auditor" and details["via"] == "api"
    assert stopped["details"]["reason"] == "the watcher left"
    # Nothing the terminal showed was stored anywhere.
    stored = await running.database_bytes()
    assert b"hello-42-watch" not in stored and b"INJECTED" not in stored


async def test_watch_by_session_id_closes_when_the_shell_exits(
    running: Running, pam_sshd: Sshd, open_term: Any, clients: list[aiohttp.ClientSession]
) -> None:
    _rid, term = await shell(running, pam_sshd, open_term)
    [(sid, _cid)] = await terminal_ids(running)
    # An administrator may watch too, and a session with one terminal names it.
    watch = await open_watch(running, clients, sid, token=running.admin_token)
    await term.expect("*** admin (admin) is watching this session ***")
    await term.type("echo bye-$((1+1)); exit\r")
    await watch.expect("bye-2")
    code, reason = await watch.closed()
    assert code == 1000 and reason == "the watched session ended: the SSH session ended", (code, reason)
    assert (await term.closed())[0] == 1000
    [stopped] = await audit(running, "session.watch.stopped")
    assert stopped["actor"] == "token:admin" and stopped["details"]["reason"] == reason


@pytest.mark.parametrize("how", ["terminate", "cut", "revoke"])
async def test_watcher_closes_when_the_session_is_cut(
    running: Running, pam_sshd: Sshd, open_term: Any, clients: list[aiohttp.ClientSession], how: str
) -> None:
    rid, term = await shell(running, pam_sshd, open_term)
    [(sid, cid)] = await terminal_ids(running)
    watch = await open_watch(running, clients, cid, token=running.auditor_token)
    await term.expect(WATCHING)
    async with running.admin() as s:
        if how == "revoke":
            st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
            assert st == 200
        else:
            st, _ = await call(s, "DELETE", f"/api/v1/sessions/{sid if how == 'terminate' else cid}")
            assert st == 204
    code, reason = await watch.closed()
    expected = "access revoked" if how == "revoke" else "terminated by an administrator"
    assert code == 1008 and reason == f"the watched session ended: {expected}", (code, reason)
    assert (await term.closed())[0] == 1008
    # The ended terminal cannot be watched any more.
    async with running.admin(running.auditor_token) as s:
        st, problem = await call(s, "GET", f"/api/v1/sessions/{cid}/watch")
    assert st == 404 and problem["status"] == 404, problem


async def test_who_may_watch(
    running: Running, pam_sshd: Sshd, open_term: Any, clients: list[aiohttp.ClientSession]
) -> None:
    _sd, _rid, cookie = await signed_in(running, pam_sshd)
    term = await open_term(cookie)
    await term.expect("login as: ")
    [(sid, cid)] = await terminal_ids(running)
    admin_origin = {"Origin": running.admin_url}

    # No credentials; a bad token; the remote user's own session cookie (the public
    # listener's ``__Host-domum``), even from the admin origin and even renamed as the
    # console's cookie. The roles are admin and auditor only; there is no other role to try.
    assert await handshake_status(running, clients, cid) == 401
    assert await handshake_status(running, clients, cid, token="dgw_not-a-token") == 401
    assert (
        await handshake_status(running, clients, cid, headers=admin_origin, cookies={"__Host-domum": cookie})
        == 401
    )
    assert (
        await handshake_status(
            running, clients, cid, headers=admin_origin, cookies={"__Host-domum-admin": cookie}
        )
        == 401
    )
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=running.ssl), cookies={"__Host-domum": cookie}
    ) as s:
        async with s.get(_watch_url(running, cid), headers=admin_origin) as r:
            assert r.status == 401
            assert r.headers["Content-Type"].startswith("application/problem+json")
            assert (await r.json(content_type=None))["status"] == 401

    # Unknown ids are 404, a plain GET is told to use a websocket; all problem+json.
    async with running.admin(running.auditor_token) as s:
        for ref in ("con_doesnotexist", "ses_doesnotexist", "anything"):
            st, problem = await call(s, "GET", f"/api/v1/sessions/{ref}/watch")
            assert st == 404 and problem["type"].endswith("/not-found"), (ref, problem)
        st, problem = await call(s, "GET", f"/api/v1/sessions/{cid}/watch")
        assert st == 426 and problem["type"].endswith("/websocket-required"), problem

    # Two terminals in one session: the session id is ambiguous (409), each con_ id works.
    second = await open_term(cookie)
    await second.expect("login as: ")
    ids = await terminal_ids(running, 2)
    async with running.admin(running.auditor_token) as s:
        st, problem = await call(s, "GET", f"/api/v1/sessions/{sid}/watch")
    assert st == 409 and all(c in problem["detail"] for _s, c in ids), problem
    watch = await open_watch(running, clients, cid, token=running.auditor_token)
    assert (await watch.size())["type"] == "size"
    # Nothing was watched by those refused: only the one start is audited.
    assert len(await audit(running, "session.watch.started")) == 1


async def test_tunnels_cannot_be_watched(running: Running) -> None:
    async with EchoServer() as echo:
        sd = await tcp_seed(running, echo.port)
        _rid, link = await create_forwarded(running, sd)
        async with connected(running, sd, link) as client:
            _reader, writer = await asyncio.open_connection("127.0.0.1", client.local_port)
            try:
                conns: list[dict[str, Any]] = []
                deadline = time.monotonic() + 10
                while not conns and time.monotonic() < deadline:
                    conns = [c for c in running.gateway.sessions.registry() if c["protocol"] == "tcp"]
                    await asyncio.sleep(0.05)
                assert conns, "the tunnel never showed in the registry"
                async with running.admin(running.auditor_token) as s:
                    for ref in (conns[0]["id"], conns[0]["session_id"]):
                        st, problem = await call(s, "GET", f"/api/v1/sessions/{ref}/watch")
                        assert st == 409 and problem["type"].endswith("/conflict"), problem
            finally:
                writer.close()


async def test_console_cookie_works_only_from_the_console_origin(
    running: Running, pam_sshd: Sshd, open_term: Any, clients: list[aiohttp.ClientSession]
) -> None:
    _rid, term = await shell(running, pam_sshd, open_term)
    [(_sid, cid)] = await terminal_ids(running)
    console = Console(running)
    try:
        assert (await console.login(running.auditor_token)).status == 303
        page = await console.get("/admin/sessions")
        assert page.status == 200 and f'href="/admin/sessions/{cid}/watch"' in page.text
        page = await console.get(f"/admin/sessions/{cid}/watch")
        assert page.status == 200, page.text
        assert f'data-socket="/api/v1/sessions/{cid}/watch"' in page.text
        assert '<script type="module" src="/admin/static/watch.js"></script>' in page.text
        assert "<script>" not in page.text and " style=" not in page.text
        assert "unsafe-inline" not in page.headers["Content-Security-Policy"]
        for name in ("watch.js", "xterm.mjs", "csp-styles.js", "xterm.css", "watch.css"):
            assert (await console.get(f"/admin/static/{name}")).status == 200, name
        assert (await console.get("/admin/sessions/con_nope/watch")).status == 404

        url = _watch_url(running, cid)
        # The cookie from another origin (the public listener's pages are same-site) is refused.
        for headers in (
            {"Origin": running.public_url},
            {"Origin": "null"},
            {},
            {"Origin": running.admin_url, "Sec-Fetch-Site": "same-site"},
        ):
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await console.s.ws_connect(url, headers=headers)
            assert exc.value.status == 403, headers
        ws = await console.s.ws_connect(
            url, headers={"Origin": running.admin_url, "Sec-Fetch-Site": "same-origin"}
        )
        watch = Watch(ws)
        assert (await watch.size())["cols"] == 80
        await term.expect(WATCHING)
        await term.type("echo via-$((3+4))-console\r")
        await watch.expect("via-7-console")
        await ws.close()
        await term.expect(STOPPED)
    finally:
        await console.close()
    [started] = await audit(running, "session.watch.started")
    assert started["actor"] == "console:auditor" and started["details"]["via"] == "console"


async def test_a_slow_watcher_is_dropped_and_never_slows_the_user(
    running: Running, pam_sshd: Sshd, open_term: Any, clients: list[aiohttp.ClientSession]
) -> None:
    running.gateway.watch.queue_bytes = 256 * 1024  # smaller queue, same code path
    _rid, term = await shell(running, pam_sshd, open_term)
    [(_sid, cid)] = await terminal_ids(running)
    watch = await open_watch(running, clients, cid, token=running.auditor_token)
    await term.expect(WATCHING)
    # The watcher now reads nothing: socket buffers fill, then its queue, then it is dropped.
    dropped = False
    closing: asyncio.Task[tuple[int | None, str]] | None = None
    for i in range(1, 13):
        await term.type(f"head -c 3000000 /dev/zero | base64 -w 100; echo CHUNK-$((1000+{i}))\r")
        tail = b""
        while True:
            msg = await term.ws.receive(60)
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            tail = tail[-200:] + msg.data
            if STOPPED.encode() in tail and closing is None:
                dropped = True
                closing = asyncio.create_task(watch.closed(30))
            if f"CHUNK-{1000 + i}\r\n".encode() in tail:
                break
        if dropped:
            break
    assert dropped and closing is not None, "the watcher was never dropped"
    code, reason = await closing
    assert code == 1008 and "fell behind" in reason, (code, reason)
    # The user's terminal carried on at full speed throughout and still works.
    await term.type("echo fine-$((5+5))\r")
    await term.expect("fine-10")
    [stopped] = await audit(running, "session.watch.stopped")
    assert "fell behind" in stopped["details"]["reason"]
