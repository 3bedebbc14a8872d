"""The browser SSH terminal's websocket, driven by a plain websocket client, against real sshd.

The browser itself is exercised in ``tests/browser/test_terminal_browser.py``; here the
protocol: host key pinning, relayed password and keyboard-interactive prompts, resize,
refusals, the Origin check and the cut-off when the session ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest

from domum_gateway.proxy.terminal import LineEditor

from ..conftest import Running
from ..peers.sshd import Sshd, ensure_user, sshd_available
from .helpers import Seed, call, create_forwarded, login_direct, seed

USER = "domumtest"
PASSWORD = "Tr0ub4dor-and-3"


@pytest.fixture(scope="module")
def target_user() -> str:
    if not sshd_available():
        pytest.skip("needs root and Debian openssh-server")
    ensure_user(USER, PASSWORD)
    return USER


@pytest.fixture
def pam_sshd(tmp_path: Path, target_user: str) -> Iterator[Sshd]:
    """Password and keyboard-interactive (PAM) sign-in, like most internal hosts."""
    with Sshd.running(tmp_path / "pam", password=True) as sshd:
        yield sshd


class Term:
    """A websocket client that reads the terminal like a person would."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.seen = bytearray()
        self.close_code: int | None = None
        self.close_reason = ""

    async def expect(self, needle: str | bytes, timeout: float = 15.0) -> str:
        want = needle.encode() if isinstance(needle, str) else needle
        start = len(self.seen)
        deadline = time.monotonic() + timeout
        while want not in self.seen[max(0, start - len(want)) :]:
            left = deadline - time.monotonic()
            if left <= 0 or self.close_code is not None:
                raise AssertionError(f"{want!r} not seen; got {bytes(self.seen)!r}")
            await self._receive(left)
        return self.seen.decode(errors="replace")

    async def _receive(self, timeout: float) -> None:
        try:
            msg = await self.ws.receive(timeout)
        except TimeoutError:
            return
        if msg.type is aiohttp.WSMsgType.BINARY:
            self.seen += msg.data
        elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            self.close_code = self.ws.close_code
            self.close_reason = msg.extra or ""

    async def closed(self, timeout: float = 10.0) -> tuple[int | None, str]:
        deadline = time.monotonic() + timeout
        while self.close_code is None and time.monotonic() < deadline:
            await self._receive(deadline - time.monotonic())
        return self.close_code, self.close_reason

    async def type(self, text: str) -> None:
        await self.ws.send_bytes(text.encode())

    async def resize(self, cols: int, rows: int) -> None:
        await self.ws.send_str(json.dumps({"type": "resize", "cols": cols, "rows": rows}))


async def ssh_target(
    run: Running, sshd: Sshd, *, name: str = "db01", key: str | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "protocol": "ssh",
        "host": "127.0.0.1",
        "port": sshd.port,
        "ssh_host_key": sshd.host_key_line if key is None else key,
    }


async def signed_in(run: Running, sshd: Sshd, **target: Any) -> tuple[Seed, str, str]:
    """Seed a grant for one SSH target; return (seed, request id, cookie)."""
    spec = await ssh_target(run, sshd, **target)
    if spec["ssh_host_key"] == "":
        del spec["ssh_host_key"]
    sd = await seed(run, target=spec)
    rid, link = await create_forwarded(run, sd)
    return sd, rid, await login_direct(run, sd, link)


def ws_client(run: Running, cookie: str | None) -> aiohttp.ClientSession:
    cookies = {"__Host-domum": cookie} if cookie else None
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=run.ssl), cookies=cookies)


@pytest.fixture
async def open_term(running: Running) -> AsyncIterator[Any]:
    sessions: list[aiohttp.ClientSession] = []

    async def opener(cookie: str | None, target: str = "db01", origin: str | None = None) -> Term:
        s = ws_client(running, cookie)
        sessions.append(s)
        ws = await s.ws_connect(
            f"{running.public_url}/ws/ssh/{target}",
            headers={"Origin": origin or running.public_url},
            autoping=True,
        )
        return Term(ws)

    yield opener
    for s in sessions:
        await s.close()


async def sign_in_to_target(term: Term, password: str = PASSWORD) -> None:
    await term.expect("login as: ")
    await term.type(f"{USER}\r")
    await term.expect("assword: ")
    await term.type(f"{password}\r")


async def audit_events(run: Running, action: str) -> list[dict[str, Any]]:
    async with run.admin() as s:
        st, page = await call(s, "GET", f"/api/v1/audit?type={action}&limit=100")
        assert st == 200, page
        return list(page["items"])


async def test_keyboard_interactive_sign_in_echo_and_resize(
    running: Running, pam_sshd: Sshd, open_term: Any
) -> None:
    sd, _rid, cookie = await signed_in(running, pam_sshd)
    term = await open_term(cookie)
    await term.resize(100, 30)
    banner = await term.expect("login as: ")
    assert "Alice Example <alice@example.com>" in banner
    assert f"db01 (127.0.0.1:{pam_sshd.port})" in banner
    assert "Access ends:" in banner
    await term.type(f"{USER}\r")
    await term.expect("Password: ")  # PAM's prompt, relayed by keyboard-interactive
    await term.type(f"{PASSWORD}\r")
    await term.expect("$ ")
    await term.type("echo domum-ok\r")
    await term.expect("domum-ok\r\n")
    await term.type("stty size\r")
    await term.expect("30 100")
    await term.resize(120, 40)
    await term.type("stty size\r")
    await term.expect("40 120")
    await term.type("exit\r")
    code, reason = await term.closed()
    assert code == 1000, reason
    # The password was not echoed, and nothing typed reached the audit log.
    assert PASSWORD not in term.seen.decode(errors="replace")
    opened = await audit_events(running, "ssh.terminal.opened")
    closed = await audit_events(running, "ssh.terminal.closed")
    assert [e["details"]["target"] for e in opened] == ["db01"]
    assert closed and closed[0]["details"]["bytes_up"] > 0
    async with running.admin() as s:
        st, page = await call(s, "GET", "/api/v1/audit?limit=500")
    assert PASSWORD not in json.dumps(page) and USER not in json.dumps(page)
    metrics = running.gateway.metrics.render().decode()
    assert 'domum_tunnel_bytes_total{direction="down",protocol="ssh"}' in metrics


async def test_password_auth_when_the_target_offers_only_password(
    running: Running, tmp_path: Path, target_user: str, open_term: Any
) -> None:
    with Sshd.running(tmp_path / "pw", password=True, options={"KbdInteractiveAuthentication": "no"}) as sshd:
        _sd, _rid, cookie = await signed_in(running, sshd)
        term = await open_term(cookie)
        await term.expect("login as: ")
        await term.type(f"{USER}\r")
        await term.expect(f"{USER}@db01's password: ")
        await term.type("wrong-password\r")
        await term.expect("Permission denied, please try again.")
        await term.type(f"{PASSWORD}\r")
        await term.expect("$ ")
        await term.type("echo $((6*7))\r")
        await term.expect("42")


async def test_wrong_password_three_times_ends_with_a_reason(
    running: Running, pam_sshd: Sshd, open_term: Any
) -> None:
    _sd, _rid, cookie = await signed_in(running, pam_sshd)
    term = await open_term(cookie)
    await term.expect("login as: ")
    await term.type(f"{USER}\r")
    for _ in range(3):
        await term.expect("assword: ")
        await term.type("nope\r")
    await term.expect("Signing in to db01 failed.")
    code, reason = await term.closed()
    assert code == 1008 and "Signing in to db01 failed" in reason
    refused = await audit_events(running, "ssh.terminal.refused")
    assert [e["outcome"] for e in refused] == ["auth_failed"]


async def test_changed_host_key_is_refused_before_any_prompt(
    running: Running, pam_sshd: Sshd, open_term: Any
) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    _sd, _rid, cookie = await signed_in(running, pam_sshd, key=other)
    term = await open_term(cookie)
    await term.expect("login as: ")
    await term.type(f"{USER}\r")
    text = await term.expect("Tell your administrator.")
    assert "is not the one registered for it" in text
    assert "assword" not in text  # stopped before the target could ask for anything
    code, reason = await term.closed()
    assert code == 1008 and "not the one registered" in reason
    [event] = await audit_events(running, "ssh.terminal.refused")
    assert event["outcome"] == "host_key_mismatch"
    assert event["details"]["registered"] == asyncssh.import_public_key(other).get_fingerprint()
    assert (
        event["details"]["presented"] == asyncssh.import_public_key(pam_sshd.host_key_line).get_fingerprint()
    )


async def test_missing_host_key_is_refused_not_trusted_on_first_use(
    running: Running, pam_sshd: Sshd, open_term: Any
) -> None:
    _sd, _rid, cookie = await signed_in(running, pam_sshd, key="")
    term = await open_term(cookie)
    text = await term.expect("register the target's SSH host key.")
    assert "login as" not in text
    code, reason = await term.closed()
    assert code == 1008 and "No host key is registered" in reason
    [event] = await audit_events(running, "ssh.terminal.refused")
    assert event["outcome"] == "host_key_missing"


async def test_revoke_closes_terminal_within_one_second(
    running: Running, pam_sshd: Sshd, open_term: Any
) -> None:
    _sd, rid, cookie = await signed_in(running, pam_sshd)
    term = await open_term(cookie)
    await sign_in_to_target(term)
    await term.expect("$ ")
    async with running.admin() as s:
        started = time.monotonic()
        st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
        assert st == 200
    code, reason = await term.closed(5.0)
    elapsed = time.monotonic() - started
    assert code == 1008 and reason == "access revoked", (code, reason)
    assert elapsed < 1.0, elapsed
    assert "Session ended: access revoked." in term.seen.decode()


async def test_warning_line_when_the_window_closes_within_five_minutes(
    running: Running, pam_sshd: Sshd, open_term: Any
) -> None:
    spec = await ssh_target(running, pam_sshd)
    sd = await seed(running, target=spec)
    start = datetime.now(UTC) - timedelta(minutes=5)
    _rid, link = await create_forwarded(
        running, sd, start=start.isoformat(), duration={"value": 9, "unit": "minutes"}
    )
    cookie = await login_direct(running, sd, link)
    term = await open_term(cookie)
    text = await term.expect("Save your work now.")
    assert "*** Your access ends at" in text and "minutes)" in text


async def test_refusals_before_the_terminal_opens(running: Running, pam_sshd: Sshd, open_term: Any) -> None:
    _sd, _rid, cookie = await signed_in(running, pam_sshd)
    async with running.admin() as s:
        st, _t = await call(s, "POST", "/api/v1/targets", await ssh_target(running, pam_sshd, name="db02"))
        assert st == 201
    # Not signed in: the socket opens, says why and closes with 1008.
    term = await open_term(None)
    await term.expect("sign in")
    assert (await term.closed())[0] == 1008
    # A target the grant does not include, and one that does not exist, read the same.
    for name in ("db02", "nope"):
        term = await open_term(cookie, target=name)
        text = await term.expect("does not include that resource")
        assert (await term.closed())[0] == 1008, text
    # Another site's page (cross-site websocket hijacking) and no Origin at all: 403.
    async with ws_client(running, cookie) as s:
        for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await s.ws_connect(f"{running.public_url}/ws/ssh/db01", headers=headers)
            assert exc.value.status == 403


async def test_page_and_assets(running: Running, pam_sshd: Sshd) -> None:
    _sd, _rid, cookie = await signed_in(running, pam_sshd)
    async with ws_client(running, None) as s:
        async with s.get(f"{running.public_url}/ssh/db01") as r:
            assert r.status == 401
            assert "Sign in first" in await r.text()
    async with ws_client(running, cookie) as s:
        async with s.get(f"{running.public_url}/ssh/db01") as r:
            assert r.status == 200
            html = await r.text()
            csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert '<script type="module" src="/static/terminal/terminal.js"></script>' in html
        assert 'data-socket="/ws/ssh/db01"' in html
        assert "<script>" not in html and " style=" not in html
        async with s.get(f"{running.public_url}/ssh/nope") as r:
            assert r.status == 403
        for path in ("/static/terminal/terminal.js", "/static/terminal/csp-styles.js"):
            async with s.get(running.public_url + path) as r:
                assert r.status == 200, path
                assert "javascript" in r.headers["Content-Type"]
        async with s.get(running.public_url + "/static/vendor/xterm/xterm.mjs") as r:
            assert r.status == 200, "run `make assets` to build the vendored xterm.js"


@pytest.mark.parametrize(
    ("echo", "keys", "shown", "line", "rest"),
    [
        (True, b"root\r", b"root\r\n", "root", b""),
        (False, b"s3cret\rmore", b"\r\n", "s3cret", b"more"),
        (True, b"rooo\x7f\x7ft\r\n", b"rooo\b \b\b \bt\r\n", "rot", b""),
        (True, b"ab\x15cd\n", b"ab\b \b\b \bcd\r\n", "cd", b""),
        (True, b"\x1b[Aok\x1bOB\r", b"ok\r\n", "ok", b""),
        (True, "zoë\r".encode(), "zoë\r\n".encode(), "zoë", b""),
        (True, b"x\x03", b"x^C\r\n", LineEditor.CANCEL, b""),
        (True, b"\x04", b"\r\n", LineEditor.CANCEL, b""),
        (True, b"half", b"half", None, b""),
    ],
)
def test_line_editor(echo: bool, keys: bytes, shown: bytes, line: str | None, rest: bytes) -> None:
    editor = LineEditor(echo)
    assert editor.feed(keys) == (shown, line, rest)


def test_line_editor_reassembles_split_utf8() -> None:
    editor = LineEditor(True)
    data = "é\r".encode()
    assert editor.feed(data[:1]) == (b"", None, b"")
    assert editor.feed(data[1:]) == ("é\r\n".encode(), "é", b"")
