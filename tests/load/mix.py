"""The load mix: many websocket tunnels held open plus a steady stream of logins, against a
real ``domum-gateway serve`` process, with the gateway's RSS and open files sampled.

    .venv/bin/python -m tests.load.mix --seconds 60 --tunnels 2000 --logins-per-minute 500

Used by ``tests/load/test_load.py`` (as a subprocess, so the clients do not share a core
with pytest) and by ``bench/soak.py`` (10 minutes, ``make soak``). Everything runs on
127.0.0.1 and in two processes: this one (the clients, a TCP echo target, a real SMTP
server that hands each token to the login that asked for it) and the gateway (``init``
then ``serve``, uvloop, its own RLIMIT_NOFILE raised like this process's).

Phases, each bounded:

1. set-up: a TCP target, a tunnel user signed in through the pages (its cookie and this
   gateway's Origin open every tunnel), a group for the login users;
2. warm-up: as many tunnels as the load will hold opened, used and closed, a few logins;
   once the gateway reports no open tunnel, its RSS is the baseline (so the allocator's
   high-water mark for that many connections is already in it);
3. ramp: ``--tunnels`` tunnels opened, each proven by an echo round trip;
4. load, ``--seconds``: every tunnel sends a few hundred bytes every ``--traffic-every``
   seconds and checks the echo; logins start at ``--logins-per-minute`` (each the whole
   page flow from its own 127.x address: link page, send token, token from the mail,
   verify, portal, sign out; a user is retired after four logins, before the per-link
   send limit of five an hour, and the next one is created and forwarded through the
   control API as the load runs);
5. end: every tunnel proves it is alive with one more round trip, then all close; once
   the gateway reports no open tunnel and its open files are back, its RSS is sampled
   for a few seconds and the lowest figure kept.

Errors are counted by kind, never retried. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from ..peers.smtp import LoopbackController
from ..peers.tcp import EchoServer
from .signin import COOKIE, LINK, TOKEN, Inbox, browser, page, sign_in

__all__ = ["MixOptions", "main", "run_mix"]

ROOT = Path(__file__).resolve().parents[2]
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_LOGINS_PER_USER = 4  # the gateway allows five token sends per link and hour


@dataclass
class MixOptions:
    tunnels: int = 2000
    seconds: float = 60.0
    logins_per_minute: float = 500.0
    warmup_tunnels: int | None = None  # the same as ``tunnels`` unless given
    warmup_logins: int = 12
    traffic_every: float = 5.0
    sample_every: float = 10.0
    open_concurrency: int = 48
    login_concurrency: int = 48
    on_sample: Callable[[dict[str, Any]], None] | None = None


# processes and /proc -------------------------------------------------------------------------
def raise_nofile(want: int = 20000) -> int:
    """Raise this process's open-file soft limit (children inherit it); return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """``domum-gateway init`` then ``serve`` in ``work``, e-mail to ``smtp_port``."""

    def __init__(self, work: Path, smtp_port: int) -> None:
        sys.path.insert(0, str(ROOT / "src"))
        from domum_gateway.config_template import render_config

        self.work = work
        self.public, self.admin = _free_port(), _free_port()
        config = work / "config" / "domum.toml"
        config.parent.mkdir(parents=True)
        text = render_config("localhost", self.public, _free_port(), self.admin)
        text = text.replace('listen = "0.0.0.0:', 'listen = "127.0.0.1:')
        config.write_text(text)
        py = sys.executable
        out = subprocess.run(
            [py, "-m", "domum_gateway.cli", "init", "--config", str(config), "--hostname", "localhost"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        token = re.search(r"token: (\S+)", out)
        if token is None:
            raise RuntimeError(f"init printed no admin token: {out}")
        self.token = token.group(1)
        text = config.read_text()
        for old, new in (
            ('smtp_host = ""', 'smtp_host = "127.0.0.1"'),
            ("smtp_port = 587", f"smtp_port = {smtp_port}"),
            ("starttls = true", "starttls = false"),
            ('sender = ""', 'sender = "gateway@example.com"'),
        ):
            if old not in text:
                raise RuntimeError(f"config template changed: no {old!r}")
            text = text.replace(old, new, 1)
        config.write_text(text)
        self.ssl = ssl.create_default_context(cafile=str(work / "certs" / "ca.crt"))
        self.log_path = work / "gateway.log"
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [py, "-m", "domum_gateway.cli", "--log-level", "WARNING", "serve", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(work),
        )
        self.public_url = f"https://127.0.0.1:{self.public}"
        self.admin_url = f"https://127.0.0.1:{self.admin}"

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the gateway exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                for port in (self.public, self.admin):
                    _r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
                    w.close()
                return
            except (OSError, TimeoutError):
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the gateway did not listen within {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


# the clients ---------------------------------------------------------------------------------
class Admin:
    def __init__(self, gw: GatewayProcess) -> None:
        self.session = aiohttp.ClientSession(
            base_url=gw.admin_url,
            headers={"Authorization": f"Bearer {gw.token}"},
            connector=aiohttp.TCPConnector(ssl=gw.ssl, limit=8),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, path, json=body) as r:
            data = await r.json(content_type=None) if r.status != 204 else None
            if r.status >= 300:
                raise RuntimeError(f"{method} {path}: {r.status} {data}")
            return data

    async def active_tunnels(self) -> int:
        async with self.session.get("/metrics") as r:
            text = await r.text()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("domum_sessions_active{") and 'protocol="tcp"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return int(total)


@dataclass
class LoginUser:
    email: str
    link: str  # /a/...
    address: str
    used: int = 0


@dataclass
class Tally:
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    logins: int = 0
    login_seconds: list[float] = field(default_factory=list)
    round_trips: int = 0
    users_created: int = 0

    def error(self, kind: str, detail: object) -> None:
        self.errors[kind] += 1
        self.examples.setdefault(kind, str(detail)[:300])


def address(i: int) -> str:
    """A distinct loopback address per login user (127.0.0.0/8 is all local)."""
    return f"127.{20 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"


async def sign_in_user(gw: GatewayProcess, inbox: Inbox, user: LoginUser, *, sign_out: bool) -> str:
    """The whole page flow from the user's own address; returns the session cookie (signed out
    again when asked)."""
    async with browser(gw.public_url, gw.ssl, user.address, timeout=30) as s:
        cookie, portal = await sign_in(s, user.link, lambda: inbox.next(user.email, TOKEN))
        if sign_out:
            m = _CSRF.search(portal)
            if m is None:
                raise RuntimeError("portal without a sign-out form")
            status, text, path = await page(s, "POST", "/logout", data={"csrf": m.group(1)})
            if status != 200 or path != "/signed-out":
                raise RuntimeError(f"logout: {status} {path} {text[:200]}")
    return cookie


class Users:
    """Login users on demand: each created and forwarded through the control API, and
    lent to one login at a time (a second token for the same link replaces the first)."""

    def __init__(self, admin: Admin, inbox: Inbox, tally: Tally, group: str, reason: str) -> None:
        self.admin, self.inbox, self.tally = admin, inbox, tally
        self.group, self.reason = group, reason
        self.count = 0
        self.idle: list[LoginUser] = []

    async def create(self) -> LoginUser:
        i = self.count
        self.count += 1
        mail = f"load{i}@load.example"
        user = await self.admin.call(
            "POST", "/api/v1/users", {"group_id": self.group, "name": f"Load {i}", "email": mail}
        )
        req = await self.admin.call(
            "POST",
            "/api/v1/access-requests",
            {
                "group_id": self.group,
                "user_id": user["id"],
                "justification": "Load test",
                "reason_id": self.reason,
                "start": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
                "duration": {"value": 1, "unit": "days"},
            },
        )
        await self.admin.call("POST", f"/api/v1/access-requests/{req['id']}/forward")
        link = await self.inbox.next(mail, LINK)
        self.tally.users_created += 1
        return LoginUser(mail, link, address(i))

    async def take(self) -> LoginUser:
        user = self.idle.pop() if self.idle else await self.create()
        user.used += 1
        return user

    def give_back(self, user: LoginUser) -> None:
        if user.used < _LOGINS_PER_USER:
            self.idle.append(user)
        else:
            self.inbox.forget(user.email)


class Tunnel:
    """One ``/ws/tcp/echo`` websocket: echo round trips until told to stop."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.alive = False

    async def open(self, session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> None:
        self.ws = await session.ws_connect(
            url, headers=headers, autoping=True, timeout=aiohttp.ClientWSTimeout(ws_close=5)
        )
        await self.round_trip(64)
        self.alive = True

    async def round_trip(self, size: int) -> None:
        ws = self.ws
        assert ws is not None
        data = os.urandom(size)
        await ws.send_bytes(data)
        got = b""
        async with asyncio.timeout(30):
            while len(got) < len(data):
                msg = await ws.receive()
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    raise RuntimeError(f"tunnel {self.n}: {msg.type.name} {msg.data!r} {msg.extra!r}")
                got += msg.data
        if got != data:
            raise RuntimeError(f"tunnel {self.n}: echo differs")

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 10)


# the mix -------------------------------------------------------------------------------------
async def open_tunnels(
    count: int, session: aiohttp.ClientSession, url: str, headers: dict[str, str], tally: Tally, limit: int
) -> list[Tunnel]:
    sem = asyncio.Semaphore(limit)
    tunnels = [Tunnel(i) for i in range(count)]

    async def one(t: Tunnel) -> None:
        async with sem:
            try:
                await asyncio.wait_for(t.open(session, url, headers), 60)
            except Exception as exc:  # counted, never retried
                tally.error(f"tunnel_open:{type(exc).__name__}", exc)

    await asyncio.gather(*(one(t) for t in tunnels))
    return tunnels


async def traffic(t: Tunnel, stop: asyncio.Event, every: float, tally: Tally) -> None:
    # Spread the tunnels over the interval, then one round trip per interval each.
    delay = every * (t.n % 997) / 997
    while t.alive:
        try:
            await asyncio.wait_for(stop.wait(), delay)
            return
        except TimeoutError:
            pass
        try:
            await t.round_trip(200 + t.n % 300)
            tally.round_trips += 1
        except Exception as exc:
            t.alive = False
            tally.error(f"tunnel_traffic:{type(exc).__name__}", exc)
        delay = every


async def logins(
    gw: GatewayProcess, inbox: Inbox, users: Users, tally: Tally, count: int, per_minute: float, limit: int
) -> None:
    """``count`` logins started at ``per_minute`` (at most ``limit`` in flight)."""
    sem = asyncio.Semaphore(limit)
    interval = 60.0 / per_minute if per_minute > 0 else 0.0
    started = time.monotonic()

    async def one() -> None:
        async with sem:
            t0 = time.monotonic()
            try:
                user = await users.take()
            except Exception as exc:
                tally.error(f"provision:{type(exc).__name__}", exc)
                return
            try:
                await asyncio.wait_for(sign_in_user(gw, inbox, user, sign_out=True), 60)
                tally.logins += 1
                tally.login_seconds.append(time.monotonic() - t0)
                users.give_back(user)
            except Exception as exc:  # a failed user is not lent again
                tally.error(f"login:{type(exc).__name__}", exc)

    tasks = []
    for i in range(count):
        wait = started + i * interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q / 100 * len(ordered) + 0.5) - 1))]


async def _settle(admin: Admin, pid: int, fds_before: int, timeout: float = 60.0) -> None:
    """Until the gateway has no open tunnel and its open files are back near ``fds_before``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await admin.active_tunnels() == 0 and open_files(pid) <= fds_before + 16:
            return
        await asyncio.sleep(0.25)
    raise RuntimeError(f"tunnels or sockets still open after {timeout}s ({open_files(pid)} files)")


async def _low_rss(pid: int, seconds: float = 3.0) -> int:
    """The lowest RSS over a few seconds (a collection or a freed arena may land meanwhile)."""
    low = rss_kib(pid)
    for _ in range(int(seconds / 0.5)):
        await asyncio.sleep(0.5)
        low = min(low, rss_kib(pid))
    return low


async def run_mix(opts: MixOptions, work: Path) -> dict[str, Any]:
    nofile = raise_nofile(max(4096, 4 * opts.tunnels + 2048))
    loop = asyncio.get_running_loop()
    tally = Tally()
    inbox = Inbox(loop)
    smtp = LoopbackController(inbox, hostname="127.0.0.1", port=0)
    smtp.start()
    gw: GatewayProcess | None = None
    report: dict[str, Any] = {"tunnels": opts.tunnels, "seconds": opts.seconds, "nofile": nofile}
    samples: list[dict[str, Any]] = []
    t_start = time.monotonic()
    try:
        async with EchoServer() as echo:
            gw = GatewayProcess(work, int(smtp.port))
            pid = gw.proc.pid
            await gw.wait_ready()
            admin = Admin(gw)
            client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=gw.ssl, limit=0, force_close=True),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            )
            try:
                report.update(
                    await _phases(opts, gw, admin, client, inbox, echo, tally, samples, pid, t_start)
                )
            finally:
                await client.close()
                await admin.session.close()
            report["gateway_alive"] = gw.proc.poll() is None
            report["echo_connections"] = echo.connections
    finally:
        if gw is not None:
            gw.stop()
            log = gw.log_path.read_text(errors="replace")
            report["gateway_tracebacks"] = log.count("Traceback")
            report["gateway_errors_logged"] = sum(1 for line in log.splitlines() if " ERROR " in line)
            if report["gateway_tracebacks"] or report["gateway_errors_logged"]:
                report["gateway_log_tail"] = log[-2000:]
        smtp.stop()
    report["errors"] = dict(tally.errors)
    report["error_examples"] = tally.examples
    report["error_count"] = sum(tally.errors.values())
    report["logins"] = tally.logins
    report["login_p50_ms"] = round(_percentile(tally.login_seconds, 50) * 1000, 1)
    report["login_p99_ms"] = round(_percentile(tally.login_seconds, 99) * 1000, 1)
    report["round_trips"] = tally.round_trips
    report["users_created"] = tally.users_created
    report["rss_samples"] = samples
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    return report


async def _phases(
    opts: MixOptions,
    gw: GatewayProcess,
    admin: Admin,
    client: aiohttp.ClientSession,
    inbox: Inbox,
    echo: EchoServer,
    tally: Tally,
    samples: list[dict[str, Any]],
    pid: int,
    t_start: float,
) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def sample(phase: str) -> dict[str, Any]:
        row = {
            "t": round(time.monotonic() - t_start, 1),
            "phase": phase,
            "rss_mib": round(rss_kib(pid) / 1024, 1),
            "open_files": open_files(pid),
            "tunnels_alive": sum(1 for t in live if t.alive),
            "logins": tally.logins,
            "errors": sum(tally.errors.values()),
        }
        samples.append(row)
        if opts.on_sample is not None:
            opts.on_sample(row)
        return row

    live: list[Tunnel] = []
    # 1. set-up
    policy = {
        "max_duration": {"value": 30, "unit": "days"},
        "idle_timeout": {"value": 2, "unit": "hours"},
        "max_sessions": 10,
    }
    target = await admin.call(
        "POST", "/api/v1/targets", {"name": "echo", "protocol": "tcp", "host": "127.0.0.1", "port": echo.port}
    )
    group = await admin.call(
        "POST",
        "/api/v1/groups",
        {"name": "load", "kind": "internal", "policy": {**policy, "targets": [target["id"]]}},
    )
    reason = await admin.call("POST", "/api/v1/reasons", {"label": "Load test"})
    users = Users(admin, inbox, tally, group["id"], reason["id"])
    tunnel_user = await users.create()
    tunnel_user.address = "127.0.0.1"
    cookie = await sign_in_user(gw, inbox, tunnel_user, sign_out=False)
    url = f"wss://127.0.0.1:{gw.public}/ws/tcp/echo"
    headers = {"Cookie": f"{COOKIE}={cookie}", "Origin": f"https://127.0.0.1:{gw.public}"}
    out["rss_start_mib"] = round(rss_kib(pid) / 1024, 1)
    fds_idle = open_files(pid)

    # 2. warm-up
    warm = await open_tunnels(
        opts.warmup_tunnels if opts.warmup_tunnels is not None else opts.tunnels,
        client,
        url,
        headers,
        tally,
        opts.open_concurrency,
    )
    await logins(gw, inbox, users, tally, opts.warmup_logins, 0, 8)
    await asyncio.gather(*(t.round_trip(300) for t in warm if t.alive))
    await asyncio.gather(*(t.close() for t in warm))
    await _settle(admin, pid, fds_idle)
    out["rss_warm_mib"] = round(await _low_rss(pid) / 1024, 1)
    out["open_files_warm"] = open_files(pid)
    sample("warm")

    # 3. ramp
    ramp_started = time.monotonic()
    live = await open_tunnels(opts.tunnels, client, url, headers, tally, opts.open_concurrency)
    out["ramp_s"] = round(time.monotonic() - ramp_started, 1)
    out["tunnels_opened"] = sum(1 for t in live if t.alive)
    out["open_files_peak"] = open_files(pid)
    sample("ramp")

    # 4. load
    stop = asyncio.Event()
    logins_before = tally.logins
    load_started = time.monotonic()
    pumps = [asyncio.ensure_future(traffic(t, stop, opts.traffic_every, tally)) for t in live]
    n_logins = round(opts.logins_per_minute * opts.seconds / 60)
    login_task = asyncio.ensure_future(
        logins(gw, inbox, users, tally, n_logins, opts.logins_per_minute, opts.login_concurrency)
    )
    peak = 0.0
    next_sample = load_started + opts.sample_every
    while time.monotonic() - load_started < opts.seconds:
        await asyncio.sleep(min(0.5, max(0.0, next_sample - time.monotonic())))
        peak = max(peak, rss_kib(pid) / 1024)
        if time.monotonic() >= next_sample:
            sample("load")
            next_sample += opts.sample_every
        if gw.proc.poll() is not None:
            tally.error("gateway_exited", gw.log_tail())
            break
    stop.set()
    await asyncio.wait_for(asyncio.gather(*pumps), 60)
    try:
        await asyncio.wait_for(login_task, 120)
    except TimeoutError:
        tally.error("logins_late", "the logins did not finish within 120 s of the load's end")
    out["load_s"] = round(time.monotonic() - load_started, 1)
    out["load_logins"] = tally.logins - logins_before
    out["logins_per_minute_achieved"] = round(out["load_logins"] / out["load_s"] * 60, 1)
    out["rss_peak_mib"] = round(max(peak, rss_kib(pid) / 1024), 1)
    under_load = [row["rss_mib"] for row in samples if row["phase"] == "load"]
    if under_load:
        out["rss_load_first_mib"], out["rss_load_last_mib"] = under_load[0], under_load[-1]

    # 5. end
    async def last(t: Tunnel) -> None:
        if not t.alive:
            return
        try:
            await t.round_trip(64)
        except Exception as exc:
            t.alive = False
            tally.error(f"tunnel_end:{type(exc).__name__}", exc)

    await asyncio.wait_for(asyncio.gather(*(last(t) for t in live)), 120)
    out["tunnels_alive_at_end"] = sum(1 for t in live if t.alive)
    sample("end")
    await asyncio.wait_for(asyncio.gather(*(t.close() for t in live)), 120)
    await _settle(admin, pid, fds_idle)
    out["rss_after_mib"] = round(await _low_rss(pid) / 1024, 1)
    out["open_files_after"] = open_files(pid)
    out["rss_growth_mib"] = round(out["rss_after_mib"] - out["rss_warm_mib"], 1)
    sample("after")
    return out


def run(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run ``coro`` on uvloop when it is installed (like ``serve``), else on asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(coro)
    result: dict[str, Any] = uvloop.run(coro)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tunnels", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--logins-per-minute", type=float, default=500.0)
    p.add_argument("--warmup-tunnels", type=int, default=None, help="default: --tunnels")
    p.add_argument("--traffic-every", type=float, default=5.0)
    p.add_argument("--sample-every", type=float, default=10.0)
    p.add_argument("--work", type=Path, default=None, help="folder for the gateway (a temp dir by default)")
    args = p.parse_args(argv)

    def show(row: dict[str, Any]) -> None:
        print(json.dumps({"sample": row}), flush=True)

    opts = MixOptions(
        tunnels=args.tunnels,
        seconds=args.seconds,
        logins_per_minute=args.logins_per_minute,
        warmup_tunnels=args.warmup_tunnels,
        traffic_every=args.traffic_every,
        sample_every=args.sample_every,
        on_sample=show,
    )
    with tempfile.TemporaryDirectory(prefix="domum-load-") as tmp:
        report = run(run_mix(opts, args.work or Path(tmp)))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
