"""Bounded load on loopback: 2,000 websocket tunnels held open with traffic, plus 500 logins
a minute, for 60 s, against ``domum-gateway serve`` in its own process.

The mix (``tests/load/mix.py``) runs as a subprocess of this test, so the clients, the
echo target and the SMTP server use one process and the gateway another, and the
gateway's memory and open files are its own. This is a functional test, not a speed
test: it asserts that nothing failed, not how fast anything went.

"Flat memory" is measured against a warm-up that opened and closed as many tunnels as
the load holds, so the allocator's high-water mark for 2,000 TLS connections is already
in the baseline:

* under load (2,000 tunnels open, logins running), RSS at the last sample is within
  16 MiB of the first;
* after the load, once every tunnel is closed and the gateway's open files are back,
  RSS is within 96 MiB of the baseline. Not zero: after a burst of TLS connections
  glibc keeps freed memory (30-50 MiB measured for the ~2,650 connections of this run;
  it falls back after ``malloc_trim(0)``; see SECURITY.md, "Known limitations").
  A per-tunnel leak of the gateway's own (a 256 KiB read buffer, a session or a
  ticket kept) would be hundreds of MiB.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUNNELS = 2000
SECONDS = 60
LOGINS_PER_MINUTE = 500
pytestmark = pytest.mark.slow


def _raise_nofile() -> None:
    """The mix raises its own limit (and the gateway inherits it); so does this process,
    for its own sockets, and fails early when the machine cannot hold the sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 4 * TUNNELS + 2048  # each side: 2,000 websockets and 2,000 target connections
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the {need} this test needs")
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def test_two_thousand_tunnels_and_500_logins_a_minute(tmp_path: Path) -> None:
    _raise_nofile()
    cmd = [
        sys.executable,
        "-m",
        "tests.load.mix",
        "--tunnels",
        str(TUNNELS),
        "--seconds",
        str(SECONDS),
        "--logins-per-minute",
        str(LOGINS_PER_MINUTE),
        "--work",
        str(tmp_path),
    ]
    started = time.monotonic()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""}
    )
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples"}))  # shown with -s
    for row in report["rss_samples"]:
        print(row)

    assert report["error_count"] == 0, report["error_examples"]
    assert report["gateway_alive"] and report["gateway_tracebacks"] == 0, report.get("gateway_log_tail")
    assert report["gateway_errors_logged"] == 0, report.get("gateway_log_tail")
    assert report["tunnels_opened"] == TUNNELS
    assert report["tunnels_alive_at_end"] == TUNNELS
    assert report["open_files_peak"] >= 2 * TUNNELS  # they really were open at once
    assert report["load_logins"] == LOGINS_PER_MINUTE * SECONDS // 60
    assert report["round_trips"] >= TUNNELS * (SECONDS // 5 - 2)  # traffic kept flowing
    # Flat memory (see the module docstring) and every socket given back.
    assert report["rss_load_last_mib"] - report["rss_load_first_mib"] < 16, report["rss_samples"]
    assert report["rss_growth_mib"] < 96, report
    assert report["open_files_after"] <= report["open_files_warm"] + 16
    assert took < 280
