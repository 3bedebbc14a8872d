"""HTTP reverse proxy benchmark: the gateway against nginx, on 127.0.0.1.

    .venv/bin/python bench/http_proxy.py                 # 10 s per run, 1 run each
    .venv/bin/python bench/http_proxy.py --runs 3        # medians of 3

nginx (``worker_processes 1``) serves a small body and a 64 KiB body; ``wrk -t1 -c64
-d10s --latency`` then loads, for each body:

  (a) direct    the nginx upstream itself (plain HTTP)
  (b) nginx     nginx's own TLS ``proxy_pass`` to that upstream, keepalive 64
  (c) gateway   one gateway process (uvloop, TLS), with an authenticated session cookie,
                proxying ``/t/up/...`` to the same upstream

The gateway runs in a child process of this script (``--serve-gateway``), built the way
``domum-gateway serve`` builds it (uvloop, WARNING logging, so no access log line per
request), with a session opened through the real login service. CPU per request is the
serving process's user+system time during the run (from /proc) divided by the requests
wrk counted: nginx's worker for (a) and (b), the gateway process for (c). "other CPU-s"
is what the rest of the machine (not wrk, not the servers measured) burnt during the run,
from /proc/stat: on a shared machine it tells how disturbed a figure is.

Every run is bounded by wrk's duration; every process is stopped by pid. The last line
printed is one JSON object with every figure and ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Procs, WrkResult, nginx_conf, run_wrk, start_nginx

SMALL_BODY = b"Hello from the upstream: a small body of about a hundred bytes, like an API answer.\n"
BIG_SIZE = 64 * 1024


# --- the gateway child ---------------------------------------------------------------
def serve_gateway(work: Path, upstream: str) -> None:
    """Run one gateway (uvloop) with a signed-in session; print its URL and cookie."""
    import uvloop

    from domum_gateway.app import Gateway
    from domum_gateway.auth.origin import normalise_address
    from domum_gateway.control.notifier import Message
    from domum_gateway.control.service import Actor
    from domum_gateway.settings import settings_from_mapping

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    certs = work / "certs"
    settings = settings_from_mapping(
        {
            "public": {"listen": "127.0.0.1:0", "base_url": "https://localhost:8443"},
            "admin": {"listen": "127.0.0.1:0"},
            "ssh": {"listen": "127.0.0.1:0", "host_key": str(work / "ssh_host_key")},
            "tls": {
                "cert": str(certs / "gateway.crt"),
                "key": str(certs / "gateway.key"),
                "ca": str(certs / "ca.crt"),
            },
            "storage": {"url": f"sqlite:///{work}/gw/domum.db"},
            "outbox": {"dir": str(work / "gw" / "outbox")},
        },
        work / "gw" / "domum.toml",
    )

    class Capture:
        def __init__(self) -> None:
            self.messages: list[Message] = []

        async def send(self, message: Message) -> None:
            self.messages.append(message)

    async def main() -> None:
        notifier = Capture()
        gw = Gateway(settings, notifier=notifier, grace=1.0)
        await gw.start()
        actor = Actor("bench")
        svc = gw.service
        await svc.create_target({"name": "up", "protocol": "http", "url": upstream}, actor)
        group = await svc.create_group(
            {
                "name": "bench",
                "kind": "internal",
                "policy": {
                    "targets": ["up"],
                    "max_duration": {"value": 30, "unit": "days"},
                    "idle_timeout": {"value": 12, "unit": "hours"},
                    "max_sessions": 10,
                },
            },
            actor,
        )
        user = await svc.create_user(
            {"group_id": group.id, "name": "Bench User", "email": "bench@example.com"}, actor
        )
        reason = await svc.create_reason({"label": "benchmark"}, actor)
        start = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
        review = await svc.create_request(
            {
                "group_id": group.id,
                "user_id": user.id,
                "justification": "benchmark",
                "reason_id": reason.id,
                "start": start,
                "duration": {"value": 1, "unit": "days"},
            },
            actor,
        )
        await svc.forward(review.request.id, actor)
        link = re.search(r"/a/([A-Za-z0-9_-]+)", notifier.messages[-1].body)
        assert link is not None
        info = await gw.login.resolve_link(link.group(0))
        peer = normalise_address("127.0.0.1")
        await gw.login.send_token(info, peer, "127.0.0.1")
        token = re.search(r"\b(\d{4} ?\d{4})\b", notifier.messages[-1].body)
        assert token is not None
        cookie, _ = await gw.login.verify(info, token.group(1), peer, "127.0.0.1")
        print(json.dumps({"public_url": gw.url("public"), "cookie": cookie}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await gw.stop()

    uvloop.run(main())


# --- the benchmark -------------------------------------------------------------------------
def _median(results: list[WrkResult]) -> dict[str, float]:
    dicts = [r.as_dict() for r in results]
    return {k: round(statistics.median(d[k] for d in dicts), 3) for k in dicts[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--runs", type=int, default=1, help="runs per case; medians are reported")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--serve-gateway", nargs=2, metavar=("WORK", "UPSTREAM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_gateway:
        serve_gateway(Path(args.serve_gateway[0]), args.serve_gateway[1])
        return 0

    from domum_gateway.pki import make_test_pki

    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="domum-bench-http-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx workers run as an unprivileged user
        cert, key, _ca = make_test_pki(work / "certs")
        www = work / "www"
        www.mkdir(mode=0o755)
        (www / "small.txt").write_bytes(SMALL_BODY)
        (www / "big.bin").write_bytes(bytes(range(256)) * (BIG_SIZE // 256))
        from common import free_port

        up_port, tls_port = free_port(), free_port()
        up_conf = nginx_conf(work, "upstream", f"  server {{ listen 127.0.0.1:{up_port}; root {www}; }}")
        proxy_conf = nginx_conf(
            work,
            "proxy",
            f"""  upstream up {{ server 127.0.0.1:{up_port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffers 8 16k;
    }}
  }}""",
        )
        try:
            up_pid = start_nginx(procs, up_conf, up_port)
            proxy_pid = start_nginx(procs, proxy_conf, tls_port)
            gw = procs.start(
                [sys.executable, __file__, "--serve-gateway", str(work), f"http://127.0.0.1:{up_port}/"],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert gw.stdout is not None
            deadline = time.monotonic() + 60
            line = ""
            while time.monotonic() < deadline and not line:
                line = gw.stdout.readline().strip()
                if gw.poll() is not None:
                    raise RuntimeError("the gateway child exited")
            info = json.loads(line)
            gw_url = info["public_url"]
            cookie = {"Cookie": f"__Host-domum={info['cookie']}"}
            cases: dict[str, tuple[str, dict[str, str], int, tuple[int, ...]]] = {
                "direct": (f"http://127.0.0.1:{up_port}", {}, up_pid, ()),
                "nginx": (f"https://127.0.0.1:{tls_port}", {}, proxy_pid, (up_pid,)),
                "gateway": (f"{gw_url}/t/up", cookie, gw.pid, (up_pid,)),
            }
            results: dict[str, dict[str, list[WrkResult]]] = {}
            for body, path in (("small", "/small.txt"), ("64k", "/big.bin")):
                results[body] = {name: [] for name in cases}
                for base, headers, _pid, _also in cases.values():
                    run_wrk(base + path, duration=2, connections=args.connections, headers=headers)  # warm-up
                for _ in range(args.runs):
                    for name, (base, headers, pid, also) in cases.items():
                        r = run_wrk(
                            base + path,
                            duration=args.duration,
                            connections=args.connections,
                            headers=headers,
                            cpu_pid=pid,
                            also_pids=also,
                        )
                        results[body][name].append(r)
        finally:
            procs.stop_all()

    figures: dict[str, Any] = {}
    print(
        f"{'body':6} {'case':8} {'req/s':>10} {'MB/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>11} "
        f"{'other CPU-s':>11}"
    )
    for body, by_case in results.items():
        figures[body] = {}
        for name, runs in by_case.items():
            m = _median(runs)
            figures[body][name] = m
            errors = f"  errors: {int(m['errors'])}" if m["errors"] else ""
            print(
                f"{body:6} {name:8} {m['rps']:>10.0f} {m['mb_s']:>9.1f} {m['p50_ms']:>8.2f} "
                f"{m['p99_ms']:>8.2f} {m['cpu_us_per_req']:>11.1f} {m['other_cpu_s']:>11.1f}{errors}"
            )
    ratios = {
        f"{body}_{metric}": round(figures[body]["gateway"][key] / figures[body]["nginx"][key], 3)
        for body in figures
        for metric, key in (("rps_ratio", "rps"), ("p99_ratio", "p99_ms"), ("cpu_ratio", "cpu_us_per_req"))
        if figures[body]["nginx"][key]
    }
    print(
        f"gateway/nginx: small {ratios.get('small_rps_ratio')}x req/s (goal 0.5), "
        f"64k {ratios.get('64k_rps_ratio')}x (goal 0.8); p99 small {ratios.get('small_p99_ratio')}x, "
        f"64k {ratios.get('64k_p99_ratio')}x (goal <= 2); gateway CPU/request small "
        f"{figures['small']['gateway']['cpu_us_per_req']} us (goal <= 100)"
    )
    summary = {
        "bench": "http_proxy",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": args.duration,
        "runs": args.runs,
        "connections": args.connections,
        "small_body_bytes": len(SMALL_BODY),
        "big_body_bytes": BIG_SIZE,
        "figures": figures,
        "ratios": ratios,
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
