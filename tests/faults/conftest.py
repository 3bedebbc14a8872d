"""Fault-injection fixtures: a gateway whose database or message providers misbehave for real.

These tests build their gateway themselves (a SQLite file at a chosen place, a short busy
timeout, a notifier with a short timeout pointed at a misbehaving provider), so they take
their own SMTP server rather than the shared ``mailbox`` fixture, which would also run
them once per store.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from domum_gateway.app import Gateway
from domum_gateway.control.notifier import Notifier
from domum_gateway.model import Role
from domum_gateway.pki import client_ssl_context
from domum_gateway.store.base import Store

from ..conftest import Running, _token, make_settings
from ..peers.smtp import LoopbackController, Mailbox


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    controller = LoopbackController(box, hostname="127.0.0.1", port=0)
    controller.start()
    try:
        yield box, int(controller.port)
    finally:
        controller.stop()


@asynccontextmanager
async def fault_gateway(
    tmp_path: Path,
    smtp: tuple[Mailbox, int],
    *,
    db: Path | None = None,
    store: Store | None = None,
    notifier: Notifier | None = None,
    tokens_of: Running | None = None,
    **overrides: Any,
) -> AsyncIterator[Running]:
    """A started gateway (TLS on loopback) with the given database file, store or notifier.

    ``tokens_of``: a gateway on the same database whose API tokens this one reuses.
    """
    box, port = smtp
    path = db or tmp_path / "var" / "domum.db"
    settings = make_settings(tmp_path, smtp_port=port, storage={"url": f"sqlite:///{path}"}, **overrides)
    gw = Gateway(settings, store=store, notifier=notifier, grace=1.0)
    await gw.start()
    try:
        if tokens_of is not None:
            admin, auditor = tokens_of.admin_token, tokens_of.auditor_token
        else:
            admin = await _token(gw, "admin", Role.ADMIN)
            auditor = await _token(gw, "auditor", Role.AUDITOR)
        yield Running(
            gw, gw.url("admin"), gw.url("public"), admin, auditor, client_ssl_context(settings.tls.ca), box
        )
    finally:
        await gw.stop()


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


def can_mount() -> bool:
    """Whether this process may mount file systems (root with CAP_SYS_ADMIN, e.g. in CI containers)."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return False
    probe = Path("/proc/self/status").read_text()
    caps = next((line.split()[1] for line in probe.splitlines() if line.startswith("CapEff:")), "0")
    return bool(int(caps, 16) & (1 << 21))  # CAP_SYS_ADMIN


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs: a file system that really runs out of space."""
    if not can_mount():
        pytest.skip("mounting a size-limited file system needs CAP_SYS_ADMIN")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = _run("mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mnt))
    if done.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        _run("umount", "-l", str(mnt))


class Ext4Disk:
    """An ext4 file system on a loop device that can be made to fail like a dying disk."""

    def __init__(self, image: Path, mnt: Path) -> None:
        self.image = image
        self.mnt = mnt
        self.loop = ""

    def mount(self, options: str = "") -> None:
        done = _run("losetup", "-f", "--show", str(self.image))
        if done.returncode != 0:
            pytest.skip(f"no loop device: {done.stderr.strip()}")
        self.loop = done.stdout.strip()
        _run("blockdev", "--setrw", self.loop)
        done = _run("mount", "-t", "ext4", *(["-o", options] if options else []), self.loop, str(self.mnt))
        if done.returncode != 0:
            self.detach()
            pytest.skip(f"cannot mount ext4 here: {done.stderr.strip()}")

    def shut_down(self) -> None:
        """EXT4_IOC_SHUTDOWN: from now on every write (and some reads) fail with EIO."""
        import fcntl
        import os
        import struct

        fd = os.open(self.mnt, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, 0x8004587D, struct.pack("I", 2))  # EXT4_GOING_FLAGS_NOLOGFLUSH
        finally:
            os.close(fd)

    def turn_read_only(self) -> None:
        """Report a file-system error to ext4 (its sysfs ``trigger_fs_error``): mounted with
        ``errors=remount-ro`` it goes read-only at once, open files included (EROFS), as a
        server's disk does after a detected corruption."""
        trigger = Path("/sys/fs/ext4") / Path(self.loop).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip("this kernel has no ext4 trigger_fs_error")
        trigger.write_text("domum fault test\n")

    def unmount(self) -> None:
        _run("umount", str(self.mnt))
        self.detach()

    def detach(self) -> None:
        if self.loop:
            _run("losetup", "-d", self.loop)
            self.loop = ""


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[Ext4Disk]:
    if not can_mount() or shutil.which("mkfs.ext4") is None or shutil.which("losetup") is None:
        pytest.skip("an ext4 loop file system needs CAP_SYS_ADMIN, mkfs.ext4 and losetup")
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    done = _run("mkfs.ext4", "-q", "-F", str(image))
    if done.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {done.stderr.strip()}")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    disk = Ext4Disk(image, mnt)
    disk.mount()
    try:
        yield disk
    finally:
        if disk.loop:
            _run("umount", "-l", str(mnt))
            disk.detach()
