"""``domum-gateway connect`` as a user runs it (a subprocess), with real clients behind it:
OpenSSH to a throwaway sshd, FreeRDP to Debian's xrdp, and the exits a script relies on."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from domum_gateway.pki import make_test_pki

from ..conftest import Running
from ..peers.sshd import Sshd, sshd_available
from ..peers.xrdp import Xrdp, Xvfb, rdp_missing, xfreerdp_auth_only
from .helpers import Seed, call, create_forwarded
from .test_tunnel import full_link, tcp_seed

pytestmark = pytest.mark.asyncio


@dataclass
class Cli:
    proc: asyncio.subprocess.Process
    port: int = 0
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    async def exit_code(self, timeout: float = 10.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def err(self) -> str:
        return "".join(self.stderr)


async def _collect(stream: asyncio.StreamReader | None, into: list[str]) -> None:
    assert stream is not None
    while line := await stream.readline():
        into.append(line.decode())


@asynccontextmanager
async def connect_cli(
    run: Running, sd: Seed, link_path: str, target: str, *extra: str, ca: Path | None = None
) -> AsyncIterator[Cli]:
    """Run ``domum-gateway connect ... --token-stdin`` and type the mailed token into it."""
    seen = len(run.mailbox.messages)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "domum_gateway.cli", "connect", full_link(run, link_path),
        "--target", target, "--listen", "127.0.0.1:0", "--token-stdin",
        "--ca", str(ca or run.gateway.settings.tls.ca), "--status-interval", "0.5", *extra,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    cli = Cli(proc)
    readers = [
        asyncio.create_task(_collect(proc.stdout, cli.stdout)),
        asyncio.create_task(_collect(proc.stderr, cli.stderr)),
    ]
    try:
        if ca is None:
            await run.mailbox.wait_count(seen + 1, timeout=10)
            assert proc.stdin is not None
            proc.stdin.write((run.mailbox.last_token(sd.email) + "\n").encode())
            await proc.stdin.drain()
            for _ in range(200):
                found = re.search(r"Listening on 127\.0\.0\.1:(\d+)", "".join(cli.stdout))
                if found or proc.returncode is not None:
                    break
                await asyncio.sleep(0.05)
            if found:
                cli.port = int(found.group(1))
        yield cli
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
        await asyncio.gather(*readers)


async def run_tool(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    """A client program, without blocking the loop the gateway runs on."""
    pipe = asyncio.subprocess.PIPE
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=pipe, stderr=pipe
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.skipif(not sshd_available(), reason="needs root and Debian openssh-server")
async def test_openssh_through_connect(running: Running, tmp_path: Path) -> None:
    with Sshd.running(tmp_path / "sshd") as sshd:
        sd = await tcp_seed(running, sshd.port, name="db01")
        _rid, link = await create_forwarded(running, sd)
        async with connect_cli(running, sd, link, "db01") as cli:
            assert cli.port, cli.err()
            known = tmp_path / "known_hosts"
            known.write_text(sshd.known_hosts_line(f"[127.0.0.1]:{cli.port}"))
            rc, out, err = await run_tool(
                "ssh", "-F", "/dev/null", "-i", str(sshd.client_key), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                "-p", str(cli.port), "root@127.0.0.1", "echo ok",
            )  # fmt: skip
            assert (rc, out.strip()) == (0, "ok"), err
            for _ in range(60):  # the status line comes every 0.5 s
                if "domum: " in cli.err():
                    break
                await asyncio.sleep(0.05)
            cli.proc.terminate()  # Ctrl-C / SIGTERM: sign out, exit 0
            assert await cli.exit_code() == 0
        assert "1 connection(s)" in cli.err()
        assert re.search(r"domum: \d+ open, 1 total, up [\d.]+ \w+, down", cli.err()), cli.err()


async def test_rdp_handshake_through_connect(running: Running, tmp_path: Path) -> None:
    missing = rdp_missing()
    if missing:
        print(f"SKIPPED real RDP: {missing}")
        pytest.skip(missing)
    xrdp = Xrdp.start(tmp_path / "xrdp")
    xvfb = Xvfb.start()
    try:
        sd = await seed_rdp(running, xrdp.port)
        _rid, link = await create_forwarded(running, sd)
        rdp_file = tmp_path / "rdp01.rdp"
        async with connect_cli(running, sd, link, "rdp01", "--rdp-file", str(rdp_file)) as cli:
            assert cli.port, cli.err()
            out = "".join(cli.stdout)
            assert f"Next: xfreerdp /v:127.0.0.1:{cli.port}" in out
            assert f"full address:s:127.0.0.1:{cli.port}" in rdp_file.read_text()
            result = await asyncio.to_thread(xfreerdp_auth_only, cli.port, xvfb.display)
            assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    finally:
        xrdp.stop()
        xvfb.stop()


async def seed_rdp(run: Running, port: int) -> Seed:
    return await tcp_seed(run, port, name="rdp01", protocol="rdp")


async def test_revoke_ends_the_cli_with_a_clear_message(running: Running) -> None:
    sd = await tcp_seed(running, 9)  # no tunnel is opened: the long poll notices
    rid, link = await create_forwarded(running, sd)
    async with connect_cli(running, sd, link, "echo") as cli:
        assert cli.port, cli.err()
        async with running.admin() as s:
            st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
            assert st == 200
        assert await cli.exit_code(timeout=5) == 1
    assert re.search(r"access has ended: access (was )?revoked", cli.err()), cli.err()


async def test_cli_refuses_plain_http_unknown_targets_and_untrusted_gateways(
    running: Running, tmp_path: Path
) -> None:
    sd = await tcp_seed(running, 9)
    _rid, link = await create_forwarded(running, sd)
    rc, _out, err = await run_tool(
        sys.executable, "-m", "domum_gateway.cli", "connect", "http://localhost/a/abcdefghijklmnopqrstuv",
        "--target", "echo", "--listen", "127.0.0.1:0",
    )  # fmt: skip
    assert rc == 2 and "https://" in err
    async with connect_cli(running, sd, link, "nope") as cli:
        assert await cli.exit_code() == 2
    assert "no tunnel target named 'nope'" in cli.err() or "tunnel target named 'nope'" in cli.err()
    assert "echo" in cli.err()
    _cert, _key, other_ca = make_test_pki(tmp_path / "other")
    async with connect_cli(running, sd, link, "echo", ca=other_ca) as cli:
        assert await cli.exit_code() == 3
    assert "certificate could not be verified" in cli.err()
