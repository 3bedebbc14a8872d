"""Shared helpers for the benchmarks: processes, ports, CPU accounting, a gateway under
test, percentiles and ratios, nginx and wrk.

Everything runs on 127.0.0.1, every wait is bounded, and every process a benchmark
starts is stopped by its pid (``Procs.stop_all``), never by name.

The scripts run as ``python bench/x.py`` and import this as ``common`` (their own folder
is on ``sys.path``). What a benchmark shares with the tests (a remote user's sign-in
through the pages, real peers) lives in ``tests/`` and is imported from there with the
repository root on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = [
    "NGINX",
    "OUTBOX_LINK",
    "OUTBOX_TOKEN",
    "PY",
    "ROOT",
    "WRK",
    "GatewayProcess",
    "Grantee",
    "Procs",
    "WrkResult",
    "children",
    "cpu_seconds",
    "free_port",
    "machine_cpu_seconds",
    "nginx_conf",
    "percentile",
    "raise_nofile",
    "ratio",
    "rss_kib",
    "run_wrk",
    "start_nginx",
    "wait_port",
]

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
OUTBOX_LINK = r"https://\S+/a/[A-Za-z0-9_-]+"  # a personal link, in the message that forwards a request
OUTBOX_TOKEN = r"\b\d{8}\b"  # a one-time token
_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to its hard limit (children inherit it);
    return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def cpu_seconds(pid: int, *, reaped: bool = False) -> float:
    """User + system CPU seconds of ``pid`` (all its threads), from /proc; with ``reaped``,
    plus those of its children it has waited for (socat and websockify fork per connection,
    PostgreSQL per backend)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12])  # utime stime
    if reaped:
        used += int(fields[13]) + int(fields[14])  # cutime cstime
    return used / _TICK


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's list)."""
    out: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


class Procs:
    """Processes a benchmark started; stopped by pid in reverse order (a child that reads
    its stdin until the end is told first by closing it)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, args: list[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(args, **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                if proc.stdin is not None:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ``values``; 0.0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def ratio(ours: float, ref: float, digits: int = 3) -> float:
    """``ours / ref`` rounded to ``digits``; 0.0 when the reference is 0 (it did not run)."""
    return round(ours / ref, digits) if ref else 0.0


@dataclass(frozen=True)
class Grantee:
    """A user in a group of its own, and a reason: what an access request needs."""

    group_id: str
    user_id: str
    reason_id: str
    email: str


class GatewayProcess:
    """``domum-gateway init`` then ``serve`` in ``work`` (SQLite, mail to the outbox) on free
    loopback ports, and what a benchmark asks of it: blocking admin API calls, messages from
    the outbox, a user with a forwarded access request.

    Args:
        procs: starts (and later stops) ``serve``.
        work: an empty folder for the config, certificates, database and outbox.
        serve_flags: interpreter flags in front of ``-m domum_gateway.cli`` (``-O``, a profiler).
    """

    def __init__(self, procs: Procs, work: Path, *, serve_flags: Sequence[str] = ()) -> None:
        self.work = work
        self.public, self.ssh, self.admin = free_port(), free_port(), free_port()
        config = work / "config" / "domum.toml"
        config.parent.mkdir(parents=True)
        sys.path.insert(0, str(ROOT / "src"))
        from domum_gateway.config_template import render_config

        text = render_config("localhost", self.public, self.ssh, self.admin)
        config.write_text(text.replace('listen = "0.0.0.0:', 'listen = "127.0.0.1:'))
        self.config = config
        out = subprocess.run(
            [PY, "-m", "domum_gateway.cli", "init", "--config", str(config), "--hostname", "localhost"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        token = re.search(r"token: (\S+)", out)
        if token is None:
            raise RuntimeError(f"init printed no admin token: {out}")
        self.token = token.group(1)
        self.ca = work / "certs" / "ca.crt"
        self.outbox = work / "var" / "outbox"
        self.tls = ssl.create_default_context(cafile=str(self.ca))
        serve = [PY, *serve_flags, "-m", "domum_gateway.cli", "--log-level", "WARNING", "serve"]
        self.proc = procs.start([*serve, "--config", str(config)], stdout=subprocess.DEVNULL)
        for port in (self.public, self.admin, self.ssh):
            wait_port(port)
        self._seen: set[str] = set()

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One admin API call (blocking): the JSON answer, else the raw body."""
        req = urllib.request.Request(
            f"https://localhost:{self.admin}{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, context=self.tls, timeout=30) as resp:  # noqa: S310
            raw = resp.read()
        return json.loads(raw) if raw and resp.headers.get_content_type().endswith("json") else raw

    def from_outbox(self, pattern: str, timeout: float = 20.0) -> str:
        """The first match of ``pattern`` in the oldest message not read before (blocking)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path in sorted(self.outbox.glob("*.txt")):  # named by UTC time: oldest first
                if path.name in self._seen:
                    continue
                m = re.search(pattern, path.read_text())
                if m:
                    self._seen.add(path.name)
                    return m.group(0)
            time.sleep(0.02)
        raise RuntimeError(f"nothing matching {pattern} in {self.outbox}")

    def add_user(self, name: str, targets: Sequence[dict[str, Any]]) -> Grantee:
        """``targets`` (API bodies), a group ``name`` granting them, its user
        ``name@example.com`` and a reason."""
        ids = [self.api("POST", "/api/v1/targets", body)["id"] for body in targets]
        policy = {
            "targets": ids,
            "max_duration": {"value": 30, "unit": "days"},
            "idle_timeout": {"value": 2, "unit": "hours"},
            "max_sessions": 10,
        }
        group = self.api("POST", "/api/v1/groups", {"name": name, "kind": "internal", "policy": policy})
        email = f"{name}@example.com"
        user = self.api("POST", "/api/v1/users", {"group_id": group["id"], "name": name, "email": email})
        reason = self.api("POST", "/api/v1/reasons", {"label": f"Benchmark {name}"})
        return Grantee(group["id"], user["id"], reason["id"], email)

    def forward(self, who: Grantee) -> tuple[str, str]:
        """A day's access request for ``who``, from five minutes ago, forwarded; returns
        (request id, the personal link's URL from the outbox)."""
        start = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
        req = self.api(
            "POST",
            "/api/v1/access-requests",
            {
                "group_id": who.group_id,
                "user_id": who.user_id,
                "justification": "Benchmark",
                "reason_id": who.reason_id,
                "start": start,
                "duration": {"value": 1, "unit": "days"},
            },
        )
        self.api("POST", f"/api/v1/access-requests/{req['id']}/forward")
        return str(req["id"]), self.from_outbox(OUTBOX_LINK)


def nginx_conf(work: Path, name: str, servers: str) -> Path:
    """An nginx.conf for one worker with every path inside ``work/name``."""
    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "nginx.conf"
    temp = " ".join(
        f"{kind}_temp_path {root}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf.write_text(
        f"""worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  {temp}
  keepalive_requests 1000000;
{servers}
}}
"""
    )
    return conf


def start_nginx(procs: Procs, conf: Path, port: int) -> int:
    """Start nginx in the foreground; return its worker's pid (where the work happens)."""
    master = procs.start(
        [
            NGINX,
            "-p",
            str(conf.parent) + "/",
            "-c",
            str(conf),
            "-e",
            str(conf.parent / "error.log"),
            "-g",
            "daemon off;",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        kids = children(master.pid)
        if kids:
            return kids[0]
        time.sleep(0.05)
    return master.pid


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    mb_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_s: float = 0.0
    other_cpu_s: float = 0.0  # the rest of the machine during the run (not wrk, not the servers)

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "rps": round(self.rps, 1),
            "mb_s": round(self.mb_per_s, 2),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "errors": self.errors,
            "cpu_us_per_req": round(self.cpu_us_per_request, 1),
            "other_cpu_s": round(self.other_cpu_s, 2),
        }


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_BYTES = {"B": 1 / 1e6, "KB": 1024 / 1e6, "MB": 1024**2 / 1e6, "GB": 1024**3 / 1e6}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    reqs = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    tps = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if not (reqs and rps and tps and p50 and p99):
        raise RuntimeError("could not read wrk's output:\n" + out)
    seconds = float(reqs.group(2)) * (60.0 if reqs.group(3) == "m" else 1.0)
    errors = int(non2xx.group(1)) if non2xx else 0
    if sock:
        errors += sum(int(sock.group(i)) for i in range(1, 5))
    return WrkResult(
        requests=int(reqs.group(1)),
        seconds=seconds,
        rps=float(rps.group(1)),
        mb_per_s=float(tps.group(1)) * _BYTES.get(tps.group(2), 1.0),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        errors=errors,
    )


def run_wrk(
    url: str,
    *,
    duration: int = 10,
    connections: int = 64,
    threads: int = 1,
    headers: dict[str, str] | None = None,
    cpu_pid: int | None = None,
    also_pids: tuple[int, ...] = (),
) -> WrkResult:
    """``wrk -t1 -c64 -dNs --latency`` against ``url``; CPU of ``cpu_pid`` during the run.

    ``other_cpu_s`` is what the rest of the machine used meanwhile: everything busy,
    minus wrk, ``cpu_pid`` and ``also_pids`` (the upstream). On a shared machine it says
    how much the figures were disturbed.
    """
    args = [WRK, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"]
    for k, v in (headers or {}).items():
        args += ["-H", f"{k}: {v}"]
    args.append(url)
    pids = ((cpu_pid,) if cpu_pid else ()) + also_pids
    before = [cpu_seconds(p) for p in pids]
    machine_before = machine_cpu_seconds()
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine = machine_cpu_seconds() - machine_before
    spent = [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
    result = parse_wrk(out)
    result.cpu_s = spent[0] if cpu_pid else 0.0
    wrk_cpu = (wrk_after.ru_utime + wrk_after.ru_stime) - (wrk_before.ru_utime + wrk_before.ru_stime)
    result.other_cpu_s = max(0.0, machine - sum(spent) - wrk_cpu)
    return result
