"""A throwaway OpenSSH ``sshd`` (Debian ``openssh-server``) on 127.0.0.1 with its own keys.

Each :class:`Sshd` lives in a folder the caller owns: its config, an Ed25519 host key,
an Ed25519 client key authorised for the login user, a known_hosts line for clients and
its log. Key auth for ``root`` works out of the box (``PermitRootLogin
prohibit-password``); ``password=True`` turns on password and keyboard-interactive auth
through PAM for a local user made with :func:`ensure_user`.

Used by the SSH tests and ``bench/ssh.py``; other peers (tunnels) may use it as a plain
TCP service behind the gateway.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SSHD", "Sshd", "ensure_user", "free_port", "keygen", "sshd_available"]

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"


def sshd_available() -> bool:
    return Path(SSHD).is_file() and Path(SSH_KEYGEN).is_file() and os.geteuid() == 0


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (sshd needs a number up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keygen(path: Path, comment: str = "domum-test") -> str:
    """Write an Ed25519 key pair at ``path`` / ``path.pub``; return the public line."""
    if not path.exists():
        subprocess.run(
            [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
        )
    return path.with_name(path.name + ".pub").read_text().strip()


def ensure_user(name: str, password: str) -> None:
    """Create local user ``name`` (if missing) with a home and ``password`` (root only)."""
    exists = subprocess.run(["id", "-u", name], capture_output=True, check=False).returncode == 0
    if not exists:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True)
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True, capture_output=True)


@dataclass
class Sshd:
    """A running sshd; stop it with :meth:`stop` (or use :func:`Sshd.running`)."""

    dir: Path
    port: int
    host_key_line: str  # "ssh-ed25519 AAAA... comment" as an admin would register it
    client_key: Path  # private key authorised for root
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.dir / "sshd.log"

    @property
    def host_key_type_and_blob(self) -> str:
        return " ".join(self.host_key_line.split()[:2])

    def known_hosts_line(self, *names: str) -> str:
        """A known_hosts line for ``names`` (default ``[127.0.0.1]:port``)."""
        pattern = ",".join(names) if names else f"[127.0.0.1]:{self.port}"
        return f"{pattern} {self.host_key_type_and_blob}\n"

    @classmethod
    def start(
        cls,
        dir: Path,
        *,
        password: bool = False,
        options: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> Sshd:
        """Start sshd in the foreground (``-D -e``) and wait until it accepts connections.

        Args:
            dir: a folder this sshd owns (created if missing).
            password: allow password and keyboard-interactive auth via PAM.
            options: extra or overriding ``sshd_config`` keywords.
            port: the port to listen on (default: a free one).
        """
        dir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        host_line = keygen(dir / "host_ed25519", "domum-test-host")
        client_line = keygen(dir / "client_ed25519", "domum-test-client")
        (dir / "authorized_keys").write_text(client_line + "\n")
        port = port or free_port()
        config: dict[str, str] = {
            "Port": str(port),
            "ListenAddress": "127.0.0.1",
            "HostKey": str(dir / "host_ed25519"),
            "PidFile": str(dir / "sshd.pid"),
            "AuthorizedKeysFile": str(dir / "authorized_keys"),
            "PermitRootLogin": "prohibit-password",
            "PasswordAuthentication": "yes" if password else "no",
            "KbdInteractiveAuthentication": "yes" if password else "no",
            "UsePAM": "yes" if password else "no",
            "StrictModes": "no",
            "AllowTcpForwarding": "local",
            "AllowAgentForwarding": "no",
            "X11Forwarding": "no",
            "PrintMotd": "no",
            "PrintLastLog": "no",
            "Subsystem": "sftp internal-sftp",
            "MaxStartups": "100:30:200",
            "LogLevel": "ERROR",
        }
        config.update(options or {})
        conf = dir / "sshd_config"
        conf.write_text("".join(f"{k} {v}\n" for k, v in config.items()))
        subprocess.run([SSHD, "-t", "-f", str(conf)], check=True, capture_output=True)
        sshd = cls(dir, port, host_line, dir / "client_ed25519")
        with sshd.log.open("wb") as log:
            sshd.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        sshd._wait_listening()
        return sshd

    @classmethod
    @contextlib.contextmanager
    def running(cls, dir: Path, **kwargs: object) -> Iterator[Sshd]:
        sshd = cls.start(dir, **kwargs)  # type: ignore[arg-type]
        try:
            yield sshd
        finally:
            sshd.stop()

    def _wait_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited early: {self.log.read_text(errors='replace')}")
            # A banner means sshd itself answered (not some other listener on the port).
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                s.settimeout(1.0)
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not listen on {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def ssh_base(self, known_hosts: Path) -> list[str]:
        """An ``ssh`` command line (before the destination) that trusts only this server's key."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-p",
            str(self.port),
        ]
