"""SIGKILL of the gateway in the middle of a burst of writes, then a restart on the same database.

A real ``domum-gateway serve`` process (the configuration ``init`` writes: SQLite, the
outbox for messages) takes concurrent creations, revocations and logins with token
redemption; it is killed without warning while they run. After the restart every
change that was acknowledged is there, a revoked grant's session stays dead, a spent
token cannot be spent again, and ``audit verify`` passes.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from domum_gateway.proxy.context import COOKIE

from ..peers.public_client import PublicClient

BIN = [sys.executable, "-m", "domum_gateway.cli"]
USERS = 8
BURST_SECONDS = 1.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Setup:
    root: Path
    cfg: Path
    token: str
    admin: str
    public: str
    ssl: ssl.SSLContext


def _init(root: Path) -> Setup:
    cfg = root / "config" / "domum.toml"
    out = subprocess.run(
        [*BIN, "init", "--config", str(cfg), "--hostname", "gw.example.test"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    token = next(line[7:] for line in out.stdout.splitlines() if line.startswith("token: "))
    admin_port, public_port = _free_port(), _free_port()
    text = cfg.read_text()
    text = text.replace('listen = "127.0.0.1:9443"', f'listen = "127.0.0.1:{admin_port}"')
    text = text.replace('listen = "0.0.0.0:8443"', f'listen = "127.0.0.1:{public_port}"')
    text = text.replace('listen = "0.0.0.0:2222"', 'listen = "127.0.0.1:0"')
    cfg.write_text(text)
    ctx = ssl.create_default_context(cafile=str(root / "certs" / "ca.crt"))
    return Setup(root, cfg, token, f"https://127.0.0.1:{admin_port}", f"https://127.0.0.1:{public_port}", ctx)


@contextmanager
def _serving(setup: Setup) -> Iterator[subprocess.Popen[bytes]]:
    log = (setup.root / "serve.log").open("ab")
    proc = subprocess.Popen(
        [*BIN, "serve", "--config", str(setup.cfg), "--grace", "1"],
        cwd=setup.root,
        stdout=log,
        stderr=log,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()


async def _ready(setup: Setup, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=setup.ssl)) as s:
        while time.monotonic() < deadline:
            assert proc.poll() is None, (setup.root / "serve.log").read_text()
            with suppress(aiohttp.ClientError, OSError):
                async with s.get(f"{setup.admin}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise AssertionError("the gateway did not become ready: " + (setup.root / "serve.log").read_text())


def _admin(setup: Setup) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=setup.admin,
        headers={"Authorization": f"Bearer {setup.token}"},
        connector=aiohttp.TCPConnector(ssl=setup.ssl),
        timeout=aiohttp.ClientTimeout(total=10),
    )


async def _call(s: aiohttp.ClientSession, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with s.request(method, path, json=body) as r:
        return r.status, (await r.json(content_type=None) if r.status != 204 else None)


def _outbox(setup: Setup, to: str, pattern: str) -> str | None:
    """The newest match of ``pattern`` in a message to ``to`` in the outbox."""
    box = setup.root / "var" / "outbox"
    for path in sorted(box.glob("*.txt"), reverse=True):
        head, _, body = path.read_text().partition("\n\n")
        if f"To: {to}\n" in head + "\n":
            found = re.search(pattern, body)
            if found:
                return found.group(0)
    return None


async def _wait_outbox(setup: Setup, to: str, pattern: str, old: str | None = None) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = _outbox(setup, to, pattern)
        if found is not None and found != old:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no message to {to} matching {pattern}")


def _body(group: str, user: str, reason: str) -> dict[str, Any]:
    start = datetime.now(UTC) - timedelta(minutes=5)
    return {
        "group_id": group,
        "user_id": user,
        "justification": "burst",
        "reason_id": reason,
        "start": start.isoformat(),
        "duration": {"value": 2, "unit": "hours"},
    }


@dataclass
class Acked:
    created: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    spent: list[tuple[str, str, str]] = field(default_factory=list)  # (link path, token, email)
    logins: int = 0


async def _login(setup: Setup, link: str, email: str, acked: Acked) -> str | None:
    """Sign in through the pages; return the session cookie when the gateway said yes."""
    async with PublicClient(setup.public, setup.ssl) as user:
        page = await user.get(link)
        if page.status != 200:
            return None
        old = _outbox(setup, email, r"\b\d{8}\b")
        page = await user.post(f"{link}/token")
        if page.status != 200:
            return None
        token = await _wait_outbox(setup, email, r"\b\d{8}\b", old)
        page = await user.post(f"{link}/verify", {"token": token}, allow_redirects=False)
        if page.status != 303:
            return None
        acked.spent.append((link, token, email))
        acked.logins += 1
        return user.cookie(COOKIE)


async def _burst(setup: Setup, seed: dict[str, Any], acked: Acked, stop: asyncio.Event) -> None:
    async def creator() -> None:
        async with _admin(setup) as s:
            while not stop.is_set():
                st, req = await _call(s, "POST", "/api/v1/access-requests", _body(*seed["create_with"]))
                if st == 201:
                    acked.created.append(req["id"])

    async def revoker() -> None:
        async with _admin(setup) as s:
            for rid in seed["to_revoke"]:
                if stop.is_set():
                    return
                st, _ = await _call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
                if st == 200:
                    acked.revoked.append(rid)
                await asyncio.sleep(0.05)

    async def logger_in() -> None:
        for link, email in seed["to_login"]:
            if stop.is_set():
                return
            await _login(setup, link, email, acked)

    tasks = [asyncio.create_task(f()) for f in (creator, creator, revoker, logger_in, logger_in)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        # After the kill only connection errors are expected (or the cancellation itself).
        assert not isinstance(result, AssertionError), result


async def test_sigkill_mid_burst_then_restart_keeps_every_acknowledged_change(tmp_path: Path) -> None:
    setup = _init(tmp_path)
    with _serving(setup) as proc:
        await _ready(setup, proc)
        async with _admin(setup) as s:
            st, target = await _call(
                s,
                "POST",
                "/api/v1/targets",
                {"name": "wiki", "protocol": "http", "url": "http://127.0.0.1:9/"},
            )
            assert st == 201, target
            policy = {
                "targets": [target["id"]],
                "max_sessions": 50,
                "max_duration": {"value": 30, "unit": "days"},
            }
            st, group = await _call(s, "POST", "/api/v1/groups", {"name": "burst", "policy": policy})
            assert st == 201, group
            st, reason = await _call(s, "POST", "/api/v1/reasons", {"label": "burst"})
            assert st == 201, reason
            grants: list[tuple[str, str, str]] = []  # (request id, link path, email)
            for i in range(USERS):
                email = f"u{i}@example.com"
                st, user = await _call(
                    s, "POST", "/api/v1/users", {"group_id": group["id"], "name": f"U {i}", "email": email}
                )
                assert st == 201, user
                st, req = await _call(
                    s, "POST", "/api/v1/access-requests", _body(group["id"], user["id"], reason["id"])
                )
                assert st == 201, req
                st, fwd = await _call(s, "POST", f"/api/v1/access-requests/{req['id']}/forward")
                assert st == 200, fwd
                url = await _wait_outbox(setup, email, r"https?://\S+/a/[A-Za-z0-9_-]+")
                grants.append((req["id"], "/a/" + url.rsplit("/a/", 1)[1], email))
        # One user signed in before the burst; their grant is revoked during it.
        victim_id, victim_link, victim_email = grants[0]
        pre = Acked()
        victim_cookie = await _login(setup, victim_link, victim_email, pre)
        assert victim_cookie

        seed = {
            "create_with": (group["id"], user["id"], reason["id"]),
            "to_revoke": [victim_id, *(g[0] for g in grants[1:3])],
            "to_login": [(g[1], g[2]) for g in grants[3:]] * 3,
        }
        acked = Acked()
        stop = asyncio.Event()
        burst = asyncio.create_task(_burst(setup, seed, acked, stop))
        await asyncio.sleep(BURST_SECONDS)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        stop.set()
        await asyncio.wait_for(burst, timeout=30)
    assert acked.created and victim_id in acked.revoked and acked.logins >= 1, acked

    with _serving(setup) as proc:
        await _ready(setup, proc)
        async with _admin(setup) as s:
            for rid in acked.created:
                st, req = await _call(s, "GET", f"/api/v1/access-requests/{rid}")
                assert st == 200, (rid, req)
            for rid in acked.revoked:
                st, req = await _call(s, "GET", f"/api/v1/access-requests/{rid}")
                assert st == 200 and req["status"] == "revoked", req
        # The revoked grant's session stays dead.
        async with PublicClient(setup.public, setup.ssl) as user:
            user.set_cookie(COOKIE, victim_cookie)
            page = await user.get("/portal", allow_redirects=False)
            assert page.status != 200, page.text
        # A spent token cannot be spent again.
        for link, token, _email in [*pre.spent, *acked.spent]:
            async with PublicClient(setup.public, setup.ssl) as user:
                page = await user.get(link)
                if page.status != 200:
                    continue  # revoked since: refused at the door
                page = await user.post(f"{link}/verify", {"token": token}, allow_redirects=False)
                assert page.status != 303 and user.cookie(COOKIE) is None, page.text
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    verify = subprocess.run(
        [*BIN, "audit", "verify", "--config", str(setup.cfg)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
