"""SQLite implementation of :class:`Store` on aiosqlite: the embedded default.

One writer connection (every change inside ``BEGIN IMMEDIATE`` under an asyncio lock, so
a change and its audit event commit together or not at all) and one reader connection;
WAL lets the reader see committed data while a write is in progress.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiosqlite

from ..audit import GENESIS, AuditEntry, commit_personal, envelope, event_hash, format_instant
from ..clock import Clock, SystemClock
from ..errors import BadRequest, Conflict, StoreError
from ..model import (
    AccessRequest,
    ApiToken,
    AuditEvent,
    Group,
    Reason,
    RemoteUser,
    Role,
    Session,
    Target,
)
from . import rows as rowmap
from .base import (
    AuditFilter,
    ConnectionRecord,
    ConsoleSessionRecord,
    OtpIssue,
    OtpResult,
    Page,
    RequestFilter,
    SecretKind,
    SessionCreate,
    SessionSecret,
    Store,
    pseudonym,
)
from .migrations import MIGRATIONS

__all__ = ["SqliteStore"]

log = logging.getLogger("domum.store")

_Row = sqlite3.Row


class SqliteStore(Store):
    kind = "sqlite"

    def __init__(self, path: Path, clock: Clock | None = None, busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._clock = clock or SystemClock()
        self._busy_ms = busy_timeout_ms
        self._w: aiosqlite.Connection | None = None
        self._r: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    # lifecycle ---------------------------------------------------------------
    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self._path, isolation_level=None)
        try:
            await self._configure(conn)
        except BaseException:
            # A file that opens but cannot be set up (read-only file system, not a database)
            # must not leave its connection and worker thread behind.
            await conn.close()
            raise
        return conn

    async def _configure(self, conn: aiosqlite.Connection) -> None:
        conn.row_factory = sqlite3.Row
        await conn.execute(f"PRAGMA busy_timeout = {int(self._busy_ms)}")
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute("PRAGMA journal_mode = WAL")
        # FULL, not NORMAL: in WAL mode NORMAL does not sync each commit, so a power cut or a
        # failing disk can take back acknowledged revocations and spent tokens (seen in
        # tests/faults); FULL costs one fsync of the log per change.
        await conn.execute("PRAGMA synchronous = FULL")
        # Erased personal data must not linger in free pages of the file.
        await conn.execute("PRAGMA secure_delete = ON")

    async def open(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._w = await self._connect()
            await self._migrate()
            self._r = await self._connect()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the database at {self._path}: {exc}") from exc

    async def close(self) -> None:
        for conn in (self._r, self._w):
            if conn is not None:
                try:
                    await conn.close()
                except (sqlite3.Error, ValueError):  # pragma: no cover - best effort
                    pass
        self._r = self._w = None

    async def _migrate(self) -> None:
        w = self._writer
        await w.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        cur = await w.execute("SELECT MAX(version) FROM schema_version")
        row = await cur.fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        for version, sql in MIGRATIONS:
            if version <= current:
                continue
            await w.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _split_sql(sql):
                    await w.execute(stmt)
                await w.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                await w.execute("COMMIT")
            except BaseException:
                await w.execute("ROLLBACK")
                raise
            log.info("store.migrated version=%d", version)

    async def schema_version(self) -> int:
        row = await self._one("SELECT MAX(version) AS v FROM schema_version")
        return int(row["v"]) if row and row["v"] is not None else 0

    async def ping(self) -> None:
        await self._one("SELECT 1 AS ok")

    @property
    def _writer(self) -> aiosqlite.Connection:
        if self._w is None:
            raise StoreError("the store is not open")
        return self._w

    @property
    def _reader(self) -> aiosqlite.Connection:
        if self._r is None:
            raise StoreError("the store is not open")
        return self._r

    # helpers -----------------------------------------------------------------
    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[_Row]:
        try:
            cur = await self._reader.execute(sql, params)
            return list(await cur.fetchall())
        except sqlite3.Error as exc:
            _log_failure("read", exc)
            raise StoreError("the database could not answer") from exc

    async def _one(self, sql: str, params: Sequence[Any] = ()) -> _Row | None:
        try:
            cur = await self._reader.execute(sql, params)
            row: _Row | None = await cur.fetchone()
            return row
        except sqlite3.Error as exc:
            _log_failure("read", exc)
            raise StoreError("the database could not answer") from exc

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            w = self._writer
            try:
                await w.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                _log_failure("begin", exc)
                raise StoreError("the database is unavailable") from exc
            try:
                yield w
            except sqlite3.IntegrityError as exc:
                await _rollback(w)
                raise Conflict(_integrity_message(exc)) from exc
            except sqlite3.Error as exc:
                await _rollback(w)
                _log_failure("write", exc)
                raise StoreError("the database could not complete the change") from exc
            except BaseException:
                await _rollback(w)
                raise
            else:
                try:
                    await w.execute("COMMIT")
                except sqlite3.Error as exc:
                    await _rollback(w)
                    _log_failure("commit", exc)
                    raise StoreError("the database could not complete the change") from exc

    async def _audit(self, w: aiosqlite.Connection, entry: AuditEntry) -> None:
        cur = await w.execute("SELECT seq, hash FROM audit_head WHERE id = 1")
        head = await cur.fetchone()
        seq = (int(head["seq"]) if head else 0) + 1
        prev = head["hash"] if head else GENESIS
        at = format_instant(self._clock.now())
        details = entry.details or {}
        commitment, blob = commit_personal(entry.personal)
        env = envelope(
            seq,
            at,
            entry.actor,
            entry.action,
            entry.subject,
            entry.outcome,
            entry.origin,
            details,
            commitment,
        )
        digest = event_hash(prev, env)
        request_id = details.get("request_id")
        if request_id is None and entry.subject.startswith("req_"):
            request_id = entry.subject
        await w.execute(
            "INSERT INTO audit_events (seq, at, actor, action, subject, request_id, outcome, origin,"
            " details, personal_commitment, personal, prev_hash, hash)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                seq,
                at,
                entry.actor,
                entry.action,
                entry.subject,
                str(request_id) if request_id is not None else None,
                entry.outcome,
                entry.origin,
                json.dumps(details, sort_keys=True),
                commitment,
                json.dumps(blob) if blob is not None else None,
                prev,
                digest,
            ),
        )
        await w.execute(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            (seq, digest),
        )

    # API tokens --------------------------------------------------------------
    async def create_api_token(
        self, name: str, role: Role, token_hash: str, now: datetime, audit: AuditEntry
    ) -> ApiToken:
        async with self._tx() as w:
            cur = await w.execute("SELECT 1 FROM api_tokens WHERE name = ?", (name,))
            if await cur.fetchone():
                raise Conflict(f"a token named {name!r} already exists")
            await w.execute(
                "INSERT INTO api_tokens (name, role, token_hash, created_at) VALUES (?,?,?,?)",
                (name, role.value, token_hash, rowmap.ts(now)),
            )
            await self._audit(w, audit)
        return ApiToken(name=name, role=role, created_at=now)

    async def find_api_token(self, token_hash: str) -> ApiToken | None:
        row = await self._one(
            "SELECT * FROM api_tokens WHERE token_hash = ? AND revoked_at IS NULL", (token_hash,)
        )
        return rowmap.token(row) if row else None

    async def list_api_tokens(self) -> list[ApiToken]:
        return [rowmap.token(r) for r in await self._all("SELECT * FROM api_tokens ORDER BY name")]

    async def revoke_api_token(self, name: str, now: datetime, audit: AuditEntry) -> bool:
        async with self._tx() as w:
            cur = await w.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (rowmap.ts(now), name),
            )
            if cur.rowcount == 0:
                return False
            await self._audit(w, audit)
        return True

    # groups ------------------------------------------------------------------
    async def create_group(self, group: Group, audit: AuditEntry) -> None:
        async with self._tx() as w:
            await w.execute(
                "INSERT INTO groups (id, name, kind, policy, created_at) VALUES (?,?,?,?,?)",
                (
                    group.id,
                    group.name,
                    group.kind.value,
                    json.dumps(group.policy.to_json()),
                    rowmap.ts(group.created_at),
                ),
            )
            await self._audit(w, audit)

    async def update_group(self, group: Group, audit: AuditEntry) -> None:
        async with self._tx() as w:
            await w.execute(
                "UPDATE groups SET name = ?, kind = ?, policy = ? WHERE id = ?",
                (group.name, group.kind.value, json.dumps(group.policy.to_json()), group.id),
            )
            await self._audit(w, audit)

    async def delete_group(self, group_id: str, audit: AuditEntry) -> bool:
        async with self._tx() as w:
            cur = await w.execute("SELECT 1 FROM users WHERE group_id = ? LIMIT 1", (group_id,))
            if await cur.fetchone():
                raise Conflict("the group still has users; delete or move them first")
            cur = await w.execute("SELECT 1 FROM access_requests WHERE group_id = ? LIMIT 1", (group_id,))
            if await cur.fetchone():
                raise Conflict("the group has access requests and is kept for the record")
            cur = await w.execute("DELETE FROM groups WHERE id = ?", (group_id,))
            if cur.rowcount == 0:
                return False
            await self._audit(w, audit)
        return True

    async def get_group(self, group_id: str) -> Group | None:
        row = await self._one("SELECT * FROM groups WHERE id = ?", (group_id,))
        return rowmap.group(row) if row else None

    async def list_groups(self) -> list[Group]:
        return [rowmap.group(r) for r in await self._all("SELECT * FROM groups ORDER BY name")]

    # users -------------------------------------------------------------------
    async def create_user(self, user: RemoteUser, audit: AuditEntry) -> None:
        async with self._tx() as w:
            await self._insert_user(w, user)
            await self._audit(w, audit)

    async def _insert_user(self, w: aiosqlite.Connection, user: RemoteUser) -> None:
        await w.execute(
            "INSERT INTO users (id, group_id, name, email, phone, channel, ephemeral, created_at)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (
                user.id,
                user.group_id,
                user.name,
                user.email,
                user.phone,
                user.channel.value,
                int(user.ephemeral),
                rowmap.ts(user.created_at),
            ),
        )

    async def update_user(self, user: RemoteUser, audit: AuditEntry) -> None:
        async with self._tx() as w:
            await w.execute(
                "UPDATE users SET group_id = ?, name = ?, email = ?, phone = ?, channel = ? WHERE id = ?",
                (user.group_id, user.name, user.email, user.phone, user.channel.value, user.id),
            )
            await self._audit(w, audit)

    async def delete_user(self, user_id: str, audit: AuditEntry) -> bool:
        async with self._tx() as w:
            cur = await w.execute("SELECT 1 FROM access_requests WHERE user_id = ? LIMIT 1", (user_id,))
            if await cur.fetchone():
                raise Conflict("the user has access requests and is kept for the record")
            cur = await w.execute("DELETE FROM users WHERE id = ?", (user_id,))
            if cur.rowcount == 0:
                return False
            await self._audit(w, audit)
        return True

    async def get_user(self, user_id: str) -> RemoteUser | None:
        row = await self._one("SELECT * FROM users WHERE id = ?", (user_id,))
        return rowmap.user(row) if row else None

    async def find_user_by_login(self, login: str) -> RemoteUser | None:
        row = await self._one(
            "SELECT * FROM users WHERE (id = ? OR lower(email) = lower(?)) AND purged_at IS NULL"
            " ORDER BY ephemeral, created_at DESC LIMIT 1",
            (login, login),
        )
        return rowmap.user(row) if row else None

    async def list_users(self, group_id: str | None = None) -> list[RemoteUser]:
        if group_id is None:
            rows = await self._all("SELECT * FROM users ORDER BY name, id")
        else:
            rows = await self._all("SELECT * FROM users WHERE group_id = ? ORDER BY name, id", (group_id,))
        return [rowmap.user(r) for r in rows]

    async def purge_candidates(self, cutoff: datetime) -> list[RemoteUser]:
        rows = await self._all(
            "SELECT u.* FROM users u WHERE u.purged_at IS NULL"
            " AND EXISTS (SELECT 1 FROM access_requests r WHERE r.user_id = u.id)"
            " AND NOT EXISTS (SELECT 1 FROM access_requests r WHERE r.user_id = u.id AND"
            "   (CASE WHEN r.revoked_at IS NOT NULL AND r.revoked_at < r.end_at"
            "         THEN r.revoked_at ELSE r.end_at END) > ?)"
            " ORDER BY u.id",
            (rowmap.ts(cutoff),),
        )
        return [rowmap.user(r) for r in rows]

    async def purge_user(self, user_id: str, now: datetime, audit: AuditEntry) -> bool:
        async with self._tx() as w:
            cur = await w.execute(
                "UPDATE users SET name = ?, email = NULL, phone = NULL, purged_at = ?"
                " WHERE id = ? AND purged_at IS NULL",
                (pseudonym(user_id), rowmap.ts(now), user_id),
            )
            if cur.rowcount == 0:
                return False
            await w.execute(
                "UPDATE audit_events SET personal = NULL WHERE personal IS NOT NULL AND (subject = ?"
                " OR request_id IN (SELECT id FROM access_requests WHERE user_id = ?))",
                (user_id, user_id),
            )
            await self._audit(w, audit)
        # Old page images in the write-ahead log still hold the erased values: fold the log
        # back into the (securely overwritten) main file and truncate it.
        try:
            await self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("store.checkpoint_failed detail=%s", exc)
        return True

    async def has_open_requests(self, user_id: str, now: datetime) -> bool:
        row = await self._one(
            "SELECT 1 AS x FROM access_requests WHERE user_id = ? AND status IN ('saved', 'forwarded')"
            " AND end_at > ? LIMIT 1",
            (user_id, rowmap.ts(now)),
        )
        return row is not None

    # reasons -----------------------------------------------------------------
    async def create_reason(self, reason: Reason, audit: AuditEntry) -> None:
        async with self._tx() as w:
            await w.execute(
                "INSERT INTO reasons (id, label, created_at) VALUES (?,?,?)",
                (reason.id, reason.label, rowmap.ts(reason.created_at)),
            )
            await self._audit(w, audit)

    async def delete_reason(self, reason_id: str, audit: AuditEntry) -> bool:
        async with self._tx() as w:
            cur = await w.execute("SELECT 1 FROM access_requests WHERE reason_id = ? LIMIT 1", (reason_id,))
            if await cur.fetchone():
                raise Conflict("the reason is used by access requests and is kept for the record")
            cur = await w.execute("DELETE FROM reasons WHERE id = ?", (reason_id,))
            if cur.rowcount == 0:
                return False
            await self._audit(w, audit)
        return True

    async def get_reason(self, reason_id: str) -> Reason | None:
        row = await self._one("SELECT * FROM reasons WHERE id = ?", (reason_id,))
        return rowmap.reason(row) if row else None

    async def list_reasons(self) -> list[Reason]:
        return [rowmap.reason(r) for r in await self._all("SELECT * FROM reasons ORDER BY label")]

    # targets -----------------------------------------------------------------
    async def create_target(self, target: Target, audit: AuditEntry) -> None:
        async with self._tx() as w:
            await w.execute(
                "INSERT INTO targets (id, name, protocol, url, host, port, ssh_host_key, tls_verify,"
                " created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    target.id,
                    target.name,
                    target.protocol.value,
                    target.url,
                    target.host,
                    target.port,
                    target.ssh_host_key,
                    int(target.tls_verify),
                    rowmap.ts(target.created_at),
                ),
            )
            await self._audit(w, audit)

    async def update_target(self, target: Target, audit: AuditEntry) -> None:
        async with self._tx() as w:
            await w.execute(
                "UPDATE targets SET name = ?, protocol = ?, url = ?, host = ?, port = ?,"
                " ssh_host_key = ?, tls_verify = ? WHERE id = ?",
                (
                    target.name,
                    target.protocol.value,
                    target.url,
                    target.host,
                    target.port,
                    target.ssh_host_key,
                    int(target.tls_verify),
                    target.id,
                ),
            )
            await self._audit(w, audit)

    async def delete_target(self, target_id: str, audit: AuditEntry) -> bool:
        async with self._tx() as w:
            cur = await w.execute("DELETE FROM targets WHERE id = ?", (target_id,))
            if cur.rowcount == 0:
                return False
            await self._audit(w, audit)
        return True

    async def get_target(self, target_id: str) -> Target | None:
        row = await self._one("SELECT * FROM targets WHERE id = ? OR name = ?", (target_id, target_id))
        return rowmap.target(row) if row else None

    async def list_targets(self) -> list[Target]:
        return [rowmap.target(r) for r in await self._all("SELECT * FROM targets ORDER BY name")]

    # access requests ---------------------------------------------------------
    async def create_request(
        self, request: AccessRequest, new_user: RemoteUser | None, audit: AuditEntry
    ) -> None:
        async with self._tx() as w:
            if new_user is not None:
                await self._insert_user(w, new_user)
            await w.execute(
                "INSERT INTO access_requests (id, group_id, user_id, justification, reason_id,"
                " governance_code, start_at, end_at, status, created_at, created_by)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    request.id,
                    request.group_id,
                    request.user_id,
                    request.justification,
                    request.reason_id,
                    request.governance_code,
                    rowmap.ts(request.start),
                    rowmap.ts(request.end),
                    request.status.value,
                    rowmap.ts(request.created_at),
                    request.created_by,
                ),
            )
            await self._audit(w, audit)

    async def get_request(self, request_id: str) -> AccessRequest | None:
        row = await self._one("SELECT * FROM access_requests WHERE id = ?", (request_id,))
        return rowmap.request(row) if row else None

    async def list_requests(self, flt: RequestFilter) -> Page[AccessRequest]:
        where: list[str] = []
        params: list[Any] = []
        if flt.status is not None:
            where.append("status = ?")
            params.append(flt.status.value)
        if flt.user_id is not None:
            where.append("user_id = ?")
            params.append(flt.user_id)
        if flt.group_id is not None:
            where.append("group_id = ?")
            params.append(flt.group_id)
        if flt.cursor:
            parts = rowmap.decode_cursor(flt.cursor, 2)
            if parts is None:
                raise BadRequest("the cursor is not valid; start again without it")
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend([parts[0], parts[0], parts[1]])
        sql = "SELECT * FROM access_requests"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        params.append(flt.limit + 1)
        rows = await self._all(sql, params)
        items = [rowmap.request(r) for r in rows[: flt.limit]]
        nxt = None
        if len(rows) > flt.limit:
            last = rows[flt.limit - 1]
            nxt = rowmap.encode_cursor(last["created_at"], last["id"])
        return Page(items, nxt)

    async def find_request_by_link(self, link_hash: str) -> AccessRequest | None:
        row = await self._one("SELECT * FROM access_requests WHERE link_hash = ?", (link_hash,))
        return rowmap.request(row) if row else None

    async def mark_forwarded(
        self, request_id: str, link_hash: str, now: datetime, actor: str, audit: AuditEntry
    ) -> AccessRequest | None:
        async with self._tx() as w:
            cur = await w.execute(
                "UPDATE access_requests SET status = 'forwarded', link_hash = ?, forwarded_at = ?,"
                " forwarded_by = ? WHERE id = ? AND status IN ('saved', 'forwarded')",
                (link_hash, rowmap.ts(now), actor, request_id),
            )
            if cur.rowcount == 0:
                return None
            # A new link replaces the old one: tokens sent for the old link die with it.
            await w.execute("DELETE FROM otps WHERE request_id = ?", (request_id,))
            await self._audit(w, audit)
            cur = await w.execute("SELECT * FROM access_requests WHERE id = ?", (request_id,))
            row = await cur.fetchone()
        return rowmap.request(row) if row else None

    async def revoke_request(
        self, request_id: str, now: datetime, actor: str, audit: AuditEntry
    ) -> AccessRequest | None:
        async with self._tx() as w:
            cur = await w.execute(
                "UPDATE access_requests SET status = 'revoked', revoked_at = ?, revoked_by = ?"
                " WHERE id = ? AND status IN ('saved', 'forwarded')",
                (rowmap.ts(now), actor, request_id),
            )
            if cur.rowcount == 0:
                return None
            await w.execute(
                "UPDATE sessions SET ended_at = ?, end_reason = 'revoked'"
                " WHERE request_id = ? AND ended_at IS NULL",
                (rowmap.ts(now), request_id),
            )
            await w.execute("DELETE FROM otps WHERE request_id = ?", (request_id,))
            await self._audit(w, audit)
            cur = await w.execute("SELECT * FROM access_requests WHERE id = ?", (request_id,))
            row = await cur.fetchone()
        return rowmap.request(row) if row else None

    async def expire_requests(self, now: datetime) -> list[str]:
        async with self._tx() as w:
            cur = await w.execute(
                "UPDATE access_requests SET status = 'expired'"
                " WHERE status IN ('saved', 'forwarded') AND end_at <= ? RETURNING id",
                (rowmap.ts(now),),
            )
            ids = [str(r["id"]) for r in await cur.fetchall()]
            for rid in ids:
                await w.execute(
                    "UPDATE sessions SET ended_at = ?, end_reason = 'expired'"
                    " WHERE request_id = ? AND ended_at IS NULL",
                    (rowmap.ts(now), rid),
                )
                await self._audit(w, AuditEntry(actor="system", action="request.expired", subject=rid))
        return ids

    async def count_active_grants(self, now: datetime) -> int:
        nows = rowmap.ts(now)
        # ``requests_status (status, end_at)`` bounds the scan to forwarded windows not yet ended.
        row = await self._one(
            "SELECT COUNT(*) AS n FROM access_requests"
            " WHERE status = 'forwarded' AND end_at > ? AND start_at <= ?",
            (nows, nows),
        )
        return int(row["n"]) if row is not None else 0

    # one-time tokens ---------------------------------------------------------
    async def issue_otp(
        self,
        request_id: str,
        otp_hash: str,
        now: datetime,
        expires_at: datetime,
        max_sends_per_hour: int,
    ) -> OtpIssue:
        hour_ago = rowmap.ts(now - timedelta(hours=1))
        async with self._tx() as w:
            cur = await w.execute(
                "SELECT COUNT(*) AS n, MIN(sent_at) AS first FROM otp_sends"
                " WHERE request_id = ? AND sent_at > ?",
                (request_id, hour_ago),
            )
            row = await cur.fetchone()
            if row is not None and int(row["n"]) >= max_sends_per_hour:
                first = rowmap.dt_req(row["first"])
                wait = int((first + timedelta(hours=1) - now).total_seconds()) + 1
                return OtpIssue(False, max(1, wait))
            await w.execute(
                "INSERT INTO otp_sends (request_id, sent_at, otp_hash) VALUES (?,?,?)",
                (request_id, rowmap.ts(now), otp_hash),
            )
            await w.execute(
                "DELETE FROM otp_sends WHERE request_id = ? AND sent_at <= ?", (request_id, hour_ago)
            )
            # A new send replaces the previous token and its try counter.
            await w.execute(
                "INSERT INTO otps (request_id, otp_hash, created_at, expires_at, tries, used_at)"
                " VALUES (?,?,?,?,0,NULL) ON CONFLICT (request_id) DO UPDATE SET"
                " otp_hash = excluded.otp_hash, created_at = excluded.created_at,"
                " expires_at = excluded.expires_at, tries = 0, used_at = NULL",
                (request_id, otp_hash, rowmap.ts(now), rowmap.ts(expires_at)),
            )
        return OtpIssue(True)

    async def cancel_otp_send(self, request_id: str, otp_hash: str) -> None:
        async with self._tx() as w:
            await w.execute("DELETE FROM otps WHERE request_id = ? AND otp_hash = ?", (request_id, otp_hash))
            await w.execute(
                "DELETE FROM otp_sends WHERE request_id = ? AND otp_hash = ?", (request_id, otp_hash)
            )

    async def redeem_otp(self, request_id: str, otp_hash: str, now: datetime, max_tries: int) -> OtpResult:
        """A token counts as spent at the moment this statement commits ``used_at``.

        The match and the spend are one ``UPDATE ... WHERE used_at IS NULL AND tries < max
        AND expires_at > now RETURNING``, so of two concurrent correct redemptions exactly one
        gets the row back. A wrong guess increments ``tries`` in one statement too, so
        concurrent guesses can never exceed ``max_tries`` in total.
        """
        nows = rowmap.ts(now)
        async with self._tx() as w:
            cur = await w.execute(
                "UPDATE otps SET used_at = ? WHERE request_id = ? AND otp_hash = ?"
                " AND used_at IS NULL AND tries < ? AND expires_at > ? RETURNING request_id",
                (nows, request_id, otp_hash, max_tries, nows),
            )
            if await cur.fetchone():
                return OtpResult.OK
            cur = await w.execute("SELECT * FROM otps WHERE request_id = ?", (request_id,))
            row = await cur.fetchone()
            if row is None:
                return OtpResult.NONE
            if row["used_at"] is not None or int(row["tries"]) >= max_tries:
                return OtpResult.EXHAUSTED
            if row["expires_at"] <= nows:
                return OtpResult.EXPIRED
            await w.execute(
                "UPDATE otps SET tries = tries + 1 WHERE request_id = ? AND used_at IS NULL",
                (request_id,),
            )
            return OtpResult.WRONG

    # sessions ----------------------------------------------------------------
    async def create_session(
        self, session: Session, session_hash: str, max_sessions: int, audit: AuditEntry
    ) -> SessionCreate:
        async with self._tx() as w:
            cur = await w.execute(
                "SELECT COUNT(*) AS n FROM sessions WHERE request_id = ? AND ended_at IS NULL",
                (session.request_id,),
            )
            row = await cur.fetchone()
            if row is not None and int(row["n"]) >= max_sessions:
                return SessionCreate.TOO_MANY
            await w.execute(
                "INSERT INTO sessions (id, request_id, session_hash, address, created_at, last_seen)"
                " VALUES (?,?,?,?,?,?)",
                (
                    session.id,
                    session.request_id,
                    session_hash,
                    session.address,
                    rowmap.ts(session.created_at),
                    rowmap.ts(session.last_seen),
                ),
            )
            await self._audit(w, audit)
        return SessionCreate.OK

    async def find_session(self, session_hash: str) -> Session | None:
        row = await self._one(
            "SELECT * FROM sessions WHERE session_hash = ? AND ended_at IS NULL", (session_hash,)
        )
        return rowmap.session(row) if row else None

    async def get_session(self, session_id: str) -> Session | None:
        row = await self._one("SELECT * FROM sessions WHERE id = ?", (session_id,))
        return rowmap.session(row) if row else None

    async def touch_sessions(self, seen: dict[str, datetime]) -> None:
        if not seen:
            return
        async with self._tx() as w:
            await w.executemany(
                "UPDATE sessions SET last_seen = ? WHERE id = ? AND last_seen < ?",
                [(rowmap.ts(t), sid, rowmap.ts(t)) for sid, t in seen.items()],
            )

    async def end_session(
        self, session_id: str, reason: str, now: datetime, audit: AuditEntry | None
    ) -> bool:
        async with self._tx() as w:
            cur = await w.execute(
                "UPDATE sessions SET ended_at = ?, end_reason = ? WHERE id = ? AND ended_at IS NULL",
                (rowmap.ts(now), reason, session_id),
            )
            if cur.rowcount == 0:
                return False
            if audit is not None:
                await self._audit(w, audit)
        return True

    async def list_sessions(self, request_id: str | None = None, live: bool = True) -> list[Session]:
        where = []
        params: list[Any] = []
        if request_id is not None:
            where.append("request_id = ?")
            params.append(request_id)
        if live:
            where.append("ended_at IS NULL")
        sql = "SELECT * FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at"
        return [rowmap.session(r) for r in await self._all(sql, params)]

    # session secrets -----------------------------------------------------------
    async def add_session_secret(
        self,
        kind: SecretKind,
        secret_hash: str,
        session_id: str,
        now: datetime,
        expires_at: datetime,
        *,
        target_id: str | None = None,
        detail: str | None = None,
        max_per_session: int = 100,
    ) -> bool:
        nows = rowmap.ts(now)
        async with self._tx() as w:
            cur = await w.execute("SELECT 1 FROM sessions WHERE id = ? AND ended_at IS NULL", (session_id,))
            if await cur.fetchone() is None:
                return False
            await w.execute(
                "DELETE FROM session_secrets WHERE session_id = ? AND kind = ? AND expires_at <= ?",
                (session_id, kind.value, nows),
            )
            cur = await w.execute(
                "SELECT COUNT(*) AS n FROM session_secrets WHERE session_id = ? AND kind = ?",
                (session_id, kind.value),
            )
            row = await cur.fetchone()
            if row is not None and int(row["n"]) >= max_per_session:
                return False
            await w.execute(
                "INSERT INTO session_secrets (secret_hash, kind, session_id, target_id, detail, created_at,"
                " expires_at) VALUES (?,?,?,?,?,?,?)",
                (secret_hash, kind.value, session_id, target_id, detail, nows, rowmap.ts(expires_at)),
            )
        return True

    async def find_session_secret(
        self, kind: SecretKind, secret_hash: str, now: datetime
    ) -> SessionSecret | None:
        row = await self._one(
            "SELECT k.*, s.session_hash FROM session_secrets k JOIN sessions s ON s.id = k.session_id"
            " WHERE k.secret_hash = ? AND k.kind = ? AND k.expires_at > ? AND s.ended_at IS NULL",
            (secret_hash, kind.value, rowmap.ts(now)),
        )
        return rowmap.session_secret(row) if row else None

    async def take_session_secret(
        self, kind: SecretKind, secret_hash: str, now: datetime
    ) -> SessionSecret | None:
        async with self._tx() as w:
            # One statement spends it; the single writer makes it the only one.
            cur = await w.execute(
                "DELETE FROM session_secrets WHERE secret_hash = ? AND kind = ? AND expires_at > ?"
                " RETURNING *",
                (secret_hash, kind.value, rowmap.ts(now)),
            )
            taken = await cur.fetchone()
            if taken is None:
                return None
            cur = await w.execute(
                "SELECT session_hash FROM sessions WHERE id = ? AND ended_at IS NULL", (taken["session_id"],)
            )
            live = await cur.fetchone()
        if live is None:
            return None
        return rowmap.session_secret({**dict(taken), "session_hash": live["session_hash"]})

    async def drop_session_secrets(self, session_id: str, kind: SecretKind | None = None) -> int:
        async with self._tx() as w:
            if kind is None:
                cur = await w.execute("DELETE FROM session_secrets WHERE session_id = ?", (session_id,))
            else:
                cur = await w.execute(
                    "DELETE FROM session_secrets WHERE session_id = ? AND kind = ?", (session_id, kind.value)
                )
            return int(cur.rowcount)

    # console sessions ------------------------------------------------------------
    async def create_console_session(self, record: ConsoleSessionRecord, max_sessions: int) -> None:
        nows = rowmap.ts(record.created_at)
        async with self._tx() as w:
            await w.execute(
                "DELETE FROM console_sessions WHERE idle_until <= ? OR expires_at <= ?", (nows, nows)
            )
            cur = await w.execute("SELECT COUNT(*) AS n FROM console_sessions")
            row = await cur.fetchone()
            excess = (int(row["n"]) if row is not None else 0) - max_sessions + 1
            if excess > 0:
                await w.execute(
                    "DELETE FROM console_sessions WHERE sid_hash IN"
                    " (SELECT sid_hash FROM console_sessions ORDER BY last_seen, sid_hash LIMIT ?)",
                    (excess,),
                )
            await w.execute(
                "INSERT INTO console_sessions (sid_hash, token_hash, token_name, role, created_at, last_seen,"
                " idle_until, expires_at, state) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    record.sid_hash,
                    record.token_hash,
                    record.token_name,
                    record.role.value,
                    nows,
                    rowmap.ts(record.last_seen),
                    rowmap.ts(record.idle_until),
                    rowmap.ts(record.expires_at),
                    json.dumps(record.state, sort_keys=True),
                ),
            )

    async def find_console_session(self, sid_hash: str, now: datetime) -> ConsoleSessionRecord | None:
        nows = rowmap.ts(now)
        row = await self._one(
            "SELECT * FROM console_sessions WHERE sid_hash = ? AND idle_until > ? AND expires_at > ?",
            (sid_hash, nows, nows),
        )
        return rowmap.console_session(row) if row else None

    async def save_console_session(
        self, sid_hash: str, last_seen: datetime, idle_until: datetime, state: dict[str, Any]
    ) -> bool:
        async with self._tx() as w:
            cur = await w.execute(
                "UPDATE console_sessions SET last_seen = ?, idle_until = ?, state = ? WHERE sid_hash = ?",
                (rowmap.ts(last_seen), rowmap.ts(idle_until), json.dumps(state, sort_keys=True), sid_hash),
            )
            return int(cur.rowcount) > 0

    async def end_console_session(self, sid_hash: str) -> bool:
        async with self._tx() as w:
            cur = await w.execute("DELETE FROM console_sessions WHERE sid_hash = ?", (sid_hash,))
            return int(cur.rowcount) > 0

    async def end_console_sessions_for_token(self, token_hash: str) -> int:
        async with self._tx() as w:
            cur = await w.execute("DELETE FROM console_sessions WHERE token_hash = ?", (token_hash,))
            return int(cur.rowcount)

    # live connections ------------------------------------------------------------
    async def upsert_connections(self, records: Sequence[ConnectionRecord]) -> None:
        latest = {r.id: r for r in records}
        if not latest:
            return
        async with self._tx() as w:
            await w.executemany(
                "INSERT INTO live_connections (id, session_id, request_id, user_id, protocol, target,"
                " origin, since, bytes_in, bytes_out, replica, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET bytes_in = excluded.bytes_in,"
                " bytes_out = excluded.bytes_out, replica = excluded.replica,"
                " updated_at = excluded.updated_at",
                [_connection_params(r) for _, r in sorted(latest.items())],
            )

    async def delete_connections(self, ids: Collection[str]) -> int:
        if not ids:
            return 0
        async with self._tx() as w:
            cur = await w.executemany(
                "DELETE FROM live_connections WHERE id = ?", [(cid,) for cid in sorted(set(ids))]
            )
            return int(cur.rowcount)

    async def delete_replica_connections(self, replica: str) -> int:
        async with self._tx() as w:
            cur = await w.execute("DELETE FROM live_connections WHERE replica = ?", (replica,))
            return int(cur.rowcount)

    async def get_connection(self, connection_id: str) -> ConnectionRecord | None:
        row = await self._one("SELECT * FROM live_connections WHERE id = ?", (connection_id,))
        return rowmap.connection(row) if row else None

    async def list_connections(
        self,
        fresh_after: datetime,
        *,
        session_id: str | None = None,
        request_id: str | None = None,
    ) -> list[ConnectionRecord]:
        where = ["updated_at > ?"]
        params: list[Any] = [rowmap.ts(fresh_after)]
        if session_id is not None:
            where.append("session_id = ?")
            params.append(session_id)
        if request_id is not None:
            where.append("request_id = ?")
            params.append(request_id)
        sql = "SELECT * FROM live_connections"
        sql += " WHERE " + " AND ".join(where) + " ORDER BY since, id"
        return [rowmap.connection(r) for r in await self._all(sql, params)]

    async def purge_stale_connections(self, fresh_after: datetime) -> int:
        async with self._tx() as w:
            cur = await w.execute(
                "DELETE FROM live_connections WHERE updated_at <= ?", (rowmap.ts(fresh_after),)
            )
            return int(cur.rowcount)

    async def purge_expired(self, now: datetime) -> int:
        nows = rowmap.ts(now)
        async with self._tx() as w:
            cur = await w.execute(
                "DELETE FROM session_secrets WHERE expires_at <= ? OR EXISTS (SELECT 1 FROM sessions s"
                " WHERE s.id = session_secrets.session_id AND s.ended_at IS NOT NULL)",
                (nows,),
            )
            gone = int(cur.rowcount)
            cur = await w.execute(
                "DELETE FROM console_sessions WHERE idle_until <= ? OR expires_at <= ?", (nows, nows)
            )
            return gone + int(cur.rowcount)

    # audit -------------------------------------------------------------------
    async def append_audit(self, entry: AuditEntry) -> None:
        async with self._tx() as w:
            await self._audit(w, entry)

    async def list_audit(self, flt: AuditFilter) -> Page[AuditEvent]:
        where: list[str] = []
        params: list[Any] = []
        if flt.since is not None:
            where.append("at >= ?")
            params.append(rowmap.ts(flt.since))
        if flt.type is not None:
            where.append("action = ?")
            params.append(flt.type)
        if flt.request_id is not None:
            where.append("request_id = ?")
            params.append(flt.request_id)
        if flt.subject is not None:
            where.append("subject = ?")
            params.append(flt.subject)
        if flt.cursor:
            parts = rowmap.decode_cursor(flt.cursor, 1)
            if parts is None or not parts[0].isascii() or not parts[0].isdigit() or len(parts[0]) > 18:
                raise BadRequest("the cursor is not valid; start again without it")
            where.append("seq > ?")
            params.append(int(parts[0]))
        sql = "SELECT * FROM audit_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq LIMIT ?"
        params.append(flt.limit + 1)
        rows = await self._all(sql, params)
        items = [rowmap.event(r) for r in rows[: flt.limit]]
        nxt = rowmap.encode_cursor(str(rows[flt.limit - 1]["seq"])) if len(rows) > flt.limit else None
        return Page(items, nxt)

    async def all_audit(self) -> Sequence[AuditEvent]:
        return [rowmap.event(r) for r in await self._all("SELECT * FROM audit_events ORDER BY seq")]

    async def audit_head(self) -> tuple[int, str] | None:
        row = await self._one("SELECT seq, hash FROM audit_head WHERE id = 1")
        return (int(row["seq"]), str(row["hash"])) if row else None


async def _rollback(w: aiosqlite.Connection) -> None:
    """Undo the open transaction; never raises, so the caller's error is the one reported.

    After SQLITE_FULL or an I/O error SQLite may already have rolled back on its own, and
    ROLLBACK then fails with "no transaction is active": nothing is left to undo.
    """
    try:
        await w.execute("ROLLBACK")
    except sqlite3.Error as exc:
        if w.in_transaction:  # pragma: no cover - the connection is unusable; say so loudly
            log.error("store.rollback_failed code=%s detail=%s", _code(exc), exc)


def _code(exc: sqlite3.Error) -> str:
    return str(getattr(exc, "sqlite_errorname", None) or type(exc).__name__)


def _log_failure(step: str, exc: sqlite3.Error) -> None:
    # SQLite's messages ("database is locked", "database or disk is full", "disk I/O error")
    # name the cause an operator must fix and carry no data; the change is refused (503).
    log.error("store.%s_failed code=%s detail=%s (refused: fail closed)", step, _code(exc), exc)


def _connection_params(r: ConnectionRecord) -> tuple[Any, ...]:
    return (
        r.id,
        r.session_id,
        r.request_id,
        r.user_id,
        r.protocol,
        r.target,
        r.origin,
        rowmap.ts(r.since),
        r.bytes_in,
        r.bytes_out,
        r.replica,
        rowmap.ts(r.updated_at),
    )


def _split_sql(sql: str) -> list[str]:
    return [s.strip() for s in sql.split(";") if s.strip()]


def _integrity_message(exc: sqlite3.IntegrityError) -> str:
    text = str(exc)
    if "UNIQUE" in text:
        field = text.rsplit(".", 1)[-1]
        return f"another record already has this {field}"
    if "FOREIGN KEY" in text:
        return "a referenced record does not exist"
    return "the change conflicts with existing data"
