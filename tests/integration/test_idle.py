"""Idle timeout (issue #7): a session the user leaves alone ends within one second of
``last activity + idle timeout`` on every path, by its own timer, with the reason shown.

Activity is what the user sends: bytes into a tunnel or a proxied websocket, keystrokes
in the browser terminal, the SSH stream of ``ssh -J`` (encrypted end to end, so any of
it). Output from a target alone does not keep a session alive.

The grant's idle timeout is whole minutes in policy; here it is shortened to a couple of
seconds on the live session (and its cached grant) right after sign-in, which is the
only white-box step: the timers, peers and clients are the real ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from domum_gateway.errors import StoreError

from ..conftest import Running
from ..peers.sshd import Sshd
from ..peers.tcp import EchoServer
from .helpers import call, create_forwarded
from .test_cutoff import (
    PROBE,
    WITHIN,
    CountingUpstream,
    RawWs,
    _proxy_user,
    pam_sshd,  # noqa: F401 (fixture)
    target,  # noqa: F401 (fixture)
    terminal,
    wait_until,
)
from .test_jump import seed_ssh, sleeping_through_jump
from .test_ssh_terminal import sign_in_to_target, signed_in
from .test_tunnel import cli_login, service_of, tcp_seed

pytestmark = pytest.mark.asyncio

IDLE = 2  # seconds
REASON = "idle"


def shorten_idle(run: Running, seconds: int = IDLE) -> None:
    """Give every live session (and its cached grant) a ``seconds`` idle timeout, counted
    from its latest activity, as a policy with that timeout would."""
    mgr = run.gateway.sessions
    for entry in mgr._grants.values():
        entry.grant = replace(entry.grant, idle_timeout_seconds=seconds)
    for live in mgr.live_sessions():
        live.grant = replace(live.grant, idle_timeout_seconds=seconds)
        mgr._arm_idle(live)


async def ended_in_store(run: Running) -> list[str]:
    """The end reasons the store recorded (the idle end is written by the timer)."""
    return [s.end_reason or "" for s in await run.gateway.store.list_sessions(live=False) if s.ended_at]


class Streamer:
    """A TCP target that writes a line every 50 ms whatever the client does."""

    def __init__(self) -> None:
        self.port = 0
        self.writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            for _ in range(400):  # bounded: 20 s at most
                writer.write(b"tick\n")
                await writer.drain()
                await asyncio.sleep(0.05)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Streamer]:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        try:
            yield self
        finally:
            self._server.close()
            for w in self.writers:
                w.transport.abort()
            await self._server.wait_closed()


async def _tunnel(run: Running, port: int) -> RawWs:
    sd = await tcp_seed(run, port)
    _rid, link = await create_forwarded(run, sd)
    bearer = {"Authorization": f"Bearer {(await cli_login(run, sd, link))['ticket']}"}
    return await RawWs.open(run, "/ws/tcp/echo", bearer)


# TCP tunnel --------------------------------------------------------------------------------
async def test_idle_tunnel_is_cut_within_a_second_of_the_deadline(running: Running) -> None:
    async with EchoServer() as echo:
        ws = await _tunnel(running, echo.port)
        try:
            shorten_idle(running)
            # activity for a while: the session outlives several idle timeouts' worth of time
            # only because the user keeps sending
            started = time.monotonic()
            while time.monotonic() - started < 2.5 * IDLE:
                last = time.monotonic()
                assert await ws.roundtrip() == PROBE
                await asyncio.sleep(IDLE / 4)
            assert running.gateway.sessions.live_sessions(), "cut while the user was active"
            code, reason = await ws.closed(timeout=IDLE + 5)
            late = ws.closed_at - (last + IDLE)
            assert code == 1008 and REASON in reason, (code, reason)
            assert -0.2 < late < WITHIN, late
            at_cut = echo.received
            await ws.keep_writing()
            await wait_until(lambda: echo.half_closed == 1 or not echo.live, WITHIN)
            assert echo.received == at_cut
        finally:
            await ws.aclose()
        await wait_until(lambda: not service_of(running).open)
        assert running.gateway.sessions.connections() == []
        await wait_until_recorded(running)


async def wait_until_recorded(run: Running) -> None:
    deadline = time.monotonic() + 5
    while "session_idle" not in await ended_in_store(run):
        assert time.monotonic() < deadline, await ended_in_store(run)
        await asyncio.sleep(0.05)


async def test_target_output_alone_does_not_keep_a_tunnel_session_alive(running: Running) -> None:
    async with Streamer().running() as streamer:
        ws = await _tunnel(running, streamer.port)
        try:
            assert (await ws.frame(5))[1].startswith(b"tick")
            ws.send(b"hello")  # the user's last activity
            last = time.monotonic()
            await asyncio.sleep(0.05)
            shorten_idle(running)
            code, reason = await ws.closed(timeout=IDLE + 5)  # data frames keep arriving until then
            assert code == 1008 and REASON in reason, (code, reason)
            assert ws.closed_at - (last + IDLE) < WITHIN
        finally:
            await ws.aclose()


# websocket through the HTTP proxy ------------------------------------------------------------
async def test_idle_proxied_websocket_is_cut_within_a_second(running: Running) -> None:
    async with CountingUpstream().running() as up:
        _sd, _rid, cookie = await _proxy_user(running, up)
        ws = await RawWs.open(running, "/t/chat/ws", {"Cookie": f"__Host-domum={cookie}"})
        try:
            shorten_idle(running)
            for _ in range(6):  # 1.5 idle timeouts of activity
                last = time.monotonic()
                assert await ws.roundtrip() == PROBE
                await asyncio.sleep(IDLE / 4)
            code, reason = await ws.closed(timeout=IDLE + 5)
            late = ws.closed_at - (last + IDLE)
            assert code == 1008 and REASON in reason, (code, reason)
            assert -0.2 < late < WITHIN, late
            at_cut = up.received
            await ws.keep_writing()
            await wait_until(lambda: up.open == 0, WITHIN)
            assert up.received == at_cut
        finally:
            await ws.aclose()
        # the next page says why
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=running.ssl)) as s:
            async with s.get(
                f"{running.public_url}/t/chat/",
                headers={"Cookie": f"__Host-domum={cookie}"},
                allow_redirects=False,
            ) as r:
                assert r.status in (302, 303, 401, 403), r.status


# browser SSH terminal --------------------------------------------------------------------
async def test_idle_browser_terminal_is_cut_within_a_second_with_the_reason(
    running: Running,
    pam_sshd: Sshd,  # noqa: F811
) -> None:
    _sd, _rid, cookie = await signed_in(running, pam_sshd)
    async with terminal(running, cookie) as term:
        await sign_in_to_target(term)
        await term.expect("$ ")
        shorten_idle(running)
        await term.ws.send_bytes(b"echo typed\n")
        last = time.monotonic()
        await term.expect("typed")
        code, reason = await term.closed(IDLE + 5)
        late = time.monotonic() - (last + IDLE)
    assert code == 1008 and REASON in reason, (code, reason)
    assert late < WITHIN, late
    assert f"Session ended: {reason}." in term.seen.decode()
    await wait_until(lambda: running.gateway.sessions.connections() == [])


# native ssh -J ---------------------------------------------------------------------------
async def test_idle_jump_connection_is_disconnected_with_the_reason(
    running: Running,
    target: Sshd,  # noqa: F811
    tmp_path: Path,
) -> None:
    sd = await seed_ssh(running, target)
    _rid, link = await create_forwarded(running, sd)
    jc, proc = await sleeping_through_jump(running, target, tmp_path / "client", sd.email, link)
    last = time.monotonic()  # the remote command now sleeps: nothing moves either way
    shorten_idle(running)
    result = await jc.finish(proc, IDLE + 10)
    late = time.monotonic() - (last + IDLE)
    assert result.returncode == 255
    assert "Domum Gateway: the session was idle for too long" in result.stderr
    assert late < WITHIN + 0.5, late  # includes the ssh client's own exit


# another replica's activity --------------------------------------------------------------
async def test_activity_recorded_by_another_replica_postpones_the_idle_end(running: Running) -> None:
    """Memory saw nothing, but the store's ``last_seen`` (written by a replica relaying the
    user's traffic) is recent: the timer adopts it instead of ending the session."""
    async with EchoServer() as echo:
        ws = await _tunnel(running, echo.port)
        try:
            assert await ws.roundtrip() == PROBE
            shorten_idle(running)
            (live,) = running.gateway.sessions.live_sessions()
            await asyncio.sleep(IDLE * 0.75)
            elsewhere = datetime.now(UTC)
            await running.gateway.store.touch_sessions({live.id: elsewhere})
            other = time.monotonic()
            await asyncio.sleep(IDLE * 0.5)  # past the local deadline
            assert not live.ended, "ended although another replica saw activity"
            code, reason = await ws.closed(timeout=IDLE + 5)
            assert code == 1008 and REASON in reason, (code, reason)
            assert ws.closed_at - (other + IDLE) < WITHIN
        finally:
            await ws.aclose()


async def test_idle_check_fails_closed_when_the_store_cannot_answer(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    """The store holds recent activity from another replica, but cannot be read when the
    local deadline comes: the session ends at the local deadline (fail closed), not at the
    later one the store would have given."""
    async with EchoServer() as echo:
        ws = await _tunnel(running, echo.port)
        try:
            assert await ws.roundtrip() == PROBE
            shorten_idle(running)
            (live,) = running.gateway.sessions.live_sessions()
            await asyncio.sleep(IDLE * 0.75)
            store = running.gateway.store
            await store.touch_sessions({live.id: datetime.now(UTC)})  # "another replica"
            elsewhere = time.monotonic()
            original = store.get_session

            async def broken(session_id: str) -> None:
                raise StoreError("the database is unavailable")

            store.get_session = broken  # type: ignore[method-assign]
            try:
                code, reason = await ws.closed(timeout=IDLE + 5)
            finally:
                store.get_session = original  # type: ignore[method-assign]
            assert code == 1008 and REASON in reason, (code, reason)
            # well before elsewhere + IDLE, the deadline the store would have given
            assert ws.closed_at - elsewhere < IDLE * 0.6, ws.closed_at - elsewhere
            assert "sessions.idle_check_failed" in caplog.text
        finally:
            await ws.aclose()


async def test_idle_metric_is_observed(running: Running) -> None:
    async with EchoServer() as echo:
        ws = await _tunnel(running, echo.port)
        try:
            assert await ws.roundtrip() == PROBE
            shorten_idle(running, 1)
            assert (await ws.closed(timeout=6))[0] == 1008
        finally:
            await ws.aclose()
        await wait_until(lambda: not service_of(running).open)
    async with running.admin() as s:
        st, text = await call(s, "GET", "/metrics")
    assert st == 200
    count = [ln for ln in text.splitlines() if ln.startswith('domum_cutoff_seconds_count{cause="idle"}')]
    assert count and float(count[0].split()[1]) == 1, count


async def test_a_policy_change_re_arms_the_idle_timer(running: Running) -> None:
    """An administrator shortens the group's idle timeout while a session is open: the
    session's timer moves to the new deadline at once (through the bus), not at the old one."""
    async with EchoServer() as echo:
        ws = await _tunnel(running, echo.port)
        try:
            assert await ws.roundtrip() == PROBE
            (live,) = running.gateway.sessions.live_sessions()
            loop = asyncio.get_running_loop()
            assert live.idle_timer is not None
            assert live.idle_timer.when() - loop.time() > 10 * 60  # the default 15 minutes
            async with running.admin() as s:
                st, group = await call(s, "GET", "/api/v1/groups")
                gid = next(g["id"] for g in group["items"] if g["id"] == live.grant.group_id)
                st, body = await call(
                    s,
                    "PATCH",
                    f"/api/v1/groups/{gid}",
                    {"policy": {"idle_timeout": {"value": 1, "unit": "minutes"}}},
                )
                assert st == 200, body

            def moved() -> bool:
                t = live.idle_timer
                return t is not None and t.when() - loop.time() < 61

            await wait_until(moved)
            assert live.grant.idle_timeout_seconds == 60 and not live.ended
        finally:
            await ws.aclose()
