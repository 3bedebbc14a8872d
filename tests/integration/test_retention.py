"""Retention purge, data-subject export and erasure, with the audit chain still verifying."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from domum_gateway.audit import verify_chain
from domum_gateway.cli import main
from domum_gateway.control.service import Actor

from ..conftest import Running
from .helpers import call, create_forwarded, request_body, seed


async def test_export_then_erase_keeps_chain_and_pseudonym(running: Running) -> None:
    sd = await seed(running)
    rid, _link = await create_forwarded(running, sd)
    async with running.admin() as s:
        st, export = await call(s, "GET", f"/api/v1/users/{sd.user_id}/export")
        assert st == 200
        assert export["user"]["email"] == "alice@example.com"
        assert [r["id"] for r in export["access_requests"]] == [rid]
        assert any(
            e["type"] == "user.created" and e["personal"]["email"] == "alice@example.com"
            for e in export["audit_events"]
        )
        st, err = await call(s, "DELETE", f"/api/v1/users/{sd.user_id}?erase=true")
        assert st == 409, "open access must be revoked before erasure"
        st, _ = await call(s, "POST", f"/api/v1/access-requests/{rid}/revoke")
        st, _ = await call(s, "DELETE", f"/api/v1/users/{sd.user_id}?erase=true")
        assert st == 204
        st, user = await call(s, "GET", f"/api/v1/users/{sd.user_id}")
        assert user["email"] is None and user["name"] == f"purged user {sd.user_id}"
        assert user["purged_at"] is not None
        st, export = await call(s, "GET", f"/api/v1/users/{sd.user_id}/export")
        assert "alice@example.com" not in json.dumps(export)
        st, err = await call(s, "DELETE", f"/api/v1/users/{sd.user_id}?erase=true")
        assert st == 409
        st, err = await call(s, "GET", "/api/v1/users/usr_nope/export")
        assert st == 404
    async with running.admin(running.auditor_token) as s:
        st, _ = await call(s, "GET", f"/api/v1/users/{sd.user_id}/export")
        assert st == 403
    store = running.gateway.store
    assert verify_chain(await store.all_audit(), await store.audit_head()) is None
    # SQLite: the file and its WAL (erased values must not linger in free pages); PostgreSQL:
    # everything a dump shows.
    assert b"Alice Example" not in await running.database_bytes(), "erased name lingers in the database"


async def test_scheduled_purge_only_after_retention(running: Running) -> None:
    sd = await seed(running)
    past = datetime.now(UTC) - timedelta(days=100)
    body = request_body(
        sd,
        start=past.replace(minute=0, second=0, microsecond=0).isoformat(),
        duration=None,
        end=(past.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)).isoformat(),
    )
    body.pop("duration")
    async with running.admin() as s:
        st, err = await call(s, "POST", "/api/v1/access-requests", body)
        assert st == 422, "a window that already ended cannot be created"
    # Create a current request, then move the clock of the retention job forward instead.
    rid, _ = await create_forwarded(running, sd)
    retention = running.gateway.retention
    assert await retention.candidates() == []
    from domum_gateway.clock import FakeClock

    retention._clock = FakeClock(datetime.now(UTC) + timedelta(days=retention.days + 1))
    due = await retention.purge(Actor("test"), dry_run=True)
    assert [u.id for u in due] == [sd.user_id]
    done = await retention.purge(Actor("test"))
    assert [u.id for u in done] == [sd.user_id]
    assert (await running.gateway.store.get_user(sd.user_id)).email is None  # type: ignore[union-attr]
    assert await retention.purge(Actor("test")) == []
    store = running.gateway.store
    assert verify_chain(await store.all_audit(), await store.audit_head()) is None


def test_purge_cli_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config" / "domum.toml"
    assert main(["init", "--config", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["purge", "--config", str(cfg), "--dry-run"]) == 0
    assert "would purge personal data of 0 user(s)" in capsys.readouterr().out
