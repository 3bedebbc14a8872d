"""Shared helpers for the benchmarks: processes, ports, CPU accounting, nginx and wrk.

Everything runs on 127.0.0.1, every wait is bounded, and every process a benchmark
starts is stopped by its pid (``Procs.stop_all``), never by name.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "NGINX",
    "WRK",
    "Procs",
    "WrkResult",
    "cpu_seconds",
    "free_port",
    "nginx_conf",
    "rss_kib",
    "run_wrk",
    "wait_port",
]

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


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
    """Processes a benchmark started; stopped by pid in reverse order."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, args: list[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(args, **kw)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


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
