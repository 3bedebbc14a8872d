"""The SQLite database locked, out of space, failing like a dying disk, or read-only.

For each fault, against a real gateway: changes through the control API and the login
endpoints fail closed (503, problem+json or the plain page, nothing internal shown), the
log names the cause, nothing is allowed that needs the database, and once the fault is
gone nothing half-written is visible (every change is all-or-nothing with its audit
event, the chain verifies) and the gateway works again.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from domum_gateway.app import Gateway
from domum_gateway.audit import verify_chain
from domum_gateway.errors import StoreError
from domum_gateway.proxy.context import COOKIE
from domum_gateway.store.sqlite import SqliteStore

from ..conftest import Running, make_settings
from ..integration.helpers import Seed, call, create_forwarded, request_body, seed
from ..peers.public_client import client_for, sign_in
from ..peers.smtp import Mailbox
from .conftest import Ext4Disk, fault_gateway

BUSY_MS = 250
LEAKS = ("Traceback", "sqlite", "OperationalError", "locked", "disk", "domum.db", "/var/")


def _store_errors(caplog: pytest.LogCaptureFixture, cause: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "domum.store" and r.levelno >= logging.ERROR and cause in r.getMessage()
    ]


async def _snapshot(run: Running) -> tuple[int, int]:
    """(access requests, audit events) as the store holds them."""
    store = run.gateway.store
    events = await store.all_audit()
    assert verify_chain(events, await store.audit_head()) is None
    async with run.admin() as s:
        st, page = await call(s, "GET", "/api/v1/access-requests?limit=500")
        assert st == 200, page
    return len(page["items"]), len(events)


async def _writes_fail_closed(
    run: Running, sd: Seed, request_id: str, link: str, *, reads_work: bool = True
) -> None:
    """Every kind of change is refused with 503 while the fault lasts."""
    async with run.admin() as s:
        st, body = await call(s, "POST", "/api/v1/access-requests", request_body(sd))
        assert st == 503, body
        assert body["type"].endswith("/store-unavailable") and body["status"] == 503
        assert not any(leak in body["detail"] for leak in LEAKS), body
        st, body = await call(s, "POST", f"/api/v1/access-requests/{request_id}/revoke")
        assert st == 503, body
        st, body = await call(s, "POST", "/api/v1/reasons", {"label": "written during the fault"})
        assert st == 503, body
    sent = len(run.mailbox.messages)
    async with client_for(run) as user:
        page = await user.get(link)
        assert page.status == (200 if reads_work else 503), page.text
        assert not any(leak in page.text for leak in LEAKS), page.text
        page = await user.post(f"{link}/token")
        # Without a link page there is no form to send (403); with one, the send fails (503).
        assert page.status == (503 if reads_work else 403), page.text
        if reads_work:
            assert page.title and "unavailable" in page.title.lower()
            assert page.headers.get("Retry-After")
        assert not any(leak in page.text for leak in LEAKS), page.text
    assert len(run.mailbox.messages) == sent  # no token went out that could not be recorded


async def _works_again(run: Running, sd: Seed, request_id: str, before: tuple[int, int]) -> None:
    count, _events = await _snapshot(run)
    assert count == before[0]  # the refused creation left nothing behind
    async with run.admin() as s:
        st, req = await call(s, "GET", f"/api/v1/access-requests/{request_id}")
        assert st == 200 and req["status"] == "forwarded", req  # the refused revocation did not happen
        st, reasons = await call(s, "GET", "/api/v1/reasons")
        assert "written during the fault" not in {r["label"] for r in reasons["items"]}
        st, created = await call(s, "POST", "/api/v1/access-requests", request_body(sd))
        assert st == 201, created
    after = await _snapshot(run)
    assert after[0] == before[0] + 1


async def test_locked_database(
    tmp_path: Path, smtp: tuple[Mailbox, int], caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "var" / "domum.db"
    store = SqliteStore(db, busy_timeout_ms=BUSY_MS)
    async with fault_gateway(tmp_path, smtp, db=db, store=store) as run:
        sd = await seed(run)
        request_id, link = await create_forwarded(run, sd)
        before = await _snapshot(run)
        # Another program holds the write lock for longer than the gateway waits.
        holder = sqlite3.connect(db, isolation_level=None, timeout=0)
        try:
            holder.execute("BEGIN IMMEDIATE")
            with caplog.at_level(logging.WARNING):
                await _writes_fail_closed(run, sd, request_id, link)
            assert _store_errors(caplog, "database is locked"), caplog.text
            assert "api.error" in caplog.text and "status=503" in caplog.text
            assert "pages.store_unavailable" in caplog.text
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await _works_again(run, sd, request_id, before)


def _fill(mnt: Path) -> Path:
    """Take every free byte of the file system."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = 1 << 16
        while size >= 512:
            try:
                os.write(fd, b"\0" * size)
            except OSError:
                size //= 2
    finally:
        os.close(fd)
    return filler


async def test_out_of_space(
    tmp_path: Path, smtp: tuple[Mailbox, int], small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = small_fs / "domum.db"
    async with fault_gateway(tmp_path, smtp, db=db) as run:
        sd = await seed(run)
        request_id, link = await create_forwarded(run, sd)
        # A signed-in user, to check that the fault never lets anyone in.
        async with client_for(run) as user:
            await sign_in(run, user, link, sd.email)
            cookie = user.cookie(COOKIE)
        before = await _snapshot(run)
        filler = _fill(small_fs)
        try:
            # Big enough that the write-ahead log must grow, whatever space it kept.
            big = request_body(sd, justification="x" * 1900)
            with caplog.at_level(logging.WARNING):
                for _ in range(40):
                    async with run.admin() as s:
                        st, body = await call(s, "POST", "/api/v1/access-requests", big)
                    if st == 503:
                        break
                    assert st == 201, body
                    before = (before[0] + 1, before[1] + 1)
                else:
                    pytest.fail("the file system never filled up")
                await _writes_fail_closed(run, sd, request_id, link)
            assert _store_errors(caplog, "full"), caplog.text
        finally:
            filler.unlink()
        assert cookie and await _portal_status(run, cookie) == 200  # known sessions keep working
        await _works_again(run, sd, request_id, before)


async def _portal_status(run: Running, cookie: str) -> int:
    async with client_for(run) as user:
        user.set_cookie(COOKIE, cookie)
        page = await user.get("/portal", allow_redirects=False)
        assert not any(leak in page.text for leak in LEAKS), page.text
        return page.status


async def test_disk_failure_refuses_and_loses_nothing_committed(
    tmp_path: Path, smtp: tuple[Mailbox, int], ext4_disk: Ext4Disk, caplog: pytest.LogCaptureFixture
) -> None:
    db = ext4_disk.mnt / "domum.db"
    store = SqliteStore(db, busy_timeout_ms=BUSY_MS)
    async with fault_gateway(tmp_path, smtp, db=db, store=store) as run:
        sd = await seed(run)
        request_id, link = await create_forwarded(run, sd)
        before = await _snapshot(run)
        # A session opened through another gateway on the same database: this one has
        # never seen it, so it must ask the database, which is about to fail.
        async with fault_gateway(tmp_path / "b", smtp, db=db, tokens_of=run) as other:
            async with client_for(other) as user:
                await sign_in(other, user, link, sd.email)
                cookie = user.cookie(COOKIE)
        assert cookie
        before = await _snapshot(run)
        ext4_disk.shut_down()
        with caplog.at_level(logging.WARNING):
            await _writes_fail_closed(run, sd, request_id, link, reads_work=False)
            # Access is never granted on a database that cannot answer.
            async with client_for(run) as fresh:
                await fresh.get(link)
                page = await fresh.post(f"{link}/verify", {"token": "12345678"})
                assert page.status in (403, 503), page.text
                assert fresh.cookie(COOKIE) is None
            assert await _portal_status(run, cookie) == 503
        assert _store_errors(caplog, "SQLITE_"), caplog.text
    # The disk comes back (remounted): only whole, committed changes are there.
    ext4_disk.unmount()
    ext4_disk.mount()
    async with fault_gateway(tmp_path, smtp, db=db, tokens_of=run) as again:
        count, _ = await _snapshot(again)
        assert count == before[0]
        await _works_again(again, sd, request_id, (count, 0))


async def test_file_system_turning_read_only_at_run_time_fails_closed(
    tmp_path: Path, smtp: tuple[Mailbox, int], ext4_disk: Ext4Disk, caplog: pytest.LogCaptureFixture
) -> None:
    """ext4 remounts itself read-only under a running gateway (``errors=remount-ro`` after
    an error): changes are 503, nothing is granted that would need a write, and after the
    disk is checked and mounted again every committed change is there, whole."""
    ext4_disk.unmount()
    ext4_disk.mount("errors=remount-ro")
    db = ext4_disk.mnt / "domum.db"
    store = SqliteStore(db, busy_timeout_ms=BUSY_MS)
    async with fault_gateway(tmp_path, smtp, db=db, store=store) as run:
        sd = await seed(run)
        request_id, link = await create_forwarded(run, sd)
        before = await _snapshot(run)
        ext4_disk.turn_read_only()
        with caplog.at_level(logging.WARNING):
            await _writes_fail_closed(run, sd, request_id, link)
            async with client_for(run) as fresh:  # no session can be recorded: none is given
                await fresh.get(link)
                page = await fresh.post(f"{link}/verify", {"token": "12345678"})
                assert page.status in (403, 503), page.text
                assert fresh.cookie(COOKIE) is None
        assert _store_errors(caplog, "SQLITE_"), caplog.text
    ext4_disk.unmount()
    done = subprocess.run(
        ["e2fsck", "-fy", str(ext4_disk.image)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 1: errors corrected
    ext4_disk.mount()
    async with fault_gateway(tmp_path, smtp, db=db, tokens_of=run) as again:
        await _works_again(again, sd, request_id, before)


async def test_read_only_file_system_refuses_to_start(tmp_path: Path, small_fs: Path) -> None:
    db = small_fs / "data" / "domum.db"
    settings = make_settings(tmp_path, storage={"url": f"sqlite:///{db}"})
    gw = Gateway(settings, grace=1.0)
    await gw.start()
    await gw.stop()
    ro = tmp_path / "ro"
    ro.mkdir()

    def mount(*argv: str) -> None:
        done = subprocess.run(["mount", *argv], capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr

    mount("--bind", str(db.parent), str(ro))
    try:
        mount("-o", "remount,bind,ro", str(ro))
        settings = make_settings(tmp_path, storage={"url": f"sqlite:///{ro / 'domum.db'}"})
        gw = Gateway(settings, grace=1.0)
        with pytest.raises(StoreError) as caught:
            await gw.start()
        await gw.stop()
        assert str(ro / "domum.db") in caught.value.detail
    finally:
        # A plain umount fails (busy) if the refused start left the file open.
        done = subprocess.run(["umount", str(ro)], capture_output=True, text=True, timeout=30, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
