"""A real HAProxy (Debian ``haproxy``) in TCP mode on loopback, and the gateway replicas behind it.

The configuration has the shape of ``deploy/compose/haproxy.cfg``: TLS passes through
untouched, and each replica is health-checked with ``GET /readyz`` on its admin listener
over TLS (``check-ssl verify none``). Checks run faster than in the deployment so tests
see a replica go down and come back within a second or two. A stats socket in the work
dir answers ``show stat``, which is how a test learns what HAProxy thinks of each server.

``source_clientip`` (benchmarks) makes HAProxy connect to the replicas from the client's
own address (``source 0.0.0.0 usesrc clientip``): on loopback every 127.x address is
local, so no routing set-up is needed, and the gateway's per-address rate limits and
session address binding see many clients instead of one proxy.

``Replicas`` runs the gateways as users deploy them: ``domum-gateway init`` once (one
CA, TLS certificate and SSH host key, the schema and the first admin token in the shared
database), then one ``domum-gateway serve`` process per replica, each with its own copy of
the configuration that differs only in the listen ports. Every replica builds links from
the same ``public.base_url``: the load balancer's address.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HAPROXY", "Backend", "HAProxy", "Replica", "Replicas", "haproxy_missing", "listen_port"]

HAPROXY = Path(os.environ.get("DOMUM_HAPROXY", "/usr/sbin/haproxy"))


def haproxy_missing() -> str | None:
    """Why HAProxy cannot run here, or None when it can."""
    if not HAPROXY.exists():
        return f"{HAPROXY} not found (install Debian's haproxy; `make sysdeps`)"
    return None


def listen_port() -> int:
    """A free loopback port for a listener that binds it later (another process).

    Picked below the kernel's ephemeral range (32768-60999 here): a port from that range,
    free now, may become some connection's source port before the listener binds it,
    and the machine runs many connections (other tests, benchmarks).
    """
    for _ in range(200):
        port = random.randint(20000, 32767)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-32767")


@dataclass(frozen=True)
class Backend:
    """One gateway replica: its public port (traffic) and admin port (health checks)."""

    name: str
    port: int
    check_port: int


class HAProxy:
    """One HAProxy process balancing one TCP frontend over ``backends``."""

    def __init__(
        self,
        work: Path,
        backends: list[Backend],
        *,
        port: int | None = None,
        inter_ms: int = 250,
        balance: str = "roundrobin",
        source_clientip: bool = False,
    ) -> None:
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.port = port or listen_port()
        self.backends = backends
        self.inter_ms = inter_ms
        self.balance = balance
        self.source_clientip = source_clientip
        self.config = work / "haproxy.cfg"
        self.socket = work / "haproxy.sock"
        self.log = work / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def render(self) -> str:
        check = f"check-ssl verify none inter {self.inter_ms} fall 2 rise 2"
        servers = "\n".join(
            f"    server {b.name} 127.0.0.1:{b.port} check port {b.check_port} {check}" for b in self.backends
        )
        source = "    source 0.0.0.0 usesrc clientip\n" if self.source_clientip else ""
        return f"""\
global
    # Each connection takes two descriptors; the open-file hard limit here is 20,000.
    maxconn 8000
    stats socket {self.socket} mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h

frontend https
    bind 127.0.0.1:{self.port}
    default_backend gateways_https

backend gateways_https
    balance {self.balance}
{source}    option httpchk GET /readyz
    http-check expect status 200
{servers}
"""

    def start(self, timeout: float = 10.0) -> None:
        """Start in the foreground (``-db``) and wait until the frontend accepts."""
        self.config.write_text(self.render())
        check = subprocess.run(
            [str(HAPROXY), "-c", "-q", "-f", str(self.config)], capture_output=True, timeout=30, check=False
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c refused the config: {check.stderr.decode(errors='replace')}")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [str(HAPROXY), "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            with socket.socket() as s:
                s.settimeout(0.2)
                if s.connect_ex(("127.0.0.1", self.port)) == 0 and self.socket.exists():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"haproxy did not listen on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self, line: str) -> str:
        """One command on the stats socket; returns HAProxy's answer."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def states(self) -> dict[str, str]:
        """Each server's status as HAProxy sees it ("UP", "DOWN", "UP 1/2", ...)."""
        text = self.command("show stat").lstrip("# ")
        out: dict[str, str] = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("pxname") == "gateways_https" and row.get("svname") not in ("FRONTEND", "BACKEND"):
                out[row["svname"]] = row["status"]
        return out

    def wait_states(self, want: str, timeout: float = 10.0) -> float:
        """Seconds until every server's status is exactly ``want``; raises after ``timeout``."""
        started = time.monotonic()
        states: dict[str, str] = {}
        while time.monotonic() - started < timeout:
            with contextlib.suppress(OSError):
                states = self.states()
                if states and all(s == want for s in states.values()):
                    return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(f"HAProxy servers did not all become {want} within {timeout} s: {states}")


# gateway replicas ------------------------------------------------------------------------
_CLI = [sys.executable, "-m", "domum_gateway.cli"]


@dataclass
class Replica:
    """One ``domum-gateway serve`` process."""

    name: str
    config: Path
    public_port: int
    admin_port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    log_level: str = "INFO"

    @property
    def public_url(self) -> str:
        return f"https://127.0.0.1:{self.public_port}"

    @property
    def admin_url(self) -> str:
        return f"https://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def backend(self) -> Backend:
        return Backend(self.name, self.public_port, self.admin_port)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*_CLI, "--log-level", self.log_level, "serve", "--config", str(self.config), "--grace", "1"],
                cwd=self.config.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> int | None:
        """SIGTERM, then wait (kill after 15 s); returns the exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        return proc.returncode

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def ready(self, ctx: ssl.SSLContext) -> int:
        """The status of ``GET /readyz`` (0 when nothing answers)."""
        try:
            with urllib.request.urlopen(f"{self.admin_url}/readyz", context=ctx, timeout=3) as r:  # noqa: S310
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def wait_ready(self, ctx: ssl.SSLContext, status: int = 200, timeout: float = 30.0) -> float:
        """Seconds until ``/readyz`` answers ``status``; raises (with the log) after ``timeout``."""
        started = time.monotonic()
        got = 0
        while time.monotonic() - started < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            got = self.ready(ctx)
            if got == status:
                return time.monotonic() - started
            time.sleep(0.05)
        raise AssertionError(
            f"replica {self.name}: /readyz stayed {got}, expected {status} within {timeout} s\n"
            + self.log_tail()
        )


def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise RuntimeError(f"config template changed: expected {old!r} once")
    return text.replace(old, new)


@dataclass
class Replicas:
    """Gateway replicas sharing ``storage_url`` and one ``init``'s certificates and keys.

    Args:
        root: work dir (``config/``, ``certs/``, ``var/``, logs).
        storage_url: the shared database (``postgresql://...``).
        base_port: the load balancer's port, which goes into ``public.base_url``.
        smtp_port: an SMTP server on 127.0.0.1 (plain, no STARTTLS), or None for the outbox.
    """

    root: Path
    storage_url: str
    base_port: int
    smtp_port: int | None = None
    log_level: str = "INFO"
    token: str = ""
    members: dict[str, Replica] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.root / "certs" / "ca.crt"

    @property
    def base_url(self) -> str:
        """``public.base_url``: the load balancer's address, as users see it."""
        return f"https://localhost:{self.base_port}"

    def _config_text(self, public_port: int, admin_port: int) -> str:
        from domum_gateway.config_template import render_config

        text = render_config("localhost", self.base_port, 2222, admin_port)
        text = _replace_once(
            text, f'listen = "0.0.0.0:{self.base_port}"', f'listen = "127.0.0.1:{public_port}"'
        )
        text = _replace_once(text, 'listen = "0.0.0.0:2222"', 'listen = "127.0.0.1:0"')
        text = _replace_once(text, 'url = "sqlite:///../var/domum.db"', f'url = "{self.storage_url}"')
        if self.smtp_port is not None:
            text = _replace_once(text, 'smtp_host = ""', 'smtp_host = "127.0.0.1"')
            text = _replace_once(text, "smtp_port = 587", f"smtp_port = {self.smtp_port}")
            text = _replace_once(text, "starttls = true", "starttls = false")
            text = _replace_once(text, 'sender = ""', 'sender = "gateway@example.com"')
        return text

    def add(self, name: str) -> Replica:
        """Write ``config/{name}.toml`` (the shared config with this replica's ports)."""
        public_port, admin_port = listen_port(), listen_port()
        config = self.root / "config" / f"{name}.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(self._config_text(public_port, admin_port))
        log = self.root / f"{name}.log"
        replica = Replica(name, config, public_port, admin_port, log, log_level=self.log_level)
        self.members[name] = replica
        return replica

    def init(self) -> str:
        """``domum-gateway init`` once, with the first replica's config; returns the admin token."""
        first = next(iter(self.members.values()))
        done = subprocess.run(
            [*_CLI, "init", "--config", str(first.config), "--hostname", "localhost"],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"init failed ({done.returncode}): {done.stderr[-2000:]}")
        m = re.search(r"^token: (\S+)$", done.stdout, re.M)
        if m is None:
            raise RuntimeError(f"init printed no admin token: {done.stdout}")
        self.token = m.group(1)
        return self.token

    def client_context(self) -> ssl.SSLContext:
        """Trusts the shared CA only, and checks host names (the certificate names 127.0.0.1)."""
        return ssl.create_default_context(cafile=str(self.ca))

    def stop_all(self) -> dict[str, int | None]:
        return {name: r.stop() for name, r in reversed(self.members.items())}
