"""SSH benchmark: bulk throughput through jump hosts, and browser-terminal keystroke latency.

    .venv/bin/python bench/ssh.py                 # 1 GiB, 3 runs, 1,000 keystrokes

Throughput of ``head -c 1GiB /dev/zero | ssh ... 'echo ready; cat > /dev/null'``, timed
from the ``ready`` line (connections up, signed in everywhere) to ``ssh``'s exit:

  (a) direct     the OpenSSH client straight to the target sshd
  (b) openssh    ``ssh -J`` through a second OpenSSH sshd used as the jump host
  (b') openssh-gcm  the same, with the jump hop's cipher set to aes128-gcm
  (c) gateway    ``ssh -J`` through ``domum-gateway serve``'s jump server

Every hop uses the client's default algorithms against what the server offers: OpenSSH
to OpenSSH negotiates chacha20-poly1305; the gateway offers AES-GCM only (see
``proxy/ssh_common.py``), so its outer hop is aes128-gcm while the end-to-end session
inside stays chacha20-poly1305, as in (b). (b') takes the cipher out of the comparison.
The gateway's sign-in (personal link, then a token it writes to its outbox) is answered
by an SSH_ASKPASS helper; the time from starting ``ssh`` to ``ready`` is reported as
``gateway_sign_in_s``.

Keystroke latency: a websocket client (the browser terminal's protocol, same Origin and
cookie as the page) signed in to a password sshd through ``/ws/ssh/{target}`` runs
``stty -echo -icanon; cat`` in the target's pty (so each byte is echoed by a program,
as a shell or an editor does), sends one byte at a time and waits for it to come back:
websocket -> gateway -> SSH channel -> sshd -> pty -> cat -> back. p50 and p99 over
the keystrokes (after 50 warm-up keys).

The gateway runs as its own process (``domum-gateway serve``, uvloop), like in
production; its CPU seconds during each (c) run are reported. The last line printed is
one JSON object with every figure (medians over the runs) and the ratio c/b.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUTBOX_TOKEN, ROOT, GatewayProcess, Procs, cpu_seconds, percentile, ratio

sys.path.insert(0, str(ROOT))
from tests.load.signin import browser, sign_in
from tests.peers.askpass import askpass_env, put
from tests.peers.sshd import Sshd, ensure_user

GIB = 1024**3
TERM_USER = "domumtest"
TERM_PASSWORD = "Tr0ub4dor-and-3"  # a throwaway local account the benchmark creates


class Gateway(GatewayProcess):
    """The gateway under test (its SSH jump server too), granting SSH targets."""

    def __init__(self, procs: Procs, work: Path) -> None:
        super().__init__(procs, work)
        self.host_key = (work / "certs" / "ssh_host_ed25519_key.pub").read_text().strip()

    def grant(self, name: str, targets: dict[str, Sshd]) -> tuple[str, str]:
        """A forwarded grant of ``targets`` (name -> sshd) for a new user; (email, link)."""
        bodies = [
            {
                "name": target,
                "protocol": "ssh",
                "host": "127.0.0.1",
                "port": sshd.port,
                "ssh_host_key": sshd.host_key_line,
            }
            for target, sshd in targets.items()
        ]
        who = self.add_user(name, bodies)
        _rid, link = self.forward(who)
        return who.email, link


def ssh_config(work: Path, gw: Gateway, target: Sshd, jump: Sshd) -> Path:
    kh = work / "known_hosts"
    kh.write_text(
        target.known_hosts_line()
        + jump.known_hosts_line()
        + f"[127.0.0.1]:{gw.ssh} {' '.join(gw.host_key.split()[:2])}\n"
    )
    cfg = work / "ssh_config"
    cfg.write_text(
        f"""Host ojump
  HostName 127.0.0.1
  Port {jump.port}
  User root
  Ciphers aes128-gcm@openssh.com
Host gw
  HostName 127.0.0.1
  Port {gw.ssh}
  User {{user}}
  PreferredAuthentications keyboard-interactive
Host *
  UserKnownHostsFile {kh}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  IdentityFile {target.client_key}
  IdentityFile {jump.client_key}
  IdentitiesOnly yes
  ControlMaster no
  ControlPath none
  Compression no
  LogLevel ERROR
"""
    )
    return cfg


def transfer(
    cfg: Path,
    jump: list[str],
    port: int,
    size: int,
    env: dict[str, str] | None = None,
    on_started: Any = None,
) -> tuple[float, float]:
    """Pipe ``size`` zero bytes into ``cat > /dev/null`` on the target; (seconds, login seconds).

    The remote command first prints one line, so the time to sign in (jump prompts
    included) is measured apart from the transfer.
    """
    ssh = ["ssh", "-F", str(cfg), *jump, "-p", str(port), "root@127.0.0.1", "echo ready; cat > /dev/null"]
    cmd = f"head -c {size} /dev/zero | {shlex.join(ssh)}"
    start = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-c", f"set -o pipefail; {cmd}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    if on_started is not None:
        on_started()
    assert proc.stdout is not None
    line = proc.stdout.readline()
    ready = time.monotonic()
    if line != b"ready\n":
        proc.kill()
        raise RuntimeError(f"ssh did not start: {proc.communicate(timeout=10)[1].decode(errors='replace')}")
    _, err = proc.communicate(timeout=900)
    end = time.monotonic()
    if proc.returncode != 0:
        raise RuntimeError(f"ssh failed ({proc.returncode}): {err.decode(errors='replace')}")
    return end - ready, ready - start


def mb_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


async def web_cookie(gw: Gateway, link: str) -> str:
    """Sign in through the public pages like a browser; return the session cookie."""

    async def token() -> str:
        return await asyncio.to_thread(gw.from_outbox, OUTBOX_TOKEN)

    base = f"https://localhost:{gw.public}"
    async with browser(base, gw.tls, headers={"Origin": base}) as s:
        cookie, _portal = await sign_in(s, URL(link).path, token)
    return cookie


async def keystroke_latency(gw: Gateway, cookie: str, target: str, keys: int) -> list[float]:
    base = f"https://localhost:{gw.public}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=gw.tls)) as s:
        ws = await s.ws_connect(
            f"{base}/ws/ssh/{target}", headers={"Origin": base, "Cookie": f"__Host-domum={cookie}"}
        )
        seen = bytearray()

        async def expect(needle: bytes, timeout: float = 20.0) -> None:
            deadline = time.monotonic() + timeout
            while needle not in seen:
                msg = await ws.receive(max(0.01, deadline - time.monotonic()))
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    raise RuntimeError(f"terminal closed: {msg.type} {msg.extra}; saw {bytes(seen)!r}")
                seen.extend(msg.data)

        await expect(b"login as: ")
        await ws.send_bytes(f"{TERM_USER}\r".encode())
        await expect(b"assword: ")
        await ws.send_bytes(f"{TERM_PASSWORD}\r".encode())
        await expect(b"$ ")
        await ws.send_bytes(b"stty -echo -icanon; cat\r")
        await expect(b"cat\r\n")
        await asyncio.sleep(0.3)
        seen.clear()
        samples: list[float] = []
        for i in range(keys + 50):
            char = b"abcdefghijklmnopqrstuvwxyz"[i % 26 : i % 26 + 1]
            start = time.perf_counter()
            await ws.send_bytes(char)
            await expect(char, 5.0)
            if i >= 50:
                samples.append(time.perf_counter() - start)
            seen.clear()
        await ws.send_bytes(b"\x03")
        await ws.close()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keys", type=int, default=1000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/ssh.py needs root (sshd, a throwaway local user)", file=sys.stderr)
        return 2
    size = args.size_mib * 1024 * 1024
    procs = Procs()
    results: dict[str, list[float]] = {
        "direct": [],
        "openssh": [],
        "openssh_gcm": [],
        "gateway": [],
        "login": [],
        "cpu": [],
    }
    with tempfile.TemporaryDirectory(prefix="domum-bench-ssh-") as tmp:
        work = Path(tmp)
        ensure_user(TERM_USER, TERM_PASSWORD)
        target = Sshd.start(work / "target")
        jump = Sshd.start(work / "jump", options={"AllowTcpForwarding": "yes"})
        pam = Sshd.start(work / "pam", password=True)
        try:
            gw = Gateway(procs, work / "gateway")
            email, link = gw.grant("bench", {"db01": target})
            _email2, link2 = gw.grant("bench-term", {"pam01": pam})
            cfg_text = ssh_config(work, gw, target, jump).read_text().replace("{user}", email)
            cfg = work / "ssh_config"
            cfg.write_text(cfg_text)
            askdir = work / "askpass"
            env = askpass_env(askdir)
            put(askdir / "link", link)

            def hand_token() -> None:
                # The token exists once the helper answered the link prompt.
                put(askdir / "token", gw.from_outbox(OUTBOX_TOKEN))

            for run in range(args.runs):
                seconds, _ = transfer(cfg, [], target.port, size)
                results["direct"].append(mb_s(size, seconds))
                seconds, _ = transfer(cfg, ["-J", f"root@127.0.0.1:{jump.port}"], target.port, size)
                results["openssh"].append(mb_s(size, seconds))
                seconds, _ = transfer(cfg, ["-J", "ojump"], target.port, size)
                results["openssh_gcm"].append(mb_s(size, seconds))
                before = cpu_seconds(gw.proc.pid)
                seconds, login = transfer(
                    cfg, ["-J", "gw"], target.port, size, env=env, on_started=hand_token
                )
                results["cpu"].append(cpu_seconds(gw.proc.pid) - before)
                results["gateway"].append(mb_s(size, seconds))
                results["login"].append(login)
                print(
                    f"run {run + 1}: direct {results['direct'][-1]:.0f} MB/s, openssh jump "
                    f"{results['openssh'][-1]:.0f} MB/s (aes-gcm hop {results['openssh_gcm'][-1]:.0f}), "
                    f"gateway jump {results['gateway'][-1]:.0f} MB/s "
                    f"(sign-in {login:.2f} s, gateway CPU {results['cpu'][-1]:.1f} s)",
                    flush=True,
                )
            cookie = asyncio.run(web_cookie(gw, link2))
            samples = asyncio.run(keystroke_latency(gw, cookie, "pam01", args.keys))
        finally:
            procs.stop_all()
            for sshd in (target, jump, pam):
                sshd.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    figures = {
        "bench": "ssh",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "size_mib": args.size_mib,
        "runs": args.runs,
        "direct_mb_s": round(med["direct"], 1),
        "openssh_jump_mb_s": round(med["openssh"], 1),
        "openssh_jump_aes_gcm_mb_s": round(med["openssh_gcm"], 1),
        "gateway_jump_mb_s": round(med["gateway"], 1),
        "gateway_vs_openssh_jump": ratio(med["gateway"], med["openssh"]),
        "gateway_vs_openssh_jump_aes_gcm": ratio(med["gateway"], med["openssh_gcm"]),
        "gateway_cpu_s_per_gib": round(med["cpu"] / (size / GIB), 2),
        "gateway_sign_in_s": round(med["login"], 2),
        "keystroke_p50_ms": round(percentile(samples, 50) * 1000, 3),
        "keystroke_p99_ms": round(percentile(samples, 99) * 1000, 3),
        "keystrokes": len(samples),
        "runs_mb_s": {
            k: [round(x, 1) for x in results[k]] for k in ("direct", "openssh", "openssh_gcm", "gateway")
        },
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
