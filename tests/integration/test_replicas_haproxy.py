"""Two ``domum-gateway serve`` processes on one PostgreSQL, behind a real HAProxy.

The topology of ``deploy/compose.yaml`` as processes on loopback: ``init`` once (shared
certificates, SSH host key, schema, admin token), replicas A and B with the same
configuration except their listen ports, HAProxy in TCP mode health-checking each
replica's ``/readyz`` over TLS, and a real SMTP server in this process for tokens.

What a user relies on when there are several replicas: a revoke sent to one replica ends
a session held on another, and an open TCP tunnel on it, within 2 s; token tries are
counted in the database, so guesses spread over replicas kill the token at the fifth; a
tunnel ticket one replica minted opens tunnels whichever replica HAProxy picks, and
signing out through either kills it everywhere; and without the database every replica
refuses (503), HAProxy takes them out, and both come back with the database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from domum_gateway.pki import client_ssl_context
from domum_gateway.proxy.context import COOKIE
from domum_gateway.proxy.pages import PRE_COOKIE

from ..conftest import Running
from ..peers.haproxy import HAProxy, Replica, Replicas, haproxy_missing, listen_port
from ..peers.postgres import PostgresServer
from ..peers.public_client import PublicClient, ask_token, sign_in
from ..peers.smtp import LoopbackController, Mailbox
from ..peers.tcp import EchoServer
from .helpers import call, create_forwarded, seed

pytestmark = pytest.mark.slow

# How long a revoke on one replica may take to end a session held on another (issue 9).
PROPAGATION_LIMIT = 2.0


@dataclass
class Topology:
    pg: PostgresServer
    replicas: Replicas
    a: Replica
    b: Replica
    haproxy: HAProxy
    mailbox: Mailbox

    def run(self, replica: Replica) -> Running:
        """The suite's ``Running`` handle for a replica, so the API helpers work on it.

        There is no in-process ``Gateway``: the replica is another process.
        """
        return Running(
            gateway=None,  # type: ignore[arg-type]
            admin_url=replica.admin_url,
            public_url=replica.public_url,
            admin_token=self.replicas.token,
            auditor_token="",
            ssl=client_ssl_context(self.replicas.ca),
            mailbox=self.mailbox,
            pg=self.pg,
        )

    @property
    def balanced_url(self) -> str:
        return f"https://127.0.0.1:{self.haproxy.port}"

    def client(self, base_url: str) -> PublicClient:
        return PublicClient(base_url, client_ssl_context(self.replicas.ca))


@pytest.fixture(scope="module")
def topology(pg_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    missing = haproxy_missing()
    if missing is not None:
        print(f"\nskipping the HAProxy topology tests: {missing}")
        pytest.skip(missing)
    if not pg_server.running:
        pg_server.start()
    box = Mailbox()
    smtp = LoopbackController(box, hostname="127.0.0.1", port=0)
    smtp.start()
    root = tmp_path_factory.mktemp("replicas")
    front = listen_port()
    replicas = Replicas(root, pg_server.create_database(), front, smtp_port=int(smtp.port))
    haproxy: HAProxy | None = None
    try:
        a, b = replicas.add("a"), replicas.add("b")
        replicas.init()
        a.start()
        b.start()
        ctx = replicas.client_context()
        a.wait_ready(ctx)
        b.wait_ready(ctx)
        haproxy = HAProxy(root / "haproxy", [a.backend(), b.backend()], port=front)
        haproxy.start()
        haproxy.wait_states("UP")
        yield Topology(pg_server, replicas, a, b, haproxy, box)
    finally:
        if haproxy is not None:
            haproxy.stop()
        codes = replicas.stop_all()
        smtp.stop()
        if not pg_server.running:  # a failed test left it down: the session's server is shared
            pg_server.start()
    assert all(code in (0, None) for code in codes.values()), f"replicas did not stop cleanly: {codes}"


@pytest.fixture(autouse=True)
async def _let_tls_connections_close() -> AsyncIterator[None]:
    """Give closing TLS connections a moment before the test's event loop ends.

    ``PublicClient`` closes every connection after its response (``force_close``), and
    closing TLS sends close_notify and waits for the replica's answer: from another
    process that takes a loop iteration or two, and a loop closed meanwhile leaves the
    socket to the garbage collector (a ResourceWarning, an error here).
    """
    yield
    await asyncio.sleep(0.2)


@pytest.fixture
async def clients(topology: Topology) -> AsyncIterator[dict[str, PublicClient]]:
    """One browser per entry point: replica A, replica B, and HAProxy."""
    made = {
        "a": topology.client(topology.a.public_url),
        "b": topology.client(topology.b.public_url),
        "lb": topology.client(topology.balanced_url),
    }
    try:
        yield made
    finally:
        for client in made.values():
            await client.session.close()


async def _status(client: PublicClient, path: str) -> int:
    page = await client.get(path, allow_redirects=False)
    return page.status


def _established(port: int) -> int:
    """Established IPv4 TCP connections whose local port is ``port`` (from /proc/net/tcp)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if (f := line.split())[3] == "01" and int(f[1].split(":")[1], 16) == port)


async def _until_ready(topology: Topology, replica: Replica, status: int, within: float) -> float:
    """Seconds until the replica's ``/readyz`` answers ``status``."""
    ctx = topology.replicas.client_context()
    return await asyncio.to_thread(replica.wait_ready, ctx, status, within)


async def _new_grant(topology: Topology, email: str, target: dict[str, Any] | None = None) -> tuple[str, str]:
    """A forwarded access request made through replica A's API: (request id, link path)."""
    run = topology.run(topology.a)
    # One database for the whole module: every test names its own target.
    name = email.split("@", 1)[0]
    target = target or {"name": name, "protocol": "http", "url": "http://127.0.0.1:9/"}
    sd = await seed(run, email=email, target=target)
    return await create_forwarded(run, sd)


async def test_revoke_on_b_ends_the_session_held_on_a_within_two_seconds(
    topology: Topology, clients: dict[str, PublicClient]
) -> None:
    email = "revoke@example.com"
    rid, link = await _new_grant(topology, email)
    a, lb = clients["a"], clients["lb"]
    portal = await sign_in(topology.run(topology.a), a, link, email)
    assert portal.title == "Your access", portal.text
    cookie = a.cookie(COOKIE)
    assert cookie
    # The session lives in the database: whichever replica HAProxy picks serves it.
    lb.set_cookie(COOKIE, cookie)
    for _ in range(4):
        assert await _status(lb, "/portal") == 200

    async with topology.run(topology.b).admin() as api:
        started = time.monotonic()
        st, body = await call(api, "POST", f"/api/v1/access-requests/{rid}/revoke")
        acked = time.monotonic() - started
        assert st == 200, body
        while (status := await _status(a, "/portal")) == 200:
            assert time.monotonic() - started < PROPAGATION_LIMIT, "A still serves the revoked session"
            await asyncio.sleep(0.01)
        took = time.monotonic() - started
    assert status in (401, 403), status
    print(
        f"\nrevoke on B answered in {acked * 1000:.0f} ms; A refused the session after {took * 1000:.0f} ms"
    )
    # Nowhere else either, and the link is dead.
    b = clients["b"]
    b.set_cookie(COOKIE, cookie)
    assert await _status(b, "/portal") in (401, 403)
    assert await _status(lb, "/portal") in (401, 403)
    assert (await b.get(link)).title == "Sign-in refused"


async def test_revoke_on_b_closes_an_open_tunnel_on_a_within_two_seconds(
    topology: Topology, clients: dict[str, PublicClient]
) -> None:
    email = "tunnel@example.com"
    a = clients["a"]
    async with EchoServer() as echo:
        target = {"name": "echo", "protocol": "tcp", "host": "127.0.0.1", "port": echo.port}
        rid, link = await _new_grant(topology, email, target)
        await sign_in(topology.run(topology.a), a, link, email)
        cookie = a.cookie(COOKIE)
        assert cookie
        # The browser's tunnel: session cookie plus the gateway's own Origin (base_url).
        headers = {"Cookie": f"{COOKIE}={cookie}", "Origin": topology.replicas.base_url}
        url = f"wss://127.0.0.1:{topology.a.public_port}/ws/tcp/echo"
        ctx = client_ssl_context(topology.replicas.ca)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
            s.ws_connect(url, headers=headers) as ws,
        ):
            await ws.send_bytes(b"ping through A")
            async with asyncio.timeout(5):
                got = b""
                while len(got) < len(b"ping through A"):
                    msg = await ws.receive()
                    assert msg.type is aiohttp.WSMsgType.BINARY, msg
                    got += msg.data
            assert got == b"ping through A"
            assert _established(echo.port) == 1

            async with topology.run(topology.b).admin() as api:
                started = time.monotonic()
                st, body = await call(api, "POST", f"/api/v1/access-requests/{rid}/revoke")
                assert st == 200, body
            async with asyncio.timeout(PROPAGATION_LIMIT - (time.monotonic() - started)):
                while (msg := await ws.receive()).type is aiohttp.WSMsgType.BINARY:
                    pass
            took = time.monotonic() - started
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
            assert ws.close_code == 1008, (ws.close_code, msg)  # policy: the grant ended
        print(f"\nthe tunnel on A closed {took * 1000:.0f} ms after the revoke was sent to B")
        # The target's side of the bridge is gone as well (A aborts it when it cuts).
        async with asyncio.timeout(1):
            while _established(echo.port):
                await asyncio.sleep(0.01)


async def test_wrong_tokens_alternating_over_both_replicas_kill_the_token_at_the_fifth(
    topology: Topology, clients: dict[str, PublicClient]
) -> None:
    """Tries are counted by one atomic statement in the shared database: whichever replica
    a guess reaches, the token is spent once five wrong ones were made against it."""
    email = "guess@example.com"
    _rid, link = await _new_grant(topology, email)
    a, b = clients["a"], clients["b"]
    token = await ask_token(topology.run(topology.a), a, link, email)
    form = a.last
    assert form is not None and form.csrf and form.title == "Enter your token", form
    # One browser, two replicas: the load balancer could send each POST to either. The
    # pre-login cookie and the form's CSRF field come from A; B must accept them (the CSRF
    # key derives from the shared TLS key).
    pre = a.cookie(PRE_COOKIE)
    assert pre
    b.set_cookie(PRE_COOKIE, pre)
    wrong = f"{(int(token) + 1) % 10**8:08d}"
    seen: list[tuple[str, int, str]] = []
    for i in range(10):
        name, client = ("a", a) if i % 2 == 0 else ("b", b)
        page = await client.post(f"{link}/verify", {"token": wrong}, csrf=form.csrf)
        seen.append((name, page.status, page.title))
    assert [title for _, _, title in seen] == ["Sign-in refused"] * 5 + ["Token no longer valid"] * 5, seen
    assert {status for _, status, _ in seen} == {403}, seen
    page = await b.post(f"{link}/verify", {"token": token}, csrf=form.csrf)
    assert (page.status, page.title) == (403, "Token no longer valid"), page.text
    assert "no longer be used" in page.message
    assert b.cookie(COOKIE) is None and a.cookie(COOKIE) is None


async def test_tunnel_ticket_from_a_opens_tunnels_through_haproxy_on_either_replica(
    topology: Topology,
) -> None:
    email = "ticket@example.com"
    ctx = client_ssl_context(topology.replicas.ca)
    async with EchoServer() as echo:
        target = {"name": "ticket-echo", "protocol": "tcp", "host": "127.0.0.1", "port": echo.port}
        _rid, link = await _new_grant(topology, email, target)
        full = topology.replicas.base_url + link
        async with aiohttp.ClientSession(
            base_url=topology.a.public_url, connector=aiohttp.TCPConnector(ssl=ctx)
        ) as s:
            n = len(topology.mailbox.messages)
            st, sent = await call(s, "POST", "/cli/v1/token", {"link": full})
            assert st == 202, sent
            await topology.mailbox.wait_count(n + 1)
            token = topology.mailbox.last_token(email)
            st, granted = await call(s, "POST", "/cli/v1/verify", {"link": full, "token": token})
            assert st == 200, granted
        bearer = {"Authorization": f"Bearer {granted['ticket']}"}
        url = f"wss://127.0.0.1:{topology.haproxy.port}/ws/tcp/ticket-echo"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            # Round robin: these land on both replicas; every one must be accepted.
            for i in range(6):
                async with s.ws_connect(url, headers=bearer) as ws:
                    payload = f"through the balancer {i}".encode()
                    await ws.send_bytes(payload)
                    got = b""
                    async with asyncio.timeout(5):
                        while len(got) < len(payload):
                            msg = await ws.receive()
                            assert msg.type is aiohttp.WSMsgType.BINARY, msg
                            got += msg.data
                    assert got == payload
            # Sign out through the balancer: the ticket is dead on both replicas at once.
            st, _ = await call(s, "POST", f"{topology.balanced_url}/cli/v1/logout", {}, headers=bearer)
            assert st == 204
            started = time.monotonic()
            for replica in (topology.a, topology.b, topology.a, topology.b):
                while True:
                    try:
                        async with s.ws_connect(
                            f"wss://127.0.0.1:{replica.public_port}/ws/tcp/ticket-echo", headers=bearer
                        ):
                            pass
                    except aiohttp.WSServerHandshakeError as exc:
                        assert exc.status == 401
                        break
                    assert time.monotonic() - started < PROPAGATION_LIMIT, "a replica still takes the ticket"
                    await asyncio.sleep(0.02)


async def test_database_down_fails_both_replicas_closed_and_both_recover(
    topology: Topology, clients: dict[str, PublicClient]
) -> None:
    email = "outage@example.com"
    _rid, link = await _new_grant(topology, email)
    a, b, lb = clients["a"], clients["b"], clients["lb"]
    await sign_in(topology.run(topology.a), a, link, email)
    cookie = a.cookie(COOKIE)
    assert cookie
    b.set_cookie(COOKIE, cookie)
    assert await _status(b, "/portal") == 200  # B has it cached too now
    # Each browser's sign-in form (CSRF field bound to its own pre-login cookie), to post
    # during the outage.
    csrf = {}
    for name, client in (("a", a), ("b", b)):
        page = await client.get(link)
        assert page.status == 200 and page.csrf, page.text
        csrf[name] = page.csrf

    await asyncio.to_thread(topology.pg.stop)
    stopped = time.monotonic()
    try:
        for replica in (topology.a, topology.b):
            await _until_ready(topology, replica, 503, 3.0)
        await asyncio.to_thread(topology.haproxy.wait_states, "DOWN", 5.0)
        print(f"\nHAProxy had both replicas down {time.monotonic() - stopped:.1f} s after PostgreSQL stopped")
        # Fail closed, with the one 503 page: no sign-in step, no portal.
        for name, client in (("a", a), ("b", b)):
            page = await client.get(link)
            assert (page.status, page.title) == (503, "Temporarily unavailable"), page.text
            assert page.headers.get("Retry-After") == "30"
            page = await client.post(f"{link}/token", csrf=csrf[name])
            assert page.status == 503, page.text
            page = await client.post(f"{link}/verify", {"token": "12345678"}, csrf=csrf[name])
            assert page.status == 503, page.text
            # The session's grant cannot be confirmed: cut from memory, and reading it back
            # needs the database.
            page = await client.get("/portal", allow_redirects=False)
            assert (page.status, page.title) == (503, "Temporarily unavailable"), page.text
        with pytest.raises(aiohttp.ClientConnectionError):
            await lb.get(link)  # no server left: HAProxy resets the connection
    finally:
        await asyncio.to_thread(topology.pg.start)

    started = time.monotonic()
    for replica in (topology.a, topology.b):
        await _until_ready(topology, replica, 200, 20.0)
    ready = time.monotonic() - started
    await asyncio.to_thread(topology.haproxy.wait_states, "UP", 10.0)
    print(
        f"replicas ready {ready:.1f} s after PostgreSQL was back, "
        f"HAProxy had them up after {time.monotonic() - started:.1f} s"
    )
    # A whole sign-in through the load balancer works again.
    fresh = topology.client(topology.balanced_url)
    async with fresh:
        portal = await sign_in(topology.run(topology.a), fresh, link, email)
        assert portal.title == "Your access"
