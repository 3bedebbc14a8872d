"""A throwaway PostgreSQL for the test session, from the system's packages (Debian 15).

One server per test session: ``initdb`` into a temp dir (as the ``postgres`` user when
running as root: initdb refuses root), listening on a free loopback port with its unix
socket inside the same dir, durability switched off for speed. Each test gets a fresh
database. Tests that need the server down (``stop()``) start it again on the same port.
Tests are skipped, with the reason printed, only when the binaries are not installed.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["PostgresServer", "pg_server", "pg_url", "postgres_missing"]

PG_BIN = Path(os.environ.get("DOMUM_PG_BIN", "/usr/lib/postgresql/15/bin"))


def postgres_missing() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    for tool in ("initdb", "pg_ctl", "postgres", "createdb", "pg_dump"):
        if not (PG_BIN / tool).exists():
            return f"PostgreSQL binaries not found in {PG_BIN} (install Debian's postgresql; `make sysdeps`)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root but there is no 'postgres' user to run initdb as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temp dir; ``url(db)`` names a database on it."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="domum-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "log"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.running = False

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
        cmd = list(args)
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)

    def init(self) -> None:
        done = self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.decode(errors='replace')[-2000:]}")

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {self.root}",
                "-c listen_addresses=127.0.0.1",
                "-c max_connections=300",
                # Throwaway data: trade durability for speed.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
            ]
        )
        done = self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start"
        )
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.decode(errors='replace')}\n{tail}")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` skips the shutdown checkpoint)."""
        if not self.running:
            return
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = "t_" + secrets.token_hex(6)
        done = subprocess.run(
            [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"createdb failed: {done.stderr.decode(errors='replace')}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a test's database (best effort: the server may be down after a failed test)."""
        if not self.running:
            return
        database = url.rsplit("/", 1)[1]
        self._run(
            str(PG_BIN / "dropdb"),
            "--force",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            database,
        )

    def dump(self, url: str) -> bytes:
        """Everything stored in the database at ``url`` (``pg_dump`` of schema and data)."""
        database = url.rsplit("/", 1)[1]
        done = self._run(
            str(PG_BIN / "pg_dump"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", database
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {done.stderr.decode(errors='replace')}")
        return done.stdout


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    missing = postgres_missing()
    if missing is not None:
        print(f"\nskipping PostgreSQL tests: {missing}")
        pytest.skip(missing)
    server = PostgresServer()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh database on the session's server (isolation between tests), dropped after
    the test: every gateway test runs on PostgreSQL too, and hundreds of leftover
    databases cost gigabytes and a long teardown."""
    if not pg_server.running:  # a previous test stopped it and failed before restarting
        pg_server.start()
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)
