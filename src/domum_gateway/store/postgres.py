"""PostgreSQL implementation of :class:`Store` on asyncpg: the store several replicas share.

Same semantics as :class:`~.sqlite.SqliteStore`, method for method, but every guarantee
that SQLite gets from its single writer has to hold here across processes:

- A change and its audit event commit in one transaction. The audit chain stays a strict
  chain because each append first takes a transaction-scoped advisory lock
  (``_AUDIT_LOCK``), then reads the head, then writes: appends from every replica are
  serialised, never forked.
- Spending a one-time token and counting a wrong guess are single conditional ``UPDATE``
  statements (the row lock makes concurrent ones queue and re-check the condition).
- Send limits and ``max_sessions`` lock the access request's row (``FOR NO KEY UPDATE``)
  before counting, so two replicas cannot both see "one left".

Lock order, to keep deadlocks out: the access request's row first, then the rows of its
sessions and tokens, and the audit lock last (every method appends its event after its
other writes). Deadlocks that still happen between batched updates (``touch_sessions``
against a revoke) are retried.

Timestamps are the same fixed-width UTC text as in SQLite (``audit.format_instant``), so
the audit hash inputs are byte-identical and cursors and ordering behave the same. Driver
exceptions become :class:`StoreError` (unreachable, timed out) or :class:`Conflict`
(constraint violations) here and never escape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

import asyncpg

from ..audit import GENESIS, AuditEntry, commit_personal, envelope, event_hash, format_instant
from ..bus import Change
from ..clock import Clock, SystemClock
from ..errors import BadRequest, Conflict, DomumError, StoreError
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
from .migrations_pg import MIGRATIONS_PG
from .pg_notify import CHANNEL, ChangeFeed

__all__ = ["PostgresStore"]

log = logging.getLogger("domum.store")

R = TypeVar("R")

# Advisory lock keys (64-bit, fixed): one serialises audit appends across replicas, the
# other serialises schema migrations when several replicas start at once.
_AUDIT_LOCK = 0x646F6D756D0A0001
_MIGRATE_LOCK = 0x646F6D756D0A0002

# Conflicts that PostgreSQL resolves by aborting one transaction; running it again is safe.
_RETRYABLE = (asyncpg.exceptions.TransactionRollbackError,)
# The pooled connection died under us (server restart, network): a fresh one may work.
_STALE = (asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.exceptions.AdminShutdownError)
_ATTEMPTS = 3


class _Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


class _Params:
    """Collects positional parameters for a query built from optional parts."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def _count(status: str) -> int:
    """Rows affected, from a command tag like ``UPDATE 3``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


_KEY_COLUMN = re.compile(r"Key \(([a-z_]+)(?:, [a-z_]+)*\)=")


def _integrity_message(exc: asyncpg.exceptions.IntegrityConstraintViolationError) -> str:
    # Same words as the SQLite store; never echo the detail, which quotes the value.
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        found = _KEY_COLUMN.search(getattr(exc, "detail", "") or "")
        return f"another record already has this {found.group(1) if found else 'value'}"
    if isinstance(exc, asyncpg.exceptions.ForeignKeyViolationError):
        return "a referenced record does not exist"
    return "the change conflicts with existing data"


def _translate(exc: BaseException, doing: str) -> DomumError:
    """The gateway's error for a driver or network failure."""
    if isinstance(exc, asyncpg.exceptions.IntegrityConstraintViolationError):
        return Conflict(_integrity_message(exc))
    if isinstance(
        exc,
        asyncpg.exceptions.CharacterNotInRepertoireError | asyncpg.exceptions.UntranslatableCharacterError,
    ):
        # NUL and friends: PostgreSQL text cannot hold them; say so instead of "unavailable".
        return BadRequest("a value contains a character that cannot be stored (such as NUL)")
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError | TimeoutError):
        return StoreError(f"the database did not {doing} in time")
    return StoreError(f"the database could not {doing}")


_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

# Opening also fails on a malformed URL (asyncpg raises ValueError for those).
_OPEN_ERRORS: tuple[type[BaseException], ...] = (*_DRIVER_ERRORS, ValueError)


class PostgresStore(Store):
    """The shared store: a connection pool, plus one listening connection per replica."""

    kind = "postgresql"

    def __init__(
        self,
        url: str,
        clock: Clock | None = None,
        *,
        pool_size: int = 10,
        statement_timeout: float = 5.0,
        application_name: str = "domum-gateway",
    ) -> None:
        self._url = url
        self._clock = clock or SystemClock()
        self._pool_size = pool_size
        self._timeout = statement_timeout
        self._app_name = application_name
        self._pool: Any = None
        self._feed: ChangeFeed | None = None
        self._on_change: Callable[[Change], None] | None = None
        # Names this replica in notifications and in pg_stat_activity (its listener).
        self.instance_id = secrets.token_hex(8)

    # lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        ms = max(1, int(self._timeout * 1000))
        try:
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=min(2, self._pool_size),
                max_size=self._pool_size,
                # Client-side limits: connecting, and a safety net a little above the
                # server's own statement_timeout for when the server stops answering.
                timeout=self._timeout,
                command_timeout=self._timeout + 1.0,
                server_settings={
                    "application_name": self._app_name,
                    "statement_timeout": str(ms),
                    # A replica that stalls mid-transaction must not hold the audit lock.
                    "idle_in_transaction_session_timeout": str(max(ms * 4, 10_000)),
                },
            )
        except _OPEN_ERRORS as exc:
            raise StoreError(f"cannot open the PostgreSQL database: {_describe(exc)}") from exc
        try:
            await self._migrate()
            if self._on_change is not None:
                await self._start_feed()
        except BaseException:
            await self._close_pool()
            raise

    async def close(self) -> None:
        if self._feed is not None:
            feed, self._feed = self._feed, None
            await feed.stop()
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self._timeout)
        except _DRIVER_ERRORS:
            pool.terminate()

    async def _migrate(self) -> None:
        async def run(c: Any) -> None:
            await c.execute("SELECT pg_advisory_lock($1)", _MIGRATE_LOCK)
            try:
                await c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                current = await c.fetchval("SELECT MAX(version) FROM schema_version") or 0
                for version, sql in MIGRATIONS_PG:
                    if version <= current:
                        continue
                    async with c.transaction():
                        await c.execute(sql)
                        await c.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
                    log.info("store.migrated version=%d", version)
            finally:
                await c.execute("SELECT pg_advisory_unlock($1)", _MIGRATE_LOCK)

        async with self._acquire("apply migrations") as c:
            try:
                # Migrations may take longer than an ordinary statement.
                await c.execute("SET statement_timeout = 0")
                await run(c)
                await c.execute("RESET statement_timeout")
            except _DRIVER_ERRORS as exc:
                raise _translate(exc, "apply migrations") from exc

    async def schema_version(self) -> int:
        value = await self._val("SELECT MAX(version) FROM schema_version")
        return int(value) if value is not None else 0

    async def ping(self) -> None:
        await self._val("SELECT 1")
        if self._feed is not None and not self._feed.connected:
            raise StoreError("change notifications from other replicas are not being received")

    # notifications -----------------------------------------------------------
    async def listen(self, callback: Callable[[Change], None]) -> None:
        """Hear changes other replicas publish; ``callback`` gets each one.

        Runs on a dedicated connection that reconnects with backoff. While it is down,
        :meth:`ping` fails (readiness turns 503); when it drops and again when it is back,
        ``callback`` receives ``pg_notify.everything_changed()`` (``GROUP`` and ``TARGET``
        with id ``"*"``) so caches re-read everything.
        """
        self._on_change = callback
        if self._pool is not None and self._feed is None:
            await self._start_feed()

    def notify(self, change: Change) -> None:
        """Publish a local change to the other replicas (queued; sent in order)."""
        if self._feed is not None:
            self._feed.publish(change)

    @property
    def listening(self) -> bool:
        """True while notifications from other replicas are being received."""
        return self._feed is not None and self._feed.connected

    @property
    def listener_name(self) -> str:
        """The listening connection's ``application_name``."""
        return f"{self._app_name}-listen-{self.instance_id}"

    async def _start_feed(self) -> None:
        assert self._on_change is not None
        feed = ChangeFeed(
            instance_id=self.instance_id,
            connect=self._connect_listener,
            send=self._send_notification,
            on_change=self._on_change,
            timeout=self._timeout,
        )
        try:
            await feed.start()
        except _OPEN_ERRORS as exc:
            raise StoreError(f"cannot listen for other replicas' changes: {_describe(exc)}") from exc
        self._feed = feed

    async def _connect_listener(self) -> Any:
        return await asyncpg.connect(
            self._url,
            timeout=self._timeout,
            command_timeout=self._timeout + 1.0,
            server_settings={"application_name": self.listener_name},
        )

    async def _send_notification(self, payload: str) -> None:
        await self._val("SELECT pg_notify($1, $2)", CHANNEL, payload)

    # plumbing ----------------------------------------------------------------
    @asynccontextmanager
    async def _acquire(self, doing: str) -> AsyncIterator[Any]:
        pool = self._pool
        if pool is None:
            raise StoreError("the store is not open")
        try:
            conn = await pool.acquire(timeout=self._timeout)
        except _DRIVER_ERRORS as exc:
            raise _translate(exc, doing) from exc
        try:
            yield conn
        finally:
            with contextlib.suppress(*_DRIVER_ERRORS):
                await pool.release(conn, timeout=self._timeout)

    async def _read(self, fn: Callable[[Any], Awaitable[R]]) -> R:
        """Run a read on a pooled connection; retried when that connection had died."""
        for attempt in range(_ATTEMPTS):
            async with self._acquire("answer") as c:
                try:
                    return await fn(c)
                except _STALE as exc:
                    if attempt == _ATTEMPTS - 1:
                        raise _translate(exc, "answer") from exc
                except _DRIVER_ERRORS as exc:
                    raise _translate(exc, "answer") from exc
        raise StoreError("the database could not answer")  # pragma: no cover - loop always returns

    async def _all(self, sql: str, *args: Any) -> list[_Row]:
        rows: list[_Row] = await self._read(lambda c: c.fetch(sql, *args))
        return rows

    async def _one(self, sql: str, *args: Any) -> _Row | None:
        row: _Row | None = await self._read(lambda c: c.fetchrow(sql, *args))
        return row

    async def _val(self, sql: str, *args: Any) -> Any:
        return await self._read(lambda c: c.fetchval(sql, *args))

    async def _write(self, fn: Callable[[Any], Awaitable[R]]) -> R:
        """Run ``fn`` in one transaction; retried on deadlock/serialisation aborts and when
        the pooled connection turns out dead before anything was sent."""
        for attempt in range(_ATTEMPTS):
            last = attempt == _ATTEMPTS - 1
            async with self._acquire("complete the change") as c:
                tx = c.transaction()
                try:
                    await tx.start()
                except _STALE as exc:
                    if last:
                        raise _translate(exc, "complete the change") from exc
                    continue
                except _DRIVER_ERRORS as exc:
                    raise _translate(exc, "complete the change") from exc
                try:
                    result = await fn(c)
                except BaseException as exc:
                    with contextlib.suppress(*_DRIVER_ERRORS):
                        await tx.rollback()
                    if isinstance(exc, _RETRYABLE) and not last:
                        await asyncio.sleep(random.uniform(0.005, 0.05))
                        continue
                    if isinstance(exc, _DRIVER_ERRORS):
                        raise _translate(exc, "complete the change") from exc
                    raise
                try:
                    await tx.commit()
                except _RETRYABLE as exc:
                    if last:
                        raise _translate(exc, "complete the change") from exc
                    continue
                except _DRIVER_ERRORS as exc:
                    raise _translate(exc, "complete the change") from exc
                return result
        raise StoreError("the database could not complete the change")

    async def _audit(self, c: Any, entry: AuditEntry) -> None:
        # Serialise appends across every replica until this transaction ends, then read
        # the head: each event links to the one committed just before it.
        await c.execute("SELECT pg_advisory_xact_lock($1)", _AUDIT_LOCK)
        head = await c.fetchrow("SELECT seq, hash FROM audit_head WHERE id = 1")
        seq = (int(head["seq"]) if head else 0) + 1
        prev = str(head["hash"]) if head else GENESIS
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
        await c.execute(
            "INSERT INTO audit_events (seq, at, actor, action, subject, request_id, outcome, origin,"
            " details, personal_commitment, personal, prev_hash, hash)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)",
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
        )
        await c.execute(
            "INSERT INTO audit_head (id, seq, hash) VALUES (1, $1, $2)"
            " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
            seq,
            digest,
        )

    # API tokens --------------------------------------------------------------
    async def create_api_token(
        self, name: str, role: Role, token_hash: str, now: datetime, audit: AuditEntry
    ) -> ApiToken:
        async def run(c: Any) -> None:
            if await c.fetchval("SELECT 1 FROM api_tokens WHERE name = $1", name):
                raise Conflict(f"a token named {name!r} already exists")
            await c.execute(
                "INSERT INTO api_tokens (name, role, token_hash, created_at) VALUES ($1,$2,$3,$4)",
                name,
                role.value,
                token_hash,
                rowmap.ts(now),
            )
            await self._audit(c, audit)

        await self._write(run)
        return ApiToken(name=name, role=role, created_at=now)

    async def find_api_token(self, token_hash: str) -> ApiToken | None:
        row = await self._one(
            "SELECT * FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL", token_hash
        )
        return rowmap.token(row) if row else None

    async def list_api_tokens(self) -> list[ApiToken]:
        return [rowmap.token(r) for r in await self._all("SELECT * FROM api_tokens ORDER BY name")]

    async def revoke_api_token(self, name: str, now: datetime, audit: AuditEntry) -> bool:
        async def run(c: Any) -> bool:
            status = await c.execute(
                "UPDATE api_tokens SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
                rowmap.ts(now),
                name,
            )
            if _count(status) == 0:
                return False
            await self._audit(c, audit)
            return True

        return await self._write(run)

    # groups ------------------------------------------------------------------
    async def create_group(self, group: Group, audit: AuditEntry) -> None:
        async def run(c: Any) -> None:
            await c.execute(
                "INSERT INTO groups (id, name, kind, policy, created_at) VALUES ($1,$2,$3,$4,$5)",
                group.id,
                group.name,
                group.kind.value,
                json.dumps(group.policy.to_json()),
                rowmap.ts(group.created_at),
            )
            await self._audit(c, audit)

        await self._write(run)

    async def update_group(self, group: Group, audit: AuditEntry) -> None:
        async def run(c: Any) -> None:
            await c.execute(
                "UPDATE groups SET name = $1, kind = $2, policy = $3 WHERE id = $4",
                group.name,
                group.kind.value,
                json.dumps(group.policy.to_json()),
                group.id,
            )
            await self._audit(c, audit)

        await self._write(run)

    async def delete_group(self, group_id: str, audit: AuditEntry) -> bool:
        async def run(c: Any) -> bool:
            if await c.fetchval("SELECT 1 FROM users WHERE group_id = $1 LIMIT 1", group_id):
                raise Conflict("the group still has users; delete or move them first")
            if await c.fetchval("SELECT 1 FROM access_requests WHERE group_id = $1 LIMIT 1", group_id):
                raise Conflict("the group has access requests and is kept for the record")
            # A user or request added concurrently makes this a foreign-key Conflict.
            if _count(await c.execute("DELETE FROM groups WHERE id = $1", group_id)) == 0:
                return False
            await self._audit(c, audit)
            return True

        return await self._write(run)

    async def get_group(self, group_id: str) -> Group | None:
        row = await self._one("SELECT * FROM groups WHERE id = $1", group_id)
        return rowmap.group(row) if row else None

    async def list_groups(self) -> list[Group]:
        return [rowmap.group(r) for r in await self._all("SELECT * FROM groups ORDER BY name")]

    # users -------------------------------------------------------------------
    async def create_user(self, user: RemoteUser, audit: AuditEntry) -> None:
        async def run(c: Any) -> None:
            await self._insert_user(c, user)
            await self._audit(c, audit)

        await self._write(run)

    async def _insert_user(self, c: Any, user: RemoteUser) -> None:
        await c.execute(
            "INSERT INTO users (id, group_id, name, email, phone, channel, ephemeral, created_at)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
            user.id,
            user.group_id,
            user.name,
            user.email,
            user.phone,
            user.channel.value,
            int(user.ephemeral),
            rowmap.ts(user.created_at),
        )

    async def update_user(self, user: RemoteUser, audit: AuditEntry) -> None:
        async def run(c: Any) -> None:
            await c.execute(
                "UPDATE users SET group_id = $1, name = $2, email = $3, phone = $4, channel = $5"
                " WHERE id = $6",
                user.group_id,
                user.name,
                user.email,
                user.phone,
                user.channel.value,
                user.id,
            )
            await self._audit(c, audit)

        await self._write(run)

    async def delete_user(self, user_id: str, audit: AuditEntry) -> bool:
        async def run(c: Any) -> bool:
            if await c.fetchval("SELECT 1 FROM access_requests WHERE user_id = $1 LIMIT 1", user_id):
                raise Conflict("the user has access requests and is kept for the record")
            if _count(await c.execute("DELETE FROM users WHERE id = $1", user_id)) == 0:
                return False
            await self._audit(c, audit)
            return True

        return await self._write(run)

    async def get_user(self, user_id: str) -> RemoteUser | None:
        row = await self._one("SELECT * FROM users WHERE id = $1", user_id)
        return rowmap.user(row) if row else None

    async def find_user_by_login(self, login: str) -> RemoteUser | None:
        row = await self._one(
            "SELECT * FROM users WHERE (id = $1 OR lower(email) = lower($1)) AND purged_at IS NULL"
            " ORDER BY ephemeral, created_at DESC LIMIT 1",
            login,
        )
        return rowmap.user(row) if row else None

    async def list_users(self, group_id: str | None = None) -> list[RemoteUser]:
        if group_id is None:
            rows = await self._all("SELECT * FROM users ORDER BY name, id")
        else:
            rows = await self._all("SELECT * FROM users WHERE group_id = $1 ORDER BY name, id", group_id)
        return [rowmap.user(r) for r in rows]

    async def purge_candidates(self, cutoff: datetime) -> list[RemoteUser]:
        rows = await self._all(
            "SELECT u.* FROM users u WHERE u.purged_at IS NULL"
            " AND EXISTS (SELECT 1 FROM access_requests r WHERE r.user_id = u.id)"
            " AND NOT EXISTS (SELECT 1 FROM access_requests r WHERE r.user_id = u.id AND"
            "   (CASE WHEN r.revoked_at IS NOT NULL AND r.revoked_at < r.end_at"
            "         THEN r.revoked_at ELSE r.end_at END) > $1)"
            " ORDER BY u.id",
            rowmap.ts(cutoff),
        )
        return [rowmap.user(r) for r in rows]

    async def purge_user(self, user_id: str, now: datetime, audit: AuditEntry) -> bool:
        # The old row versions keep the erased values until (auto)vacuum reclaims them,
        # as a WAL keeps them in SQLite until a checkpoint.
        async def run(c: Any) -> bool:
            status = await c.execute(
                "UPDATE users SET name = $1, email = NULL, phone = NULL, purged_at = $2"
                " WHERE id = $3 AND purged_at IS NULL",
                pseudonym(user_id),
                rowmap.ts(now),
                user_id,
            )
            if _count(status) == 0:
                return False
            await c.execute(
                "UPDATE audit_events SET personal = NULL WHERE personal IS NOT NULL AND (subject = $1"
                " OR request_id IN (SELECT id FROM access_requests WHERE user_id = $1))",
                user_id,
            )
            await self._audit(c, audit)
            return True

        return await self._write(run)

    async def has_open_requests(self, user_id: str, now: datetime) -> bool:
        row = await self._one(
            "SELECT 1 AS x FROM access_requests WHERE user_id = $1 AND status IN ('saved', 'forwarded')"
            " AND end_at > $2 LIMIT 1",
            user_id,
            rowmap.ts(now),
        )
        return row is not None

    # reasons -----------------------------------------------------------------
    async def create_reason(self, reason: Reason, audit: AuditEntry) -> None:
        async def run(c: Any) -> None:
            await c.execute(
                "INSERT INTO reasons (id, label, created_at) VALUES ($1,$2,$3)",
                reason.id,
                reason.label,
                rowmap.ts(reason.created_at),
            )
            await self._audit(c, audit)

        await self._write(run)

    async def delete_reason(self, reason_id: str, audit: AuditEntry) -> bool:
        async def run(c: Any) -> bool:
            if await c.fetchval("SELECT 1 FROM access_requests WHERE reason_id = $1 LIMIT 1", reason_id):
                raise Conflict("the reason is used by access requests and is kept for the record")
            if _count(await c.execute("DELETE FROM reasons WHERE id = $1", reason_id)) == 0:
                return False
            await self._audit(c, audit)
            return True

        return await self._write(run)

    async def get_reason(self, reason_id: str) -> Reason | None:
        row = await self._one("SELECT * FROM reasons WHERE id = $1", reason_id)
        return rowmap.reason(row) if row else None

    async def list_reasons(self) -> list[Reason]:
        return [rowmap.reason(r) for r in await self._all("SELECT * FROM reasons ORDER BY label")]

    # targets -----------------------------------------------------------------
    async def create_target(self, target: Target, audit: AuditEntry) -> None:
        async def run(c: Any) -> None:
            await c.execute(
                "INSERT INTO targets (id, name, protocol, url, host, port, ssh_host_key, tls_verify,"
                " created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                target.id,
                target.name,
                target.protocol.value,
                target.url,
                target.host,
                target.port,
                target.ssh_host_key,
                int(target.tls_verify),
                rowmap.ts(target.created_at),
            )
            await self._audit(c, audit)

        await self._write(run)

    async def update_target(self, target: Target, audit: AuditEntry) -> None:
        async def run(c: Any) -> None:
            await c.execute(
                "UPDATE targets SET name = $1, protocol = $2, url = $3, host = $4, port = $5,"
                " ssh_host_key = $6, tls_verify = $7 WHERE id = $8",
                target.name,
                target.protocol.value,
                target.url,
                target.host,
                target.port,
                target.ssh_host_key,
                int(target.tls_verify),
                target.id,
            )
            await self._audit(c, audit)

        await self._write(run)

    async def delete_target(self, target_id: str, audit: AuditEntry) -> bool:
        async def run(c: Any) -> bool:
            if _count(await c.execute("DELETE FROM targets WHERE id = $1", target_id)) == 0:
                return False
            await self._audit(c, audit)
            return True

        return await self._write(run)

    async def get_target(self, target_id: str) -> Target | None:
        row = await self._one("SELECT * FROM targets WHERE id = $1 OR name = $1", target_id)
        return rowmap.target(row) if row else None

    async def list_targets(self) -> list[Target]:
        return [rowmap.target(r) for r in await self._all("SELECT * FROM targets ORDER BY name")]

    # access requests ---------------------------------------------------------
    async def create_request(
        self, request: AccessRequest, new_user: RemoteUser | None, audit: AuditEntry
    ) -> None:
        async def run(c: Any) -> None:
            if new_user is not None:
                await self._insert_user(c, new_user)
            await c.execute(
                "INSERT INTO access_requests (id, group_id, user_id, justification, reason_id,"
                " governance_code, start_at, end_at, status, created_at, created_by)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11)",
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
            )
            await self._audit(c, audit)

        await self._write(run)

    async def get_request(self, request_id: str) -> AccessRequest | None:
        row = await self._one("SELECT * FROM access_requests WHERE id = $1", request_id)
        return rowmap.request(row) if row else None

    async def list_requests(self, flt: RequestFilter) -> Page[AccessRequest]:
        p = _Params()
        where: list[str] = []
        if flt.status is not None:
            where.append(f"status = {p(flt.status.value)}")
        if flt.user_id is not None:
            where.append(f"user_id = {p(flt.user_id)}")
        if flt.group_id is not None:
            where.append(f"group_id = {p(flt.group_id)}")
        if flt.cursor:
            parts = rowmap.decode_cursor(flt.cursor, 2)
            if parts is None:
                raise BadRequest("the cursor is not valid; start again without it")
            at, rid = p(parts[0]), p(parts[1])
            where.append(f"(created_at < {at} OR (created_at = {at} AND id < {rid}))")
        sql = "SELECT * FROM access_requests"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY created_at DESC, id DESC LIMIT {p(flt.limit + 1)}"
        rows = await self._all(sql, *p.values)
        items = [rowmap.request(r) for r in rows[: flt.limit]]
        nxt = None
        if len(rows) > flt.limit:
            last = rows[flt.limit - 1]
            nxt = rowmap.encode_cursor(last["created_at"], last["id"])
        return Page(items, nxt)

    async def find_request_by_link(self, link_hash: str) -> AccessRequest | None:
        row = await self._one("SELECT * FROM access_requests WHERE link_hash = $1", link_hash)
        return rowmap.request(row) if row else None

    async def mark_forwarded(
        self, request_id: str, link_hash: str, now: datetime, actor: str, audit: AuditEntry
    ) -> AccessRequest | None:
        async def run(c: Any) -> _Row | None:
            row: _Row | None = await c.fetchrow(
                "UPDATE access_requests SET status = 'forwarded', link_hash = $1, forwarded_at = $2,"
                " forwarded_by = $3 WHERE id = $4 AND status IN ('saved', 'forwarded') RETURNING *",
                link_hash,
                rowmap.ts(now),
                actor,
                request_id,
            )
            if row is None:
                return None
            # A new link replaces the old one: tokens sent for the old link die with it.
            await c.execute("DELETE FROM otps WHERE request_id = $1", request_id)
            await self._audit(c, audit)
            return row

        row = await self._write(run)
        return rowmap.request(row) if row else None

    async def revoke_request(
        self, request_id: str, now: datetime, actor: str, audit: AuditEntry
    ) -> AccessRequest | None:
        async def run(c: Any) -> _Row | None:
            row: _Row | None = await c.fetchrow(
                "UPDATE access_requests SET status = 'revoked', revoked_at = $1, revoked_by = $2"
                " WHERE id = $3 AND status IN ('saved', 'forwarded') RETURNING *",
                rowmap.ts(now),
                actor,
                request_id,
            )
            if row is None:
                return None
            await c.execute(
                "UPDATE sessions SET ended_at = $1, end_reason = 'revoked'"
                " WHERE request_id = $2 AND ended_at IS NULL",
                rowmap.ts(now),
                request_id,
            )
            await c.execute("DELETE FROM otps WHERE request_id = $1", request_id)
            await self._audit(c, audit)
            return row

        row = await self._write(run)
        return rowmap.request(row) if row else None

    async def expire_requests(self, now: datetime) -> list[str]:
        nows = rowmap.ts(now)

        async def run(c: Any) -> list[str]:
            rows = await c.fetch(
                "UPDATE access_requests SET status = 'expired'"
                " WHERE status IN ('saved', 'forwarded') AND end_at <= $1 RETURNING id",
                nows,
            )
            ids = sorted(str(r["id"]) for r in rows)
            if not ids:
                return []
            # Every session write before the first audit append (the lock order).
            await c.execute(
                "UPDATE sessions SET ended_at = $1, end_reason = 'expired'"
                " WHERE request_id = ANY($2::text[]) AND ended_at IS NULL",
                nows,
                ids,
            )
            for rid in ids:
                await self._audit(c, AuditEntry(actor="system", action="request.expired", subject=rid))
            return ids

        return await self._write(run)

    async def count_active_grants(self, now: datetime) -> int:
        nows = rowmap.ts(now)
        # ``requests_status (status, end_at)`` bounds the scan to forwarded windows not yet ended.
        count = await self._val(
            "SELECT COUNT(*) FROM access_requests"
            " WHERE status = 'forwarded' AND end_at > $1 AND start_at <= $1",
            nows,
        )
        return int(count)

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

        async def run(c: Any) -> OtpIssue:
            # Replicas asking for the same request's token queue here, so the count below
            # cannot be read by two of them before either has written.
            await c.execute("SELECT 1 FROM access_requests WHERE id = $1 FOR NO KEY UPDATE", request_id)
            row = await c.fetchrow(
                "SELECT COUNT(*) AS n, MIN(sent_at) AS first FROM otp_sends"
                " WHERE request_id = $1 AND sent_at > $2",
                request_id,
                hour_ago,
            )
            if row is not None and int(row["n"]) >= max_sends_per_hour:
                first = rowmap.dt_req(row["first"])
                wait = int((first + timedelta(hours=1) - now).total_seconds()) + 1
                return OtpIssue(False, max(1, wait))
            await c.execute(
                "INSERT INTO otp_sends (request_id, sent_at, otp_hash) VALUES ($1,$2,$3)",
                request_id,
                rowmap.ts(now),
                otp_hash,
            )
            await c.execute(
                "DELETE FROM otp_sends WHERE request_id = $1 AND sent_at <= $2", request_id, hour_ago
            )
            # A new send replaces the previous token and its try counter.
            await c.execute(
                "INSERT INTO otps (request_id, otp_hash, created_at, expires_at, tries, used_at)"
                " VALUES ($1,$2,$3,$4,0,NULL) ON CONFLICT (request_id) DO UPDATE SET"
                " otp_hash = excluded.otp_hash, created_at = excluded.created_at,"
                " expires_at = excluded.expires_at, tries = 0, used_at = NULL",
                request_id,
                otp_hash,
                rowmap.ts(now),
                rowmap.ts(expires_at),
            )
            return OtpIssue(True)

        return await self._write(run)

    async def cancel_otp_send(self, request_id: str, otp_hash: str) -> None:
        async def run(c: Any) -> None:
            await c.execute("SELECT 1 FROM access_requests WHERE id = $1 FOR NO KEY UPDATE", request_id)
            await c.execute("DELETE FROM otps WHERE request_id = $1 AND otp_hash = $2", request_id, otp_hash)
            await c.execute(
                "DELETE FROM otp_sends WHERE request_id = $1 AND otp_hash = $2", request_id, otp_hash
            )

        await self._write(run)

    async def redeem_otp(self, request_id: str, otp_hash: str, now: datetime, max_tries: int) -> OtpResult:
        """A token counts as spent at the moment the first statement below commits ``used_at``.

        Each statement commits on its own (no surrounding transaction). The match and the
        spend are one ``UPDATE ... WHERE used_at IS NULL AND tries < max AND expires_at > now
        RETURNING``: a concurrent statement on the same row waits for the row lock and then
        re-checks the condition, so of two correct redemptions on any replicas exactly one
        gets the row back. A wrong guess is counted by an equally conditional ``UPDATE ...
        SET tries = tries + 1 WHERE tries < max``, so however many guesses race over however
        many replicas, at most ``max_tries`` are ever counted.
        """
        nows = rowmap.ts(now)

        async def run(c: Any) -> OtpResult:
            if await c.fetchval(
                "UPDATE otps SET used_at = $1 WHERE request_id = $2 AND otp_hash = $3"
                " AND used_at IS NULL AND tries < $4 AND expires_at > $1 RETURNING 1",
                nows,
                request_id,
                otp_hash,
                max_tries,
            ):
                return OtpResult.OK
            if await c.fetchval(
                "UPDATE otps SET tries = tries + 1 WHERE request_id = $1"
                " AND used_at IS NULL AND tries < $2 AND expires_at > $3 RETURNING 1",
                request_id,
                max_tries,
                nows,
            ):
                return OtpResult.WRONG
            row = await c.fetchrow(
                "SELECT used_at, tries, expires_at FROM otps WHERE request_id = $1", request_id
            )
            if row is None:
                return OtpResult.NONE
            if row["used_at"] is not None or int(row["tries"]) >= max_tries:
                return OtpResult.EXHAUSTED
            if row["expires_at"] <= nows:
                return OtpResult.EXPIRED
            # A new token was sent between the statements: this guess was for the old one.
            return OtpResult.WRONG

        async with self._acquire("check the token") as c:
            try:
                return await run(c)
            except _DRIVER_ERRORS as exc:
                raise _translate(exc, "check the token") from exc

    # sessions ----------------------------------------------------------------
    async def create_session(
        self, session: Session, session_hash: str, max_sessions: int, audit: AuditEntry
    ) -> SessionCreate:
        async def run(c: Any) -> SessionCreate:
            # Logins on every replica queue on the request's row, so the count is exact.
            await c.execute(
                "SELECT 1 FROM access_requests WHERE id = $1 FOR NO KEY UPDATE", session.request_id
            )
            n = await c.fetchval(
                "SELECT COUNT(*) FROM sessions WHERE request_id = $1 AND ended_at IS NULL",
                session.request_id,
            )
            if int(n) >= max_sessions:
                return SessionCreate.TOO_MANY
            await c.execute(
                "INSERT INTO sessions (id, request_id, session_hash, address, created_at, last_seen)"
                " VALUES ($1,$2,$3,$4,$5,$6)",
                session.id,
                session.request_id,
                session_hash,
                session.address,
                rowmap.ts(session.created_at),
                rowmap.ts(session.last_seen),
            )
            await self._audit(c, audit)
            return SessionCreate.OK

        return await self._write(run)

    async def find_session(self, session_hash: str) -> Session | None:
        row = await self._one(
            "SELECT * FROM sessions WHERE session_hash = $1 AND ended_at IS NULL", session_hash
        )
        return rowmap.session(row) if row else None

    async def get_session(self, session_id: str) -> Session | None:
        row = await self._one("SELECT * FROM sessions WHERE id = $1", session_id)
        return rowmap.session(row) if row else None

    async def touch_sessions(self, seen: dict[str, datetime]) -> None:
        if not seen:
            return
        ids = sorted(seen)
        times = [rowmap.ts(seen[sid]) for sid in ids]

        async def run(c: Any) -> None:
            await c.execute(
                "UPDATE sessions AS s SET last_seen = v.t"
                " FROM unnest($1::text[], $2::text[]) AS v(id, t)"
                " WHERE s.id = v.id AND s.last_seen < v.t",
                ids,
                times,
            )

        await self._write(run)

    async def end_session(
        self, session_id: str, reason: str, now: datetime, audit: AuditEntry | None
    ) -> bool:
        async def run(c: Any) -> bool:
            status = await c.execute(
                "UPDATE sessions SET ended_at = $1, end_reason = $2 WHERE id = $3 AND ended_at IS NULL",
                rowmap.ts(now),
                reason,
                session_id,
            )
            if _count(status) == 0:
                return False
            if audit is not None:
                await self._audit(c, audit)
            return True

        return await self._write(run)

    async def list_sessions(self, request_id: str | None = None, live: bool = True) -> list[Session]:
        p = _Params()
        where = []
        if request_id is not None:
            where.append(f"request_id = {p(request_id)}")
        if live:
            where.append("ended_at IS NULL")
        sql = "SELECT * FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at"
        return [rowmap.session(r) for r in await self._all(sql, *p.values)]

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

        async def run(c: Any) -> bool:
            # Issuers for one session on every replica queue on its row: the count is exact.
            live = await c.fetchval(
                "SELECT 1 FROM sessions WHERE id = $1 AND ended_at IS NULL FOR NO KEY UPDATE", session_id
            )
            if live is None:
                return False
            await c.execute(
                "DELETE FROM session_secrets WHERE session_id = $1 AND kind = $2 AND expires_at <= $3",
                session_id,
                kind.value,
                nows,
            )
            n = await c.fetchval(
                "SELECT COUNT(*) FROM session_secrets WHERE session_id = $1 AND kind = $2",
                session_id,
                kind.value,
            )
            if int(n) >= max_per_session:
                return False
            await c.execute(
                "INSERT INTO session_secrets (secret_hash, kind, session_id, target_id, detail, created_at,"
                " expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7)",
                secret_hash,
                kind.value,
                session_id,
                target_id,
                detail,
                nows,
                rowmap.ts(expires_at),
            )
            return True

        return await self._write(run)

    async def find_session_secret(
        self, kind: SecretKind, secret_hash: str, now: datetime
    ) -> SessionSecret | None:
        row = await self._one(
            "SELECT k.*, s.session_hash FROM session_secrets k JOIN sessions s ON s.id = k.session_id"
            " WHERE k.secret_hash = $1 AND k.kind = $2 AND k.expires_at > $3 AND s.ended_at IS NULL",
            secret_hash,
            kind.value,
            rowmap.ts(now),
        )
        return rowmap.session_secret(row) if row else None

    async def take_session_secret(
        self, kind: SecretKind, secret_hash: str, now: datetime
    ) -> SessionSecret | None:
        # One statement: the row lock makes a concurrent DELETE on another replica wait and
        # then find nothing, so exactly one of them gets the row back.
        sql = (
            "WITH d AS (DELETE FROM session_secrets WHERE secret_hash = $1 AND kind = $2 AND expires_at > $3"
            " RETURNING *) SELECT d.*, s.session_hash FROM d JOIN sessions s ON s.id = d.session_id"
            " WHERE s.ended_at IS NULL"
        )

        async def run(c: Any) -> _Row | None:
            row: _Row | None = await c.fetchrow(sql, secret_hash, kind.value, rowmap.ts(now))
            return row

        row = await self._write(run)
        return rowmap.session_secret(row) if row else None

    async def drop_session_secrets(self, session_id: str, kind: SecretKind | None = None) -> int:
        async def run(c: Any) -> int:
            if kind is None:
                status = await c.execute("DELETE FROM session_secrets WHERE session_id = $1", session_id)
            else:
                status = await c.execute(
                    "DELETE FROM session_secrets WHERE session_id = $1 AND kind = $2", session_id, kind.value
                )
            return _count(status)

        return await self._write(run)

    # console sessions ------------------------------------------------------------
    async def create_console_session(self, record: ConsoleSessionRecord, max_sessions: int) -> None:
        nows = rowmap.ts(record.created_at)

        async def run(c: Any) -> None:
            await c.execute("DELETE FROM console_sessions WHERE idle_until <= $1 OR expires_at <= $1", nows)
            n = int(await c.fetchval("SELECT COUNT(*) FROM console_sessions"))
            if n - max_sessions + 1 > 0:
                await c.execute(
                    "DELETE FROM console_sessions WHERE sid_hash IN"
                    " (SELECT sid_hash FROM console_sessions ORDER BY last_seen, sid_hash LIMIT $1)",
                    n - max_sessions + 1,
                )
            await c.execute(
                "INSERT INTO console_sessions (sid_hash, token_hash, token_name, role, created_at, last_seen,"
                " idle_until, expires_at, state) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                record.sid_hash,
                record.token_hash,
                record.token_name,
                record.role.value,
                nows,
                rowmap.ts(record.last_seen),
                rowmap.ts(record.idle_until),
                rowmap.ts(record.expires_at),
                json.dumps(record.state, sort_keys=True),
            )

        await self._write(run)

    async def find_console_session(self, sid_hash: str, now: datetime) -> ConsoleSessionRecord | None:
        row = await self._one(
            "SELECT * FROM console_sessions WHERE sid_hash = $1 AND idle_until > $2 AND expires_at > $2",
            sid_hash,
            rowmap.ts(now),
        )
        return rowmap.console_session(row) if row else None

    async def save_console_session(
        self, sid_hash: str, last_seen: datetime, idle_until: datetime, state: dict[str, Any]
    ) -> bool:
        async def run(c: Any) -> bool:
            status = await c.execute(
                "UPDATE console_sessions SET last_seen = $1, idle_until = $2, state = $3 WHERE sid_hash = $4",
                rowmap.ts(last_seen),
                rowmap.ts(idle_until),
                json.dumps(state, sort_keys=True),
                sid_hash,
            )
            return _count(status) > 0

        return await self._write(run)

    async def end_console_session(self, sid_hash: str) -> bool:
        async def run(c: Any) -> bool:
            return _count(await c.execute("DELETE FROM console_sessions WHERE sid_hash = $1", sid_hash)) > 0

        return await self._write(run)

    async def end_console_sessions_for_token(self, token_hash: str) -> int:
        async def run(c: Any) -> int:
            return _count(await c.execute("DELETE FROM console_sessions WHERE token_hash = $1", token_hash))

        return await self._write(run)

    # live connections ------------------------------------------------------------
    async def upsert_connections(self, records: Sequence[ConnectionRecord]) -> None:
        latest = [r for _, r in sorted({r.id: r for r in records}.items())]
        if not latest:
            return
        # One statement for the batch: one array per column, unnested into rows. Ids are
        # unique (deduplicated above), which ON CONFLICT DO UPDATE requires.
        columns = (
            [r.id for r in latest],
            [r.session_id for r in latest],
            [r.request_id for r in latest],
            [r.user_id for r in latest],
            [r.protocol for r in latest],
            [r.target for r in latest],
            [r.origin for r in latest],
            [rowmap.ts(r.since) for r in latest],
            [r.bytes_in for r in latest],
            [r.bytes_out for r in latest],
            [r.replica for r in latest],
            [rowmap.ts(r.updated_at) for r in latest],
        )

        async def run(c: Any) -> None:
            await c.execute(
                "INSERT INTO live_connections (id, session_id, request_id, user_id, protocol, target,"
                " origin, since, bytes_in, bytes_out, replica, updated_at)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
                " $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::text[],"
                " $12::text[])"
                " ON CONFLICT (id) DO UPDATE SET bytes_in = excluded.bytes_in,"
                " bytes_out = excluded.bytes_out, replica = excluded.replica,"
                " updated_at = excluded.updated_at",
                *columns,
            )

        await self._write(run)

    async def delete_connections(self, ids: Collection[str]) -> int:
        if not ids:
            return 0
        wanted = sorted(set(ids))

        async def run(c: Any) -> int:
            return _count(await c.execute("DELETE FROM live_connections WHERE id = ANY($1::text[])", wanted))

        return await self._write(run)

    async def delete_replica_connections(self, replica: str) -> int:
        async def run(c: Any) -> int:
            return _count(await c.execute("DELETE FROM live_connections WHERE replica = $1", replica))

        return await self._write(run)

    async def get_connection(self, connection_id: str) -> ConnectionRecord | None:
        row = await self._one("SELECT * FROM live_connections WHERE id = $1", connection_id)
        return rowmap.connection(row) if row else None

    async def list_connections(
        self,
        fresh_after: datetime,
        *,
        session_id: str | None = None,
        request_id: str | None = None,
    ) -> list[ConnectionRecord]:
        p = _Params()
        where = [f"updated_at > {p(rowmap.ts(fresh_after))}"]
        if session_id is not None:
            where.append(f"session_id = {p(session_id)}")
        if request_id is not None:
            where.append(f"request_id = {p(request_id)}")
        sql = "SELECT * FROM live_connections"
        sql += " WHERE " + " AND ".join(where) + " ORDER BY since, id"
        return [rowmap.connection(r) for r in await self._all(sql, *p.values)]

    async def purge_stale_connections(self, fresh_after: datetime) -> int:
        stale = rowmap.ts(fresh_after)

        async def run(c: Any) -> int:
            return _count(await c.execute("DELETE FROM live_connections WHERE updated_at <= $1", stale))

        return await self._write(run)

    async def purge_expired(self, now: datetime) -> int:
        nows = rowmap.ts(now)

        async def run(c: Any) -> int:
            gone = _count(
                await c.execute(
                    "DELETE FROM session_secrets k WHERE k.expires_at <= $1 OR EXISTS"
                    " (SELECT 1 FROM sessions s"
                    " WHERE s.id = k.session_id AND s.ended_at IS NOT NULL)",
                    nows,
                )
            )
            return gone + _count(
                await c.execute(
                    "DELETE FROM console_sessions WHERE idle_until <= $1 OR expires_at <= $1", nows
                )
            )

        return await self._write(run)

    # audit -------------------------------------------------------------------
    async def append_audit(self, entry: AuditEntry) -> None:
        async def run(c: Any) -> None:
            await self._audit(c, entry)

        await self._write(run)

    async def list_audit(self, flt: AuditFilter) -> Page[AuditEvent]:
        p = _Params()
        where: list[str] = []
        if flt.since is not None:
            where.append(f"at >= {p(rowmap.ts(flt.since))}")
        if flt.type is not None:
            where.append(f"action = {p(flt.type)}")
        if flt.request_id is not None:
            where.append(f"request_id = {p(flt.request_id)}")
        if flt.subject is not None:
            where.append(f"subject = {p(flt.subject)}")
        if flt.cursor:
            parts = rowmap.decode_cursor(flt.cursor, 1)
            if parts is None or not parts[0].isdigit() or not parts[0].isascii() or len(parts[0]) > 18:
                raise BadRequest("the cursor is not valid; start again without it")
            where.append(f"seq > {p(int(parts[0]))}")
        sql = "SELECT * FROM audit_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq LIMIT {p(flt.limit + 1)}"
        rows = await self._all(sql, *p.values)
        items = [rowmap.event(r) for r in rows[: flt.limit]]
        nxt = rowmap.encode_cursor(str(rows[flt.limit - 1]["seq"])) if len(rows) > flt.limit else None
        return Page(items, nxt)

    async def all_audit(self) -> Sequence[AuditEvent]:
        return [rowmap.event(r) for r in await self._all("SELECT * FROM audit_events ORDER BY seq")]

    async def audit_head(self) -> tuple[int, str] | None:
        row = await self._one("SELECT seq, hash FROM audit_head WHERE id = 1")
        return (int(row["seq"]), str(row["hash"])) if row else None


def _describe(exc: BaseException) -> str:
    """A short cause for start-up messages, without the URL (it may hold a password)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "message", "") or type(exc).__name__)
    return type(exc).__name__


# rows -> model ---------------------------------------------------------------
