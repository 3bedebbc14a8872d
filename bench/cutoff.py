"""Cut-off benchmark: 1,000 live tunnels on one grant, revoke, time until the last is closed.

    .venv/bin/python bench/cutoff.py

Starts its own gateway (``serve``, SQLite) and a TCP echo peer on loopback, then for each
round: a fresh grant, one ``connect``-style ticket (so one session), ``CUTOFF_TUNNELS``
websocket tunnels to ``/ws/tcp/echo`` each proven live by an echo round trip, then
``POST /api/v1/access-requests/{id}/revoke``. Each tunnel's latency is the time from the
revoke call until its client reads the close frame (1008 with the reason); the gateway's
own ``domum_cutoff_seconds{cause="revoke"}`` histogram is read before and after.

Reference, same run: the same number of direct TCP connections to the echo peer, which
closes them all at once on a word from a control connection; the time until each client
sees its end. The ratio says how much a gateway cut costs over the bare floor of
telling that many sockets they are closed.

Goal: p100 under 1 s. Bounded: every wait has a deadline; every process is stopped by pid.
The last line is one JSON object with the figures. Environment: ``CUTOFF_TUNNELS``
(1000), ``CUTOFF_ROUNDS`` (3).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import struct
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    OUTBOX_TOKEN,
    PY,
    GatewayProcess,
    Procs,
    cpu_seconds,
    free_port,
    percentile,
    raise_nofile,
    ratio,
    wait_port,
)

TUNNELS = int(os.environ.get("CUTOFF_TUNNELS", "1000"))
ROUNDS = int(os.environ.get("CUTOFF_ROUNDS", "3"))
OPEN_CONCURRENCY = 64  # handshakes in flight at once
DEADLINE = 60.0  # seconds for any one phase (open all, close all)


# ---------------------------------------------------------------------------------------
# the echo peer (its own process): echoes; closes every connection on b"cut" from control
# ---------------------------------------------------------------------------------------
def role_echo(port: int, control: int) -> None:
    live: set[asyncio.Transport] = set()

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = cast(asyncio.Transport, transport)
            live.add(self.t)

        def data_received(self, data: bytes) -> None:
            self.t.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            live.discard(self.t)

    class Control(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            if b"cut" in data:
                n = len(live)
                for t in list(live):
                    t.close()
                self.t.write(f"{n}\n".encode())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
        await loop.create_server(Control, "127.0.0.1", control)
        await asyncio.Event().wait()

    raise_nofile()
    asyncio.run(main())


# ---------------------------------------------------------------------------------------
# the gateway under test (its own process)
# ---------------------------------------------------------------------------------------
class Gateway(GatewayProcess):
    """The gateway under test, with one user granted the echo peer, and an async client for
    what runs while the tunnels are open (a blocking call would hold their close frames)."""

    def __init__(self, procs: Procs, work: Path, echo_port: int) -> None:
        super().__init__(procs, work)
        echo = {"name": "echo", "protocol": "tcp", "host": "127.0.0.1", "port": echo_port}
        self.who = self.add_user("bench", [echo])
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls, limit=4))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    async def api_async(self, method: str, path: str) -> bytes:
        """One admin API call without a body; the raw answer."""
        assert self.http is not None
        async with self.http.request(
            method,
            f"https://localhost:{self.admin}{path}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            if resp.status >= 400:
                raise RuntimeError(f"{method} {path}: {resp.status} {await resp.text()}")
            return await resp.read()

    async def public_post(self, path: str, body: Any, want: int) -> Any:
        assert self.http is not None
        async with self.http.post(
            f"https://localhost:{self.public}{path}", json=body, timeout=aiohttp.ClientTimeout(total=30)
        ) as resp:
            if resp.status != want:
                raise RuntimeError(f"POST {path}: {resp.status} {await resp.text()}")
            return await resp.json()

    async def grant(self) -> tuple[str, str]:
        """A fresh forwarded grant and a tunnel ticket for it: (request id, ticket)."""
        rid, link = await asyncio.to_thread(self.forward, self.who)
        await self.public_post("/cli/v1/token", {"link": link}, 202)
        token = await asyncio.to_thread(self.from_outbox, OUTBOX_TOKEN)
        granted = await self.public_post("/cli/v1/verify", {"link": link, "token": token}, 200)
        return rid, str(granted["ticket"])

    async def cutoff_histogram(self) -> dict[str, float]:
        """``domum_cutoff_seconds{cause="revoke"}``: cumulative buckets, sum and count."""
        text = (await self.api_async("GET", "/metrics")).decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line.startswith("domum_cutoff_seconds") or 'cause="revoke"' not in line:
                continue
            value = float(line.rsplit(" ", 1)[1])
            if line.startswith("domum_cutoff_seconds_bucket"):
                le = re.search(r'le="([^"]+)"', line)
                assert le
                out[le.group(1)] = value
            elif line.startswith("domum_cutoff_seconds_sum"):
                out["sum"] = value
            elif line.startswith("domum_cutoff_seconds_count"):
                out["count"] = value
        return out


# ---------------------------------------------------------------------------------------
# a lean websocket tunnel client (one protocol object per tunnel, no task per tunnel)
# ---------------------------------------------------------------------------------------
class WsTunnel(asyncio.Protocol):
    def __init__(self, request: bytes, probe: bytes) -> None:
        self.request = request
        self.probe = probe
        self.buf = bytearray()
        self.upgraded = False
        self.echoed = bytearray()
        self.live = asyncio.get_running_loop().create_future()
        self.gone = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.close_code = 0
        self.close_reason = ""
        self.closed_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def send(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.transport.write(head + mask + masked)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                self._fail(RuntimeError(head.split(b"\r\n", 1)[0].decode()))
                return
            self.upgraded = True
            self.send(0x2, self.probe)
        while len(self.buf) >= 2:
            b0, b1 = self.buf[0], self.buf[1]
            n, at = b1 & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, at = struct.unpack("!H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, at = struct.unpack("!Q", self.buf[2:10])[0], 10
            if len(self.buf) < at + n:
                return
            payload = bytes(self.buf[at : at + n])
            del self.buf[: at + n]
            self._frame(b0 & 0x0F, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        if opcode in (0x0, 0x2):
            self.echoed += payload
            if len(self.echoed) >= len(self.probe) and not self.live.done():
                self.live.set_result(bytes(self.echoed) == self.probe)
        elif opcode == 0x9:
            self.send(0xA, payload)
        elif opcode == 0x8:
            if not self.closed_at:
                self.closed_at = time.monotonic()
                if len(payload) >= 2:
                    self.close_code = struct.unpack("!H", payload[:2])[0]
                    self.close_reason = payload[2:].decode("utf-8", "replace")
                self.send(0x8, payload[:2])
                if self.transport is not None:
                    self.transport.close()  # the handshake is done: hang up, as browsers do
                if not self.gone.done():
                    self.gone.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if not self.live.done():
            self.live.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.live.done():
            self.live.set_exception(ConnectionError(f"lost before the echo: {exc}"))
        if not self.closed_at:
            self.closed_at = time.monotonic()
        if not self.gone.done():
            self.gone.set_result(None)


async def open_tunnels(gw: Gateway, ticket: str, count: int) -> list[WsTunnel]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    tunnels: list[WsTunnel] = []

    async def one(i: int) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws/tcp/echo HTTP/1.1\r\nHost: localhost:{gw.public}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {ticket}\r\n\r\n"
        ).encode()
        probe = f"tunnel {i} is live".encode()
        async with gate:
            tunnel = WsTunnel(request, probe)
            await loop.create_connection(
                lambda: tunnel, "127.0.0.1", gw.public, ssl=gw.tls, server_hostname="localhost"
            )
            if not await asyncio.wait_for(tunnel.live, 30):
                raise RuntimeError(f"tunnel {i}: the echo came back wrong")
        tunnels.append(tunnel)

    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*(one(i) for i in range(count)))
    return tunnels


def figures(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(ms, 50), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "p100_ms": round(max(ms), 1),
    }


def bucket_quantile(before: dict[str, float], after: dict[str, float], q: float) -> str:
    """The smallest bucket bound holding ``q`` of this round's observations."""
    count = after.get("count", 0) - before.get("count", 0)
    bounds = sorted((float(k), k) for k in after if k not in ("sum", "count"))
    for value, key in bounds:
        if after[key] - before.get(key, 0) >= q * count:
            return "+Inf" if value == float("inf") else f"{value * 1000:g} ms"
    return "n/a"


async def gateway_round(gw: Gateway, count: int) -> dict[str, Any]:
    rid, ticket = await gw.grant()
    t_open = time.monotonic()
    tunnels = await open_tunnels(gw, ticket, count)
    open_s = time.monotonic() - t_open
    before = await gw.cutoff_histogram()
    cpu0 = cpu_seconds(gw.proc.pid)
    t0 = time.monotonic()
    await gw.api_async("POST", f"/api/v1/access-requests/{rid}/revoke")
    api_ms = (time.monotonic() - t0) * 1000
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*(t.gone for t in tunnels))
    cpu = cpu_seconds(gw.proc.pid) - cpu0
    ms = [(t.closed_at - t0) * 1000 for t in tunnels]
    bad = [t for t in tunnels if t.close_code != 1008 or "revoked" not in t.close_reason]
    if bad:
        raise RuntimeError(f"{len(bad)} tunnels did not close with 1008 and the reason: {bad[0].close_code}")
    for t in tunnels:
        if t.transport is not None:
            t.transport.abort()
    # the server's view: wait (bounded) until every tunnel's close is recorded
    after = await gw.cutoff_histogram()
    deadline = time.monotonic() + 10
    while after.get("count", 0) - before.get("count", 0) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        after = await gw.cutoff_histogram()
    observed = int(after.get("count", 0) - before.get("count", 0))
    mean = (after.get("sum", 0) - before.get("sum", 0)) / observed * 1000 if observed else 0.0
    return {
        **figures(ms),
        "revoke_api_ms": round(api_ms, 1),
        "open_s": round(open_s, 2),
        "gateway_cpu_s": round(cpu, 3),
        "server": {
            "observed": observed,
            "mean_ms": round(mean, 2),
            "p50_le": bucket_quantile(before, after, 0.5),
            "p99_le": bucket_quantile(before, after, 0.99),
            "p100_le": bucket_quantile(before, after, 1.0),
        },
    }


class Direct(asyncio.Protocol):
    def __init__(self) -> None:
        self.live = asyncio.get_running_loop().create_future()
        self.gone = asyncio.get_running_loop().create_future()
        self.at = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(b"hi")

    def data_received(self, data: bytes) -> None:
        if not self.live.done():
            self.live.set_result(None)

    def eof_received(self) -> bool:
        self._end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        if not self.at:
            self.at = time.monotonic()
        if not self.gone.done():
            self.gone.set_result(None)


async def reference_round(echo_port: int, control_port: int, count: int) -> dict[str, Any]:
    """Direct TCP to the echo, which closes all of them at once: the floor."""
    loop = asyncio.get_running_loop()
    conns: list[Direct] = []
    async with asyncio.timeout(DEADLINE):
        for _ in range(count):
            d = Direct()
            await loop.create_connection(lambda d=d: d, "127.0.0.1", echo_port)  # type: ignore[misc]
            conns.append(d)
        await asyncio.gather(*(d.live for d in conns))
    reader, writer = await asyncio.open_connection("127.0.0.1", control_port)
    t0 = time.monotonic()
    writer.write(b"cut")
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(*(d.gone for d in conns))
        closed = int((await reader.readline()).decode().strip() or 0)
    writer.close()
    for d in conns:
        if d.transport is not None:
            d.transport.close()
    return {**figures([(d.at - t0) * 1000 for d in conns]), "closed_by_peer": closed}


async def run(procs: Procs, work: Path) -> dict[str, Any]:
    echo_port, control_port = free_port(), free_port()
    procs.start([PY, __file__, "--role", "echo", str(echo_port), str(control_port)])
    wait_port(echo_port)
    wait_port(control_port)
    gw = Gateway(procs, work / "gw", echo_port)
    await gw.start()
    rounds: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    try:
        for i in range(ROUNDS):
            result = await gateway_round(gw, TUNNELS)
            ref = await reference_round(echo_port, control_port, TUNNELS)
            print(f"round {i + 1}: gateway {json.dumps(result)}", flush=True)
            print(f"round {i + 1}: direct  {json.dumps(ref)}", flush=True)
            rounds.append(result)
            refs.append(ref)
            await asyncio.sleep(1.0)  # let the closing audit writes settle
    finally:
        await gw.close()
    worst = max(r["p100_ms"] for r in rounds)
    med = sorted(rounds, key=lambda r: r["p100_ms"])[len(rounds) // 2]
    ref_med = sorted(refs, key=lambda r: r["p100_ms"])[len(refs) // 2]
    return {
        "bench": "cutoff",
        "date": datetime.now(UTC).date().isoformat(),
        "tunnels": TUNNELS,
        "rounds": ROUNDS,
        "gateway": med,
        "direct": ref_med,
        "all_rounds": {
            "gateway_p100_ms": [r["p100_ms"] for r in rounds],
            "direct_p100_ms": [r["p100_ms"] for r in refs],
        },
        "ratio_p100_gateway_vs_direct": ratio(med["p100_ms"], ref_med["p100_ms"], 2),
        "worst_p100_ms": worst,
        "goal_p100_under_1s": worst < 1000.0,
    }


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        role_echo(int(sys.argv[3]), int(sys.argv[4]))
        return 0
    limit = raise_nofile()
    if limit < 3 * TUNNELS + 200:
        print(f"the open-file limit ({limit}) is too low for {TUNNELS} tunnels", file=sys.stderr)
        return 2
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="domum-cutoff-") as tmp:
        try:
            summary = asyncio.run(run(procs, Path(tmp)))
        finally:
            procs.stop_all()
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["goal_p100_under_1s"] else 1


if __name__ == "__main__":
    sys.exit(main())
