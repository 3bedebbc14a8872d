"""Debian ``xrdp`` on a loopback port, an ``Xvfb`` display, and FreeRDP's ``xfreerdp``.

``xrdp -n -c <ini>`` runs in the foreground with a copy of ``/etc/xrdp/xrdp.ini`` whose
listener is ``tcp://127.0.0.1:<port>`` (so it never listens on other addresses) and whose
log goes to the test's folder. ``xfreerdp /auth-only`` needs an X display (it exits 1
without one): :class:`Xvfb` picks a free display itself (``-displayfd``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Xrdp", "Xvfb", "rdp_missing", "xfreerdp_auth_only"]

XRDP = "/usr/sbin/xrdp"
XFREERDP = shutil.which("xfreerdp") or "/usr/bin/xfreerdp"
XVFB = shutil.which("Xvfb") or "/usr/bin/Xvfb"


def rdp_missing() -> str | None:
    """Why the RDP peers cannot run here (None when they can)."""
    missing = [p for p in (XRDP, XFREERDP, XVFB) if not Path(p).is_file()]
    if missing:
        packages = "Debian xrdp, freerdp2-x11, xvfb; `make test` installs them"
        return f"not installed: {', '.join(missing)} ({packages})"
    if not Path("/etc/xrdp/xrdp.ini").is_file():
        return "/etc/xrdp/xrdp.ini is missing"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class Xrdp:
    dir: Path
    port: int
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls, dir: Path) -> Xrdp:
        dir.mkdir(parents=True, exist_ok=True)
        Path("/run/xrdp/sockdir").mkdir(parents=True, exist_ok=True)
        port = _free_port()
        ini = Path("/etc/xrdp/xrdp.ini").read_text()
        ini = re.sub(r"(?m)^port=.*$", f"port=tcp://127.0.0.1:{port}", ini, count=1)
        ini = re.sub(r"(?m)^LogFile=.*$", f"LogFile={dir / 'xrdp.log'}", ini)
        ini = re.sub(r"(?m)^EnableSyslog=.*$", "EnableSyslog=false", ini)
        conf = dir / "xrdp.ini"
        conf.write_text(ini)
        with (dir / "xrdp.out").open("wb") as out:
            proc = subprocess.Popen(
                [XRDP, "--nodaemon", "--config", str(conf)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        xrdp = cls(dir, port, proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"xrdp exited {proc.returncode}: {(dir / 'xrdp.out').read_text()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return xrdp
            except OSError:
                time.sleep(0.05)
        xrdp.stop()
        raise RuntimeError("xrdp did not start listening")

    def stop(self) -> None:
        _stop(self.process)


@dataclass
class Xvfb:
    display: str
    process: subprocess.Popen[bytes]

    @classmethod
    def start(cls) -> Xvfb:
        read, write = os.pipe()
        try:
            proc = subprocess.Popen(
                [XVFB, "-displayfd", str(write), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                pass_fds=(write,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            os.close(write)
        with os.fdopen(read) as pipe:
            number = pipe.readline().strip()
        if not number.isdigit():
            _stop(proc)
            raise RuntimeError("Xvfb did not report a display")
        return cls(f":{number}", proc)

    def stop(self) -> None:
        _stop(self.process)


def xfreerdp_auth_only(
    port: int, display: str, user: str = "domum", timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """``xfreerdp /auth-only`` against 127.0.0.1:port (exit 0 after a full RDP connection
    sequence; xrdp checks the password only later, in the session, so any will do)."""
    return subprocess.run(
        [XFREERDP, "/auth-only", "/cert:ignore", f"/u:{user}", "/p:unchecked", f"/v:127.0.0.1:{port}"],
        env={**os.environ, "DISPLAY": display, "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
