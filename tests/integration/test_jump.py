"""The native SSH jump server against the real OpenSSH client and a real OpenSSH target."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from ..conftest import Running
from ..peers.askpass import JumpClient, put
from ..peers.sshd import Sshd, free_port, sshd_available
from .helpers import Seed, call, create_forwarded, seed

pytestmark = [
    pytest.mark.skipif(not sshd_available(), reason="needs root and Debian openssh-server"),
]


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Sshd]:
    with Sshd.running(tmp_path / "target") as sshd:
        yield sshd


async def seed_ssh(run: Running, sshd: Sshd, *, name: str = "db01", email: str = "alice@example.com") -> Seed:
    return await seed(
        run,
        email=email,
        target={
            "name": name,
            "protocol": "ssh",
            "host": "127.0.0.1",
            "port": sshd.port,
            "ssh_host_key": sshd.host_key_line,
        },
    )


def jump_client(run: Running, sshd: Sshd, dir: Path, email: str) -> JumpClient:
    key_pub = run.gateway.settings.ssh.host_key.with_name(run.gateway.settings.ssh.host_key.name + ".pub")
    return JumpClient(
        dir,
        run.gateway.ssh_port(),
        key_pub.read_text(),
        email,
        identity=sshd.client_key,
        known_hosts=[sshd.known_hosts_line(), sshd.known_hosts_line("db01")],
    )


async def sleeping_through_jump(
    run: Running, target: Sshd, dir: Path, email: str, link: str, line: bytes = b"started"
) -> tuple[JumpClient, asyncio.subprocess.Process]:
    """``ssh -J gw`` to ``target`` signed in with ``link`` (the token from the mailbox),
    running a remote command that prints ``line`` and then sleeps a minute, printed."""
    jc = jump_client(run, target, dir, email)
    before = len(run.mailbox.messages)
    command = f"echo {line.decode()}; sleep 60"
    proc = await jc.start("-J", "gw", "-p", str(target.port), "root@127.0.0.1", command, link=link)
    await jc.give_token(run.mailbox, email, before)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 20) == line + b"\n"
    return jc, proc


async def test_ssh_J_runs_a_command_on_the_target(running: Running, target: Sshd, tmp_path: Path) -> None:
    sd = await seed_ssh(running, target)
    _rid, link = await create_forwarded(running, sd)
    jc = jump_client(running, target, tmp_path / "client", sd.email)
    result = await jc.run(
        "-J",
        "gw",
        "-p",
        str(target.port),
        "root@127.0.0.1",
        "echo domum-ok",
        link=running.public_url + link,
        mailbox=running.mailbox,
        email=sd.email,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"domum-ok\n"


async def audit_events(run: Running, action: str, at_least: int = 0) -> list[dict[str, Any]]:
    """Audit events of one type; waits a little for ``at_least`` (they are written async)."""
    deadline = time.monotonic() + 5
    while True:
        async with run.admin() as s:
            st, page = await call(s, "GET", f"/api/v1/audit?type={action}&limit=100")
            assert st == 200, page
        items = list(page["items"])
        if len(items) >= at_least or time.monotonic() > deadline:
            return items
        await asyncio.sleep(0.05)


async def test_design_doc_syntax_user_at_domain_at_gateway(
    running: Running, target: Sshd, tmp_path: Path
) -> None:
    sd = await seed_ssh(running, target)
    _rid, link = await create_forwarded(running, sd)
    jc = jump_client(running, target, tmp_path / "client", sd.email)
    jump = f"{sd.email}@127.0.0.1:{running.gateway.ssh_port()}"
    result = await jc.run(
        "-J",
        jump,
        "-p",
        str(target.port),
        "root@127.0.0.1",
        "id -un",
        link=link.rsplit("/", 1)[1],
        mailbox=running.mailbox,
        email=sd.email,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"root\n"
    # OpenSSH puts "(user@host) " in front of keyboard-interactive prompts.
    prompts = [p.rsplit(") ", 1)[-1] for p in jc.prompts() if p]
    assert prompts == ["Personal link: ", "Token: "]
    assert "A one-time token was sent to a***@example.com." in result.stderr
    [opened] = await audit_events(running, "ssh.channel.opened", 1)
    assert opened["details"]["target"] == "db01" and opened["subject"] == sd.target_id


async def test_ssh_W_reaches_a_target_by_name(running: Running, target: Sshd, tmp_path: Path) -> None:
    sd = await seed_ssh(running, target)
    _rid, link = await create_forwarded(running, sd)
    jc = jump_client(running, target, tmp_path / "client", sd.email)
    proxy = f"ssh -F {jc.config} -W %h:%p gw"
    result = await jc.run(
        "-o",
        f"ProxyCommand={proxy}",
        "root@db01",
        "echo via-name",
        link=running.public_url + link,
        mailbox=running.mailbox,
        email=sd.email,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"via-name\n"


async def test_scp_50_mib_through_the_jump(running: Running, target: Sshd, tmp_path: Path) -> None:
    sd = await seed_ssh(running, target)
    _rid, link = await create_forwarded(running, sd)
    jc = jump_client(running, target, tmp_path / "client", sd.email)
    src = tmp_path / "payload.bin"
    with src.open("wb") as f:
        for _ in range(50):
            f.write(os.urandom(1024 * 1024))
    dest = tmp_path / "received.bin"
    result = await jc.run(
        "-J",
        "gw",
        "-P",
        str(target.port),
        str(src),
        f"root@127.0.0.1:{dest}",
        link=running.public_url + link,
        mailbox=running.mailbox,
        email=sd.email,
        program="scp",
    )
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
    metrics = running.gateway.metrics.render().decode()
    up = re.search(r'domum_tunnel_bytes_total\{direction="up",protocol="ssh"\} (\S+)', metrics)
    assert up is not None and float(up.group(1)) > 50 * 1024 * 1024


async def test_wrong_token_is_refused_with_a_reason(running: Running, target: Sshd, tmp_path: Path) -> None:
    sd = await seed_ssh(running, target)
    _rid, link = await create_forwarded(running, sd)
    jc = jump_client(running, target, tmp_path / "client", sd.email)
    before = len(running.mailbox.messages)
    proc = await jc.start("-J", "gw", "-p", str(target.port), "root@127.0.0.1", "true", link=link)
    await running.mailbox.wait_count(before + 1)
    good = running.mailbox.last_token(sd.email)
    bad = f"{(int(good) + 1) % 10**8:08d}"
    for _ in range(3):
        put(jc.dir / "token", bad)
        while (jc.dir / "token").exists() and proc.returncode is None:
            await asyncio.sleep(0.02)
    result = await jc.finish(proc)
    assert result.returncode == 255
    assert "That token is not valid" in result.stderr
    assert "This link or token is not valid" in result.stderr
    assert "Domum Gateway: sign-in failed; connect again to get a new token" in result.stderr
    assert len(running.mailbox.messages) == before + 1, "no second token without a new attempt"
    refused = await audit_events(running, "login.refused")
    assert [e["outcome"] for e in refused] == ["wrong"] * 3
    assert not await audit_events(running, "ssh.channel.opened")


async def test_link_under_another_name_sends_nothing(running: Running, target: Sshd, tmp_path: Path) -> None:
    sd = await seed_ssh(running, target)
    _rid, link = await create_forwarded(running, sd)
    jc = jump_client(running, target, tmp_path / "client", "mallory@example.com")
    before = len(running.mailbox.messages)
    proc = await jc.start("-o", "NumberOfPasswordPrompts=10", "gw", "true", link=link)
    result = await jc.finish(proc, 30)
    assert result.returncode == 255
    assert "This link or token is not valid" in result.stderr
    # The server stops after three failed rounds even if the client would go on.
    assert "too many failed sign-in attempts" in result.stderr
    assert len(running.mailbox.messages) == before


async def test_target_not_granted_and_changed_host_key(
    running: Running, target: Sshd, tmp_path: Path
) -> None:
    sd = await seed_ssh(running, target)
    _rid, link = await create_forwarded(running, sd)
    with Sshd.running(tmp_path / "other") as other:
        jc = jump_client(running, target, tmp_path / "client", sd.email)
        result = await jc.run(
            "-J",
            "gw",
            "-p",
            str(other.port),
            "root@127.0.0.1",
            "true",
            link=link,
            mailbox=running.mailbox,
            email=sd.email,
        )
        assert result.returncode == 255
        assert "administratively prohibited" in result.stderr
        assert "does not include that resource" in result.stderr
    [refused] = await audit_events(running, "ssh.channel.refused", 1)
    assert refused["outcome"] == "denied"
    assert refused["details"]["reason"] == "target_not_granted"
    assert refused["details"]["requested"] == f"127.0.0.1:{other.port}"
    # The end-to-end session is the client's: a target whose key changed is caught by the
    # client's own known_hosts, through the jump, before any credential is used.
    impostor = JumpClient(
        tmp_path / "impostor",
        jc.jump_port,
        jc.jump_key_line,
        sd.email,
        identity=target.client_key,
        known_hosts=[f"[127.0.0.1]:{target.port} {other.host_key_type_and_blob}"],
    )
    result = await impostor.run(
        "-J",
        "gw",
        "-p",
        str(target.port),
        "root@127.0.0.1",
        "true",
        link=link,
        mailbox=running.mailbox,
        email=sd.email,
    )
    assert result.returncode == 255
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in result.stderr


async def test_forwards_shells_and_agent_are_refused(running: Running, target: Sshd, tmp_path: Path) -> None:
    sd = await seed_ssh(running, target)
    _rid, link = await create_forwarded(running, sd)
    jc = jump_client(running, target, tmp_path / "client", sd.email)
    # -R: the gateway never listens for anyone.
    result = await jc.run(
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-R",
        "0:127.0.0.1:22",
        "gw",
        link=link,
        mailbox=running.mailbox,
        email=sd.email,
        timeout=30,
    )
    assert result.returncode == 255
    assert "remote port forwarding failed" in result.stderr
    # A shell or command (and with it agent and X11 forwarding): the gateway runs nothing.
    result = await jc.run(
        "-A",
        "-o",
        "ForwardX11=yes",
        "gw",
        "id",
        link=link,
        mailbox=running.mailbox,
        email=sd.email,
        timeout=30,
    )
    assert result.returncode == 255
    assert "does not run shells or commands" in result.stderr
    # -L to something not granted: the listener is the client's, the channel is refused.
    port = free_port()
    blocked = free_port()
    before = len(running.mailbox.messages)
    proc = await jc.start("-N", "-L", f"127.0.0.1:{port}:127.0.0.1:{blocked}", "gw", link=link)
    await jc.give_token(running.mailbox, sd.email, before)
    deadline = time.monotonic() + 15
    data = None
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        break
    proc.terminate()
    await jc.finish(proc, 10)
    assert data == b""
    kinds = sorted(
        (e["details"]["kind"], e["details"]["reason"])
        for e in await audit_events(running, "ssh.channel.refused", 3)
    )
    assert kinds == [
        ("direct-tcpip", "target_not_granted"),
        ("session", "not_allowed"),
        ("tcpip-forward", "not_allowed"),
    ]


async def test_revoke_disconnects_within_a_second_and_the_link_stops_working(
    running: Running, target: Sshd, tmp_path: Path
) -> None:
    sd = await seed_ssh(running, target)
    rid, link = await create_forwarded(running, sd)
    jc, proc = await sleeping_through_jump(running, target, tmp_path / "client", sd.email, link)
    async with running.admin() as s:
        started = time.monotonic()
        st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
        assert st == 200
    result = await jc.finish(proc, 10)
    assert time.monotonic() - started < 1.5
    assert result.returncode == 255
    assert "Domum Gateway: access revoked" in result.stderr
    before = len(running.mailbox.messages)
    result = await jc.finish(await jc.start("-J", "gw", "root@127.0.0.1", "true", link=link), 30)
    assert result.returncode == 255
    assert "This link or token is not valid" in result.stderr
    assert len(running.mailbox.messages) == before


async def test_only_modern_algorithms_and_strict_kex(running: Running, target: Sshd, tmp_path: Path) -> None:
    sd = await seed_ssh(running, target)
    jc = jump_client(running, target, tmp_path / "client", sd.email)
    proc = await asyncio.create_subprocess_exec(
        *jc.argv("-vv", "-o", "BatchMode=yes", "gw", "true"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    result = await jc.finish(proc, 30)
    peer = result.stderr.split("peer server KEXINIT proposal", 1)[1]
    kex = re.search(r"KEX algorithms: (\S+)", peer)
    ciphers = re.search(r"ciphers stoc: (\S+)", peer)
    assert kex is not None and ciphers is not None
    assert "kex-strict-s-v00@openssh.com" in kex.group(1).split(",")
    assert ciphers.group(1) == "aes128-gcm@openssh.com,aes256-gcm@openssh.com"
    assert "kex: server->client cipher: aes128-gcm@openssh.com" in result.stderr
    assert "Authentications that can continue: keyboard-interactive" in result.stderr
    # A client that insists on ChaCha20 or CBC finds nothing in common.
    for cipher in ("chacha20-poly1305@openssh.com", "aes128-cbc"):
        with pytest.raises(asyncssh.KeyExchangeFailed):
            await asyncssh.connect(
                "127.0.0.1",
                running.gateway.ssh_port(),
                known_hosts=None,
                encryption_algs=[cipher],
                username=sd.email,
                config=[],
                client_keys=[],
                agent_path=None,
            )


async def test_shutdown_tells_connected_clients_why(running: Running, target: Sshd, tmp_path: Path) -> None:
    sd = await seed_ssh(running, target)
    _rid, link = await create_forwarded(running, sd)
    jc, proc = await sleeping_through_jump(running, target, tmp_path / "client", sd.email, link, b"up")
    await running.gateway.jump.stop()
    result = await jc.finish(proc, 10)
    assert result.returncode == 255
    assert "Domum Gateway: the gateway is shutting down" in result.stderr
    # The SSH connection was the session: it is over, not left to idle out.
    [ended] = await audit_events(running, "session.ended", 1)
    assert ended["details"]["reason"] == "the SSH connection closed"
