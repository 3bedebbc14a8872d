"""Replicas benchmark: one and two ``domum-gateway serve`` processes on one PostgreSQL.

    .venv/bin/python bench/replicas.py                   # defaults below, about 1-2 minutes
    .venv/bin/python bench/replicas.py --logins 100 --seconds 3 --revocations 50   # quick

Everything runs on 127.0.0.1: a throwaway PostgreSQL (``tests/peers/postgres.py``), a
real SMTP server in this process (aiosmtpd) that hands each one-time token to the login
that asked for it, the replicas (``init`` once, then ``serve``), and HAProxy in TCP mode
with ``/readyz`` health checks (``tests/peers/haproxy.py``). HAProxy connects to the
replicas from each client's own address (``usesrc clientip``), so the gateway's
per-address login limit and session address binding see many remote users, not one
proxy: every simulated user signs in from its own 127.x address.

Measured, first with replica A alone behind HAProxy, then with A and B behind it:

  logins/s        the whole browser flow per user on one keep-alive TLS connection:
                  GET /a/{link}, POST token (303, GET token page), the token from the
                  mail, POST verify (303, GET /portal); ``--concurrency`` users at once,
                  each on a pre-forwarded access request of its own.
  requests/s      ``wrk -t1 -c64`` GET /portal with a session cookie through HAProxy
                  (the portal reads the user, request and targets from the database).

and then, with both running: revocation propagation, ``--revocations`` times: a session
held (cached) on A, ``POST .../revoke`` sent to B's API, A polled back to back with the
cookie until it refuses; latency from sending the revoke (and from B's answer).

CPU: user+system seconds from /proc of the PostgreSQL processes (postmaster, its live
children, and its reaped children), the replicas, HAProxy, and the load generators (this
process, which also runs the SMTP server, and wrk). The machine has 2 cores shared by
all of them, so compare the ratio and the shares, not absolute figures.

Bounded: every loop has a count, every wait a timeout; every process is stopped by pid.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    ROOT,
    WrkResult,
    children,
    cpu_seconds,
    machine_cpu_seconds,
    percentile,
    ratio,
    run_wrk,
)

sys.path.insert(0, str(ROOT))
from tests.load.signin import COOKIE, LINK, TOKEN, Inbox, browser, page, sign_in
from tests.peers.haproxy import HAProxy, Replica, Replicas, haproxy_missing, listen_port
from tests.peers.postgres import PostgresServer, postgres_missing
from tests.peers.smtp import LoopbackController


# CPU accounting ------------------------------------------------------------------------------
def postgres_cpu(pg: PostgresServer) -> float:
    """CPU seconds used so far by the whole PostgreSQL server (including exited backends)."""
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    total = cpu_seconds(postmaster, reaped=True)
    for child in children(postmaster):
        try:
            total += cpu_seconds(child)
        except OSError:
            continue  # exited between listing and reading: counted in ``reaped`` next time
    return total


@dataclass
class Meter:
    """CPU seconds per role between ``start()`` and ``stop()``."""

    pg: PostgresServer
    gateways: list[int]
    haproxy: int
    before: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0

    def _now(self) -> dict[str, float]:
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "postgres": postgres_cpu(self.pg),
            "gateways": sum(cpu_seconds(pid) for pid in self.gateways),
            "haproxy": cpu_seconds(self.haproxy),
            # this process (client, SMTP server) plus reaped children (wrk)
            "load": time.process_time() + reaped.ru_utime + reaped.ru_stime,
            "machine": machine_cpu_seconds(),
        }

    def start(self) -> None:
        self.before = self._now()
        self.wall = time.perf_counter()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self.wall
        after = self._now()
        used = {k: after[k] - self.before[k] for k in after}
        machine = used.pop("machine")
        total = sum(used.values())
        # Whatever else ran meanwhile (the machine is shared): it skews every figure.
        used["other"] = max(0.0, machine - total)
        out = {f"{k}_cpu_s": round(v, 2) for k, v in used.items()}
        out["wall_s"] = round(wall, 2)
        out["cores_busy"] = round(total / wall, 2) if wall else 0.0
        out["postgres_share"] = round(used["postgres"] / total, 3) if total else 0.0
        return out


# the remote users ----------------------------------------------------------------------------
@dataclass
class User:
    email: str
    request_id: str
    link: str  # /a/...
    address: str  # the 127.x address this user connects from
    cookie: str = ""


def address(i: int) -> str:
    """A distinct loopback address per simulated user (127.0.0.0/8 is all local)."""
    return f"127.{10 + i // 62500}.{(i // 250) % 250}.{i % 250 + 1}"


class Admin:
    """The control API of one replica, on a keep-alive connection."""

    def __init__(self, replica: Replica, token: str, ssl_ctx: Any) -> None:
        self.session = aiohttp.ClientSession(
            base_url=replica.admin_url,
            headers={"Authorization": f"Bearer {token}"},
            connector=aiohttp.TCPConnector(ssl=ssl_ctx, limit=16),
        )

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, path, json=body) as r:
            data = await r.json(content_type=None) if r.status != 204 else None
            if r.status >= 300:
                raise RuntimeError(f"{method} {path}: {r.status} {data}")
            return data

    async def close(self) -> None:
        await self.session.close()


async def make_users(
    admin: Admin, inbox: Inbox, first: int, count: int, group: str, reason: str
) -> list[User]:
    """``count`` users, each with a forwarded access request of its own (setup, not timed)."""
    start = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> User:
        async with sem:
            mail = f"user{i}@bench.example"
            user = await admin.call(
                "POST", "/api/v1/users", {"group_id": group, "name": f"User {i}", "email": mail}
            )
            req = await admin.call(
                "POST",
                "/api/v1/access-requests",
                {
                    "group_id": group,
                    "user_id": user["id"],
                    "justification": "Benchmark",
                    "reason_id": reason,
                    "start": start,
                    "duration": {"value": 1, "unit": "days"},
                },
            )
            await admin.call("POST", f"/api/v1/access-requests/{req['id']}/forward")
            link = await inbox.next(mail, LINK)
            return User(mail, req["id"], link, address(i))

    return list(await asyncio.gather(*(one(i) for i in range(first, first + count))))


async def sign_in_user(base_url: str, ssl_ctx: Any, inbox: Inbox, user: User) -> float:
    """The whole page flow for one user from its own address; stores the session cookie;
    returns seconds taken."""
    started = time.perf_counter()
    async with browser(base_url, ssl_ctx, user.address) as s:
        user.cookie, _ = await sign_in(s, user.link, lambda: inbox.next(user.email, TOKEN))
    return time.perf_counter() - started


async def logins(
    base_url: str, ssl_ctx: Any, inbox: Inbox, users: list[User], concurrency: int
) -> dict[str, float]:
    sem = asyncio.Semaphore(concurrency)

    async def one(user: User) -> float:
        async with sem:
            return await sign_in_user(base_url, ssl_ctx, inbox, user)

    started = time.perf_counter()
    took = await asyncio.gather(*(one(u) for u in users))
    wall = time.perf_counter() - started
    return {
        "logins": len(users),
        "logins_per_s": round(len(users) / wall, 1),
        "login_p50_ms": round(statistics.median(took) * 1000, 1),
        "login_p99_ms": round(percentile(took, 99) * 1000, 1),
    }


def portal_load(url: str, cookie: str, seconds: int) -> WrkResult:
    return run_wrk(
        f"{url}/portal", duration=seconds, connections=64, headers={"Cookie": f"{COOKIE}={cookie}"}
    )


async def _revoke(admin: Admin, request_id: str, acked: list[float]) -> None:
    await admin.call("POST", f"/api/v1/access-requests/{request_id}/revoke")
    acked.append(time.perf_counter())


async def revocations(a: Replica, admin_b: Admin, ssl_ctx: Any, users: list[User]) -> dict[str, Any]:
    """Revoke each user's request on B; time until A, which holds the session, refuses it."""
    from_send: list[float] = []
    from_ack: list[float] = []
    polls: list[int] = []
    for user in users:
        async with browser(a.public_url, ssl_ctx, user.address) as s:
            s.cookie_jar.update_cookies({COOKIE: user.cookie}, URL(a.public_url))
            status, _, _ = await page(s, "GET", "/portal", allow_redirects=False)
            if status != 200:
                raise RuntimeError(f"A does not serve the session before the revoke: {status}")
            acked: list[float] = []
            started = time.perf_counter()
            task = asyncio.create_task(_revoke(admin_b, user.request_id, acked))
            n = 0
            async with asyncio.timeout(10):
                while True:
                    n += 1
                    status, _, _ = await page(s, "GET", "/portal", allow_redirects=False)
                    if status != 200:
                        refused = time.perf_counter()
                        break
            await task
            from_send.append(refused - started)
            from_ack.append(refused - acked[0])
            polls.append(n)
    ms = [v * 1000 for v in from_send]
    ack_ms = [v * 1000 for v in from_ack]
    return {
        "revocations": len(users),
        "revoke_p50_ms": round(statistics.median(ms), 1),
        "revoke_p99_ms": round(percentile(ms, 99), 1),
        "revoke_max_ms": round(max(ms), 1),
        "revoke_after_ack_p50_ms": round(statistics.median(ack_ms), 1),
        "revoke_after_ack_p99_ms": round(percentile(ack_ms, 99), 1),
        "revoke_polls_median": statistics.median(polls),
    }


# orchestration -------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    login: dict[str, float]
    login_cpu: dict[str, float]
    portal: WrkResult
    portal_cpu: dict[str, float]

    def figures(self) -> dict[str, Any]:
        return {
            **self.login,
            "login_cpu": self.login_cpu,
            "portal_rps": round(self.portal.rps, 1),
            "portal_p50_ms": round(self.portal.p50_ms, 2),
            "portal_p99_ms": round(self.portal.p99_ms, 2),
            "portal_errors": self.portal.errors,
            "portal_cpu": self.portal_cpu,
        }


def say(text: str) -> None:
    print(text, flush=True)


async def run_phase(
    name: str,
    haproxy: HAProxy,
    gateways: list[Replica],
    pg: PostgresServer,
    ssl_ctx: Any,
    inbox: Inbox,
    users: list[User],
    cookie: str,
    args: argparse.Namespace,
) -> Phase:
    url = f"https://127.0.0.1:{haproxy.port}"
    meter = Meter(pg, [g.pid for g in gateways], haproxy.pid)
    meter.start()
    login = await logins(url, ssl_ctx, inbox, users, args.concurrency)
    login_cpu = meter.stop()
    say(
        f"[{name}] {login['logins_per_s']} logins/s ({login['logins']} users, "
        f"p50 {login['login_p50_ms']} ms, p99 {login['login_p99_ms']} ms); "
        f"PostgreSQL {login_cpu['postgres_share']:.0%} of the CPU used, other processes "
        f"{login_cpu['other_cpu_s']} CPU-s"
    )
    meter.start()
    portal = await asyncio.to_thread(portal_load, url, cookie, args.seconds)
    portal_cpu = meter.stop()
    if portal.errors:
        raise RuntimeError(f"[{name}] wrk saw {portal.errors} errors on /portal")
    say(
        f"[{name}] {portal.rps:.0f} authenticated requests/s (GET /portal, p50 {portal.p50_ms:.2f} ms, "
        f"p99 {portal.p99_ms:.2f} ms); PostgreSQL {portal_cpu['postgres_share']:.0%} of the CPU used, "
        f"other processes {portal_cpu['other_cpu_s']} CPU-s"
    )
    return Phase(name, login, login_cpu, portal, portal_cpu)


async def bench(args: argparse.Namespace, work: Path, pg: PostgresServer) -> dict[str, Any]:
    inbox = Inbox(asyncio.get_running_loop())
    smtp = LoopbackController(inbox, hostname="127.0.0.1", port=0)
    smtp.start()
    front = listen_port()
    replicas = Replicas(work, pg.create_database(), front, smtp_port=int(smtp.port), log_level="WARNING")
    haproxy: HAProxy | None = None
    admin_a: Admin | None = None
    admin_b: Admin | None = None
    try:
        a, b = replicas.add("a"), replicas.add("b")
        replicas.init()
        ctx = replicas.client_context()
        a.start()
        await asyncio.to_thread(a.wait_ready, ctx)
        admin_a = Admin(a, replicas.token, ctx)
        target = await admin_a.call(
            "POST", "/api/v1/targets", {"name": "wiki", "protocol": "http", "url": "http://127.0.0.1:9/"}
        )
        policy = {
            "targets": [target["id"]],
            "max_duration": {"value": 30, "unit": "days"},
            "idle_timeout": {"value": 2, "unit": "hours"},
            "max_sessions": 10,
        }
        group = await admin_a.call(
            "POST", "/api/v1/groups", {"name": "bench", "kind": "internal", "policy": policy}
        )
        reason = await admin_a.call("POST", "/api/v1/reasons", {"label": "Benchmark"})
        started = time.perf_counter()
        users = await make_users(admin_a, inbox, 1, 2 * args.logins, group["id"], reason["id"])
        # wrk connects from 127.0.0.1, and a session is bound to the address it signed in from.
        (loader,) = await make_users(admin_a, inbox, 0, 1, group["id"], reason["id"])
        loader.address = "127.0.0.1"
        say(f"setup: {len(users) + 1} users with forwarded requests in {time.perf_counter() - started:.1f} s")

        haproxy = HAProxy(work / "haproxy-1", [a.backend()], port=front, source_clientip=True)
        haproxy.start()
        await asyncio.to_thread(haproxy.wait_states, "UP")
        await sign_in_user(f"https://127.0.0.1:{front}", ctx, inbox, loader)
        one = await run_phase(
            "1 replica", haproxy, [a], pg, ctx, inbox, users[: args.logins], loader.cookie, args
        )
        haproxy.stop()

        b.start()
        await asyncio.to_thread(b.wait_ready, ctx)
        haproxy = HAProxy(work / "haproxy-2", [a.backend(), b.backend()], port=front, source_clientip=True)
        haproxy.start()
        await asyncio.to_thread(haproxy.wait_states, "UP")
        second = users[args.logins :]
        two = await run_phase("2 replicas", haproxy, [a, b], pg, ctx, inbox, second, loader.cookie, args)

        admin_b = Admin(b, replicas.token, ctx)
        meter = Meter(pg, [a.pid, b.pid], haproxy.pid)
        meter.start()
        revoke = await revocations(a, admin_b, ctx, second[: args.revocations])
        revoke_cpu = meter.stop()
        say(
            f"revocation on B seen by A: p50 {revoke['revoke_p50_ms']} ms, p99 {revoke['revoke_p99_ms']} ms, "
            f"max {revoke['revoke_max_ms']} ms over {revoke['revocations']} "
            f"(after B's answer: p50 {revoke['revoke_after_ack_p50_ms']} ms, "
            f"p99 {revoke['revoke_after_ack_p99_ms']} ms)"
        )
    finally:
        for admin in (admin_a, admin_b):
            if admin is not None:
                await admin.close()
        if haproxy is not None:
            haproxy.stop()
        codes = replicas.stop_all()
        smtp.stop()
    if any(code != 0 for code in codes.values()):
        raise RuntimeError(f"a replica did not stop cleanly: {codes}")
    return {
        "bench": "replicas",
        "date": datetime.now(UTC).date().isoformat(),
        "cores": os.cpu_count(),
        "concurrency": args.concurrency,
        "one": one.figures(),
        "two": two.figures(),
        "logins_ratio": ratio(two.login["logins_per_s"], one.login["logins_per_s"], 2),
        "portal_ratio": ratio(two.portal.rps, one.portal.rps, 2),
        **revoke,
        "revoke_cpu": revoke_cpu,
        "mails": inbox.count,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--logins", type=int, default=300, help="logins timed per phase (default 300)")
    p.add_argument("--concurrency", type=int, default=16, help="users signing in at once (default 16)")
    p.add_argument("--seconds", type=int, default=8, help="wrk duration for GET /portal (default 8)")
    p.add_argument("--revocations", type=int, default=200, help="revocations timed (default 200)")
    args = p.parse_args()
    if not 1 <= args.revocations <= args.logins:
        p.error("--revocations must be between 1 and --logins (it reuses the second phase's sessions)")
    for missing in (postgres_missing(), haproxy_missing()):
        if missing is not None:
            print(f"cannot run: {missing}", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="domum-bench-replicas-"))
    pg = PostgresServer()
    try:
        pg.init()
        pg.start()
        figures = asyncio.run(bench(args, work, pg))
    finally:
        pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    say(
        f"two replicas vs one: logins x{figures['logins_ratio']}, authenticated requests "
        f"x{figures['portal_ratio']} (same {figures['cores']}-core machine)"
    )
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
