"""The audit hash chain in the SQLite store: appends, personal-data commitments, tampering."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from domum_gateway.audit import AuditEntry, verify_chain
from domum_gateway.store.sqlite import SqliteStore


async def _store(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(tmp_path / "a.db")
    await store.open()
    return store


async def test_chain_verifies_and_survives_erasing_personal_data(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        for i in range(5):
            await store.append_audit(
                AuditEntry(
                    actor="token:admin",
                    action="user.created",
                    subject=f"usr_{i}",
                    personal={"name": f"User {i}", "email": f"u{i}@example.com"},
                )
            )
        events = await store.all_audit()
        assert verify_chain(events, await store.audit_head()) is None
        assert events[0].personal is not None and events[0].personal["data"]["name"] == "User 0"
        assert "u0@example.com" not in json.dumps(events[0].details)
    finally:
        await store.close()
    db = sqlite3.connect(tmp_path / "a.db")
    with db:  # what retention does: drop the personal blob (and its salt), keep the commitment
        db.execute("UPDATE audit_events SET personal = NULL WHERE seq <= 3")
    db.close()
    store = await _store(tmp_path)
    try:
        events = await store.all_audit()
        assert events[0].personal is None
        assert verify_chain(events, await store.audit_head()) is None
    finally:
        await store.close()


async def test_swapped_personal_data_is_detected(tmp_path: Path) -> None:
    store = await _store(tmp_path)
    try:
        for i in range(2):
            await store.append_audit(
                AuditEntry(
                    actor="a", action="user.created", subject=f"usr_{i}", personal={"email": f"u{i}@x.test"}
                )
            )
    finally:
        await store.close()
    db = sqlite3.connect(tmp_path / "a.db")
    blob = db.execute("SELECT personal FROM audit_events WHERE seq = 2").fetchone()[0]
    with db:
        db.execute("UPDATE audit_events SET personal = ? WHERE seq = 1", (blob,))
    db.close()
    store = await _store(tmp_path)
    try:
        brk = verify_chain(await store.all_audit(), await store.audit_head())
        assert brk is not None and brk.seq == 1 and "personal" in brk.problem
    finally:
        await store.close()


async def test_failed_change_writes_no_audit_event(tmp_path: Path) -> None:
    """A change and its event commit together: a failing change leaves no event behind."""
    from domum_gateway.clock import SystemClock
    from domum_gateway.errors import Conflict
    from domum_gateway.model import Role

    store = await _store(tmp_path)
    try:
        now = SystemClock().now()
        await store.create_api_token(
            "x", Role.ADMIN, "h1", now, AuditEntry(actor="t", action="token.created", subject="x")
        )
        try:
            await store.create_api_token(
                "y", Role.ADMIN, "h1", now, AuditEntry(actor="t", action="token.created", subject="y")
            )
        except Conflict:
            pass
        else:
            raise AssertionError("duplicate token hash must conflict")
        assert [e.subject for e in await store.all_audit()] == ["x"]
    finally:
        await store.close()
