"""Tunnel benchmark: bulk throughput and memory per idle tunnel, on 127.0.0.1.

    .venv/bin/python bench/tunnel.py            # 2 GiB each way, 3 runs, 5,000 idle tunnels

Throughput, each direction (upload = client -> target, download = target -> client):

  (a) direct    the load client talks to the target server itself
  (b) socat     a socat TCP relay (default buffer, and ``-b 262144``)
  (c) websockify   websockify (TLS) with a websocket client (the connect client's
                transport, :class:`domum_gateway.tunnel_client.Forwarder`, in its own process)
  (x) aiohttp_bridge   the "before" design: aiohttp's WebSocketResponse plus asyncio
                streams, one task per direction (TLS), same websocket client as (c)
  (d) gateway   ``domum-gateway serve`` with ``domum-gateway connect`` in front of it (TLS)

Each case also reports the CPU seconds its relay processes spent per GiB (load-independent,
unlike MB/s on a shared machine).

The load client is this process (blocking sockets, 1 MiB writes); the target server is a
separate uvloop process (sink: reads until it has the size, then closes; source: writes
the size, then closes). A transfer is timed from the client's connect to its EOF, so the
relay's delivery of the last byte and of the close are inside the measurement.

Memory: 5,000 tunnels opened through ``connect`` to a target that holds them idle; the
gateway's RSS after a warm-up (200 tunnels opened and closed) is subtracted from its RSS
with all 5,000 open, divided by 5,000.

Every transfer and wait is bounded (size, count and a timeout). The last line printed is
one JSON object with every figure and ratio (medians over the runs).

Diagnostics: ``--only gateway,socat,rss`` picks cases; ``BENCH_CPU_DETAIL=1`` prints CPU per
relay process; ``BENCH_SERVE_FLAGS`` / ``BENCH_CONNECT_FLAGS_SINK`` put interpreter flags in
front of ``-m domum_gateway.cli`` (e.g. ``-m cProfile -o /tmp/gw.prof``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import (
    OUTBOX_TOKEN,
    PY,
    ROOT,
    GatewayProcess,
    cpu_seconds,
    free_port,
    raise_nofile,
    ratio,
    rss_kib,
    wait_port,
)

CHUNK = 1024 * 1024
TRANSFER_TIMEOUT = 300.0
IDLE_TUNNELS = 5000


# ---------------------------------------------------------------------------------------
# roles run as child processes
# ---------------------------------------------------------------------------------------
def role_targets(size: int) -> None:
    """Sink, source and idle servers in one uvloop process; prints their ports."""
    import uvloop

    class Sink(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buf = bytearray(CHUNK)
            self.got = 0
            self.t: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses, only alike.
            self.t = cast(asyncio.Transport, transport)

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buf

        def buffer_updated(self, nbytes: int) -> None:
            self.got += nbytes
            if self.got >= size and self.t is not None:
                self.t.close()

        def eof_received(self) -> bool:
            return False

    block = os.urandom(CHUNK)

    class Source(asyncio.Protocol):
        def __init__(self) -> None:
            self.left = size
            self.t: asyncio.Transport | None = None
            self.paused = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            # uvloop's transports are not asyncio.Transport subclasses, only alike.
            self.t = cast(asyncio.Transport, transport)
            transport.set_write_buffer_limits(high=4 * CHUNK)
            self.fill()

        def fill(self) -> None:
            assert self.t is not None
            while self.left > 0 and not self.paused:
                n = min(CHUNK, self.left)
                self.t.write(block if n == CHUNK else block[:n])
                self.left -= n
            if self.left == 0:
                self.t.close()

        def pause_writing(self) -> None:
            self.paused = True

        def resume_writing(self) -> None:
            self.paused = False
            self.fill()

    class Idle(asyncio.Protocol):
        pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [
            await loop.create_server(cls, "127.0.0.1", 0, backlog=4096) for cls in (Sink, Source, Idle)
        ]
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        print(json.dumps({"sink": ports[0], "source": ports[1], "idle": ports[2]}), flush=True)
        await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin

    uvloop.run(main())


def role_aiohttp_bridge(target_port: int, cert: str, key: str) -> None:
    """The "before" design: aiohttp's WebSocketResponse and asyncio streams, one task per
    direction (what a plain aiohttp websocket-to-TCP bridge looks like)."""
    import ssl as _ssl

    import uvloop
    from aiohttp import WSMsgType, web

    async def bridge(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        reader, writer = await asyncio.open_connection("127.0.0.1", target_port)

        async def up() -> None:
            async for msg in ws:
                if msg.type is not WSMsgType.BINARY:
                    break
                if not msg.data:  # the connect client's end-of-stream marker
                    writer.write_eof()
                    continue
                writer.write(msg.data)
                await writer.drain()

        async def down() -> None:
            while data := await reader.read(256 * 1024):
                await ws.send_bytes(data)
            await ws.close()

        await asyncio.gather(up(), down(), return_exceptions=True)
        writer.close()
        return ws

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", bridge)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ctx = _ssl.SSLContext(_ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        print(json.dumps({"port": runner.addresses[0][1]}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()

    uvloop.run(main())


def role_forwarder(url: str, ca: str) -> None:
    """The connect client's transport alone, pointed at a plain websocket server."""
    import uvloop

    sys.path.insert(0, str(ROOT / "src"))
    from domum_gateway.pki import client_ssl_context
    from domum_gateway.tunnel_client import Forwarder

    host, _, port = url.removeprefix("wss://").partition(":")
    port, _, path = port.partition("/")

    async def main() -> None:
        fwd = Forwarder(host, int(port), "/" + path, client_ssl_context(Path(ca)))
        sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        sock.setblocking(False)
        print(json.dumps({"port": await fwd.listen(sock)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await fwd.shutdown()

    uvloop.run(main())


# ---------------------------------------------------------------------------------------
# helpers for the parent
# ---------------------------------------------------------------------------------------
class Procs(common.Procs):
    """Children that talk to this process over pipes (text): a role runs until its stdin
    closes; the rest have their stdout read or discarded."""

    def start(self, args: list[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdin", subprocess.PIPE)
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.DEVNULL)
        return super().start(args, text=True, **kw)


def upload(port: int, size: int) -> float:
    """MB/s sending ``size`` bytes to ``port`` (until the far end closes)."""
    block = memoryview(os.urandom(CHUNK))
    with socket.create_connection(("127.0.0.1", port), timeout=TRANSFER_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        sent = 0
        while sent < size:
            n = min(CHUNK, size - sent)
            s.sendall(block[:n])
            sent += n
        while s.recv(65536):
            pass
        t1 = time.monotonic()
    return size / (t1 - t0) / 1e6


def download(port: int, size: int) -> float:
    """MB/s receiving ``size`` bytes from ``port`` (the source closes after them)."""
    buf = bytearray(CHUNK)
    with socket.create_connection(("127.0.0.1", port), timeout=TRANSFER_TIMEOUT) as s:
        t0 = time.monotonic()
        got = 0
        while True:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
        t1 = time.monotonic()
    if got != size:
        raise RuntimeError(f"download got {got} of {size} bytes")
    return size / (t1 - t0) / 1e6


# ---------------------------------------------------------------------------------------
# the gateway under test
# ---------------------------------------------------------------------------------------
class Gateway(GatewayProcess):
    """The gateway under test with one user granted ``targets`` (name -> port) over TCP."""

    def __init__(self, procs: Procs, work: Path, targets: dict[str, int]) -> None:
        # BENCH_SERVE_FLAGS="-O" runs the gateway with assertions stripped.
        super().__init__(procs, work, serve_flags=os.environ.get("BENCH_SERVE_FLAGS", "").split())
        self.procs = procs
        bodies = [{"name": n, "protocol": "tcp", "host": "127.0.0.1", "port": p} for n, p in targets.items()]
        _rid, self.link = self.forward(self.add_user("bench", bodies))

    def connect(self, target: str) -> tuple[subprocess.Popen[str], int]:
        """Start ``domum-gateway connect`` for ``target``; returns (process, local port)."""
        log = open(self.work / f"connect-{target}.log", "w")  # closed when the bench exits
        flags = os.environ.get(f"BENCH_CONNECT_FLAGS_{target.upper()}", "").split()
        cmd = [PY, *flags, "-m", "domum_gateway.cli", "connect", self.link, "--target", target]
        cmd += ["--listen", "127.0.0.1:0", "--token-stdin", "--ca", str(self.ca), "--status-interval", "3600"]
        proc = self.procs.start(cmd, stderr=log)
        try:
            token = self.from_outbox(OUTBOX_TOKEN, timeout=15.0)
        except RuntimeError:
            time.sleep(0.5)
            raise RuntimeError(
                f"no token for connect {target}: " + (self.work / f"connect-{target}.log").read_text()[-2000:]
            ) from None
        assert proc.stdin and proc.stdout
        proc.stdin.write(token + "\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            m = re.search(r"Listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                return proc, int(m.group(1))
            if not line and proc.poll() is not None:
                break
        log.flush()
        raise RuntimeError(
            f"connect for {target} did not start (exit {proc.poll()}): "
            + (self.work / f"connect-{target}.log").read_text()[-2000:]
        )

    def active_tunnels(self) -> int:
        text = self.api("GET", "/metrics").decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("domum_sessions_active{") and 'protocol="tcp"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return int(total)


def idle_rss(gw: Gateway, connect_port: int, count: int) -> dict[str, float]:
    """Server RSS per idle tunnel with ``count`` open (after a warm-up)."""

    def open_many(n: int, into: list[socket.socket], deadline: float) -> None:
        base = gw.active_tunnels()
        for i in range(0, n, 200):
            for _ in range(min(200, n - i)):
                into.append(socket.create_connection(("127.0.0.1", connect_port), timeout=30))
            while gw.active_tunnels() < base + len(into) and time.monotonic() < deadline:
                time.sleep(0.05)
        if gw.active_tunnels() < base + n:
            raise RuntimeError(f"only {gw.active_tunnels() - base} of {n} tunnels opened in time")

    def wait_zero(deadline: float) -> None:
        while gw.active_tunnels() > 0 and time.monotonic() < deadline:
            time.sleep(0.05)

    deadline = time.monotonic() + 300
    warm: list[socket.socket] = []
    open_many(200, warm, deadline)
    for s in warm:
        s.close()
    wait_zero(deadline)
    time.sleep(1.0)
    before = rss_kib(gw.proc.pid)
    socks: list[socket.socket] = []
    try:
        open_many(count, socks, deadline)
        time.sleep(2.0)
        after = rss_kib(gw.proc.pid)
    finally:
        for s in socks:
            s.close()
        wait_zero(time.monotonic() + 60)
    return {
        "tunnels": count,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_tunnel": round((after - before) / count, 2),
    }


# ---------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=2048, help="bytes per transfer (MiB), default 2048")
    p.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default 3)")
    p.add_argument("--idle", type=int, default=IDLE_TUNNELS, help="idle tunnels for the RSS figure")
    p.add_argument("--only", default="", help="comma list of cases to run (direct,socat,socat_b256k,...)")
    p.add_argument("--role", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--ca", help=argparse.SUPPRESS)
    p.add_argument("--cert", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--target-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    size = args.size_mib * 1024 * 1024
    if args.role == "targets":
        role_targets(size)
        return 0
    if args.role == "forwarder":
        role_forwarder(args.url, args.ca)
        return 0
    if args.role == "aiohttp-bridge":
        role_aiohttp_bridge(args.target_port, args.cert, args.key)
        return 0

    raise_nofile()
    procs = Procs()
    work = Path(tempfile.mkdtemp(prefix="domum-bench-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    results: dict[str, dict[str, list[float]]] = {}
    extra: dict[str, Any] = {}
    try:
        role = [PY, __file__, "--role", "targets", "--size-mib", str(args.size_mib)]
        targets_proc = procs.start(role, env=env)
        assert targets_proc.stdout
        ports = json.loads(targets_proc.stdout.readline())

        sys.path.insert(0, str(ROOT / "src"))
        from domum_gateway.pki import make_test_pki

        cert, key, ca = make_test_pki(work / "wsy")
        cases: dict[str, tuple[int, int]] = {"direct": (ports["sink"], ports["source"])}
        relays: dict[str, list[int]] = {"direct": []}
        for name, buf in (("socat", None), ("socat_b256k", "262144")):
            pair = []
            relays[name] = []
            for target in (ports["sink"], ports["source"]):
                port = free_port()
                listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=1024"
                relay = procs.start(
                    ["socat", *(["-b", buf] if buf else []), listen, f"TCP:127.0.0.1:{target}"]
                )
                relays[name].append(relay.pid)
                wait_port(port)
                pair.append(port)
            cases[name] = (pair[0], pair[1])
        pair = []
        relays["websockify"] = []
        for target in (ports["sink"], ports["source"]):
            wport = free_port()
            wsy = [str(Path(PY).parent / "websockify"), "--cert", str(cert), "--key", str(key), "--ssl-only"]
            wlog = open(work / f"websockify-{wport}.log", "w")  # closed when the bench exits
            server = procs.start(
                [*wsy, f"127.0.0.1:{wport}", f"127.0.0.1:{target}"], stdout=wlog, stderr=wlog
            )
            wait_port(wport)
            fwd = procs.start(
                [PY, __file__, "--role", "forwarder", "--url", f"wss://localhost:{wport}/", "--ca", str(ca)],
                env=env,
            )
            assert fwd.stdout
            pair.append(int(json.loads(fwd.stdout.readline())["port"]))
            relays["websockify"] += [server.pid, fwd.pid]
        cases["websockify"] = (pair[0], pair[1])
        pair = []
        relays["aiohttp_bridge"] = []
        for target in (ports["sink"], ports["source"]):
            role = [PY, __file__, "--role", "aiohttp-bridge", "--target-port", str(target)]
            server = procs.start([*role, "--cert", str(cert), "--key", str(key)], env=env)
            assert server.stdout
            bport = int(json.loads(server.stdout.readline())["port"])
            fwd = procs.start(
                [PY, __file__, "--role", "forwarder", "--url", f"wss://localhost:{bport}/", "--ca", str(ca)],
                env=env,
            )
            assert fwd.stdout
            pair.append(int(json.loads(fwd.stdout.readline())["port"]))
            relays["aiohttp_bridge"] += [server.pid, fwd.pid]
        cases["aiohttp_bridge"] = (pair[0], pair[1])

        gw = Gateway(procs, work / "gw", {k: ports[k] for k in ("sink", "source", "idle")})
        up_proc, up_port = gw.connect("sink")
        down_proc, down_port = gw.connect("source")
        cases["gateway"] = (up_port, down_port)
        relays["gateway"] = [gw.proc.pid, up_proc.pid, down_proc.pid]
        extra["gateway_pid"] = gw.proc.pid

        only = {c for c in args.only.split(",") if c}
        names = [n for n in cases if not only or n in only]
        print(f"tunnel benchmark: {args.size_mib} MiB each way, {args.runs} run(s), cases {', '.join(names)}")
        gib = size / (1 << 30)
        for run in range(args.runs):
            for name in names:
                up_port, down_port = cases[name]
                entry = results.setdefault(name, {"up": [], "down": [], "cpu_up": [], "cpu_down": []})
                for direction, fn, port in (("up", upload, up_port), ("down", download, down_port)):
                    # with reaped children: socat and websockify fork one per connection
                    cpu0 = [cpu_seconds(p, reaped=True) for p in relays[name]]
                    entry[direction].append(fn(port, size))
                    time.sleep(0.2)  # let forked relays be reaped into their parent's counters
                    cpu1 = [cpu_seconds(p, reaped=True) for p in relays[name]]
                    spent = [(c1 - c0) / gib for c0, c1 in zip(cpu0, cpu1, strict=True)]
                    entry[f"cpu_{direction}"].append(sum(spent))
                    if os.environ.get("BENCH_CPU_DETAIL"):
                        print(f"    {name} {direction} cpu-s/GiB per process: {[round(x, 2) for x in spent]}")
                up, down, cu, cd = (entry[k][-1] for k in ("up", "down", "cpu_up", "cpu_down"))
                print(
                    f"  run {run + 1} {name:12s} up {up:7.0f} MB/s ({cu:.2f} cpu-s/GiB)"
                    f"   down {down:7.0f} MB/s ({cd:.2f} cpu-s/GiB)",
                    flush=True,
                )

        if args.idle and (not only or "rss" in only):
            idle_proc, idle_port = gw.connect("idle")
            print(f"opening {args.idle} idle tunnels through connect ...", flush=True)
            extra["rss"] = idle_rss(gw, idle_port, args.idle)
            extra["rss"]["connect_rss_kib"] = rss_kib(idle_proc.pid)
    except BaseException:
        procs.stop_all()
        print(f"failed; logs kept in {work}", file=sys.stderr)
        raise
    procs.stop_all()
    shutil.rmtree(work, ignore_errors=True)

    medians = {n: {d: round(statistics.median(v[d]), 2) for d in v if v[d]} for n, v in results.items()}
    ratios: dict[str, float] = {}
    if "gateway" in medians:
        g = medians["gateway"]
        for ref in ("socat", "socat_b256k", "websockify", "aiohttp_bridge", "direct"):
            if ref in medians:
                for d in ("up", "down"):
                    ratios[f"gateway_vs_{ref}_{d}"] = ratio(g[d], medians[ref][d])
    print()
    print(f"{'case':14s} {'up MB/s':>10s} {'down MB/s':>10s} {'relay cpu-s/GiB up':>20s} {'down':>6s}")
    for n, m in medians.items():
        print(f"{n:14s} {m['up']:10.0f} {m['down']:10.0f} {m['cpu_up']:20.2f} {m['cpu_down']:6.2f}")
    for k, v in ratios.items():
        print(f"{k:34s} {v:6.2f}x")
    rss = extra.get("rss")
    if rss:
        print(
            f"idle tunnels: {rss['tunnels']}, gateway RSS {rss['rss_before_kib']} -> "
            f"{rss['rss_after_kib']} KiB: {rss['kib_per_tunnel']} KiB per tunnel"
        )
    both = ("up", "down")
    summary = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "size_mib": args.size_mib,
        "runs": args.runs,
        "mb_per_s": medians,
        "ratios": ratios,
        "idle": rss,
        "goals": {
            "vs_socat_0_8": all(ratios.get(f"gateway_vs_socat_{d}", 0) >= 0.8 for d in both),
            "ahead_of_websockify": all(ratios.get(f"gateway_vs_websockify_{d}", 0) > 1 for d in both),
            "rss_20_kib": bool(rss) and rss["kib_per_tunnel"] <= 20,
        },
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
