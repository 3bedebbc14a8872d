"""Soak: the load test's mix for 10 minutes, printing the gateway's RSS every 10 s.

    make soak                                        # 10 minutes
    DOMUM_SOAK_SECONDS=120 .venv/bin/python bench/soak.py   # shorter

The mix is ``tests/load/mix.py``: ``domum-gateway serve`` in its own process, 2,000
websocket tunnels to a TCP echo target held open with an echo round trip per tunnel
every 5 s, and 500 logins a minute (the whole page flow from its own 127.x address,
token by a real SMTP server, then sign out), new users created and forwarded through
the control API as the soak runs. ``DOMUM_SOAK_TUNNELS`` and ``DOMUM_SOAK_LOGINS``
(per minute) override the mix. One line per sample, then one JSON line with every
figure. Exit status 1 when anything failed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.load.mix import MixOptions, raise_nofile, run, run_mix  # noqa: E402


def _show(row: dict[str, Any]) -> None:
    print(
        f"t={row['t']:7.1f}s  {row['phase']:<5}  rss={row['rss_mib']:7.1f} MiB  "
        f"files={row['open_files']:5d}  tunnels={row['tunnels_alive']:5d}  "
        f"logins={row['logins']:6d}  errors={row['errors']}",
        flush=True,
    )


def main() -> int:
    seconds = float(os.environ.get("DOMUM_SOAK_SECONDS", "600"))
    opts = MixOptions(
        tunnels=int(os.environ.get("DOMUM_SOAK_TUNNELS", "2000")),
        seconds=seconds,
        logins_per_minute=float(os.environ.get("DOMUM_SOAK_LOGINS", "500")),
        sample_every=10.0,
        on_sample=_show,
    )
    raise_nofile(4 * opts.tunnels + 2048)
    print(f"soak: {opts.tunnels} tunnels, {opts.logins_per_minute:g} logins/min, {seconds:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="domum-soak-") as tmp:
        report = run(run_mix(opts, Path(tmp)))
    samples = report.pop("rss_samples")
    load = [row["rss_mib"] for row in samples if row["phase"] == "load"]
    report["bench"] = "soak"
    report["rss_mib_over_time"] = [[row["t"], row["rss_mib"]] for row in samples]
    if load:
        report["rss_load_min_mib"], report["rss_load_max_mib"] = min(load), max(load)
    print(json.dumps(report), flush=True)
    ok = report["error_count"] == 0 and report["tunnels_alive_at_end"] == opts.tunnels
    return 0 if ok and report["gateway_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
