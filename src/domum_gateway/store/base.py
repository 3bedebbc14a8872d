"""The one storage interface every implementation (SQLite, PostgreSQL) provides.

Callers depend only on :class:`Store`. Each method that changes state takes the audit
entry describing the change and writes both in one transaction, so an event exists
exactly when its change does. Implementations translate their driver's exceptions into
:class:`~domum_gateway.errors.StoreError` at this boundary (fail closed).
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from ..audit import AuditEntry
from ..model import (
    AccessRequest,
    ApiToken,
    AuditEvent,
    Group,
    Reason,
    RemoteUser,
    RequestStatus,
    Role,
    Session,
    Target,
)

T = TypeVar("T")

__all__ = [
    "CONNECTION_STALE_AFTER",
    "AuditFilter",
    "ConnectionRecord",
    "ConsoleSessionRecord",
    "OtpIssue",
    "OtpResult",
    "Page",
    "RequestFilter",
    "SecretKind",
    "SessionCreate",
    "SessionSecret",
    "Store",
    "T",
    "pseudonym",
]


def pseudonym(user_id: str) -> str:
    """What a purged user is called from then on (stable, says nothing about the person)."""
    return f"purged user {user_id}"


@dataclass(frozen=True, slots=True)
class RequestFilter:
    status: RequestStatus | None = None
    user_id: str | None = None
    group_id: str | None = None
    limit: int = 50
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class AuditFilter:
    since: datetime | None = None
    type: str | None = None
    request_id: str | None = None
    subject: str | None = None
    limit: int = 100
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None


class OtpResult(enum.StrEnum):
    """Outcome of redeeming a one-time token."""

    OK = "ok"
    WRONG = "wrong"  # did not match; a try was counted
    EXPIRED = "expired"
    EXHAUSTED = "exhausted"  # too many wrong tries, or already used
    NONE = "none"  # no token was ever sent for this link


@dataclass(frozen=True, slots=True)
class OtpIssue:
    """Outcome of asking for a token: ``retry_after`` is set when the send limit is hit."""

    issued: bool
    retry_after: int = 0


class SessionCreate(enum.StrEnum):
    OK = "ok"
    TOO_MANY = "too_many"
    TOKEN_SPENT = "token_spent"


class SecretKind(enum.StrEnum):
    """Bearer secrets bound to a remote user's session, kept so every replica can check them."""

    TICKET = "ticket"  # the ``connect`` client's tunnel ticket (reusable until it expires)
    HOST_CODE = "host_code"  # host-mode hand-over code (one use)
    HOST_COOKIE = "host_cookie"  # host-mode cookie for one target's own host


@dataclass(frozen=True, slots=True)
class SessionSecret:
    """What a stored session secret opens (the secret itself is never stored)."""

    kind: SecretKind
    session_id: str
    session_hash: str  # the session's cookie hash: how ``SessionManager`` finds it
    target_id: str | None
    detail: str | None  # host codes: the path to continue to
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class ConsoleSessionRecord:
    """An admin console sign-in as stored (keyed by the hash of its cookie value)."""

    sid_hash: str
    token_hash: str
    token_name: str
    role: Role
    created_at: datetime
    last_seen: datetime
    idle_until: datetime  # last_seen + idle timeout
    expires_at: datetime  # created_at + absolute lifetime
    state: dict[str, Any]  # notices and saved wizard drafts (JSON)


CONNECTION_STALE_AFTER = timedelta(seconds=90)
"""A ``live_connections`` row not refreshed for this long belongs to a replica that died.

Each replica refreshes its rows at least every 30 s (``SessionManager``), so a quiet but
live connection never crosses this bound; listing ignores older rows and the scheduler's
sweep deletes them.
"""


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """One live connection as the shared registry stores it (no secrets, nothing typed)."""

    id: str  # con_...
    session_id: str
    request_id: str
    user_id: str
    protocol: str
    target: str | None
    origin: str
    since: datetime
    bytes_in: int
    bytes_out: int
    replica: str  # the gateway process that holds the connection
    updated_at: datetime  # the holder's last write (heartbeat)


class Store(abc.ABC):
    """Persistence for the gateway. All datetimes in and out are aware UTC."""

    kind: str = "abstract"

    # lifecycle ---------------------------------------------------------------
    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreError when the database cannot answer."""

    @abc.abstractmethod
    async def schema_version(self) -> int: ...

    # API tokens --------------------------------------------------------------
    @abc.abstractmethod
    async def create_api_token(
        self, name: str, role: Role, token_hash: str, now: datetime, audit: AuditEntry
    ) -> ApiToken: ...

    @abc.abstractmethod
    async def find_api_token(self, token_hash: str) -> ApiToken | None:
        """The active (not revoked) token with this hash."""

    @abc.abstractmethod
    async def list_api_tokens(self) -> list[ApiToken]: ...

    @abc.abstractmethod
    async def revoke_api_token(self, name: str, now: datetime, audit: AuditEntry) -> bool: ...

    # groups, users, reasons, targets ------------------------------------------
    @abc.abstractmethod
    async def create_group(self, group: Group, audit: AuditEntry) -> None: ...

    @abc.abstractmethod
    async def update_group(self, group: Group, audit: AuditEntry) -> None: ...

    @abc.abstractmethod
    async def delete_group(self, group_id: str, audit: AuditEntry) -> bool: ...

    @abc.abstractmethod
    async def get_group(self, group_id: str) -> Group | None: ...

    @abc.abstractmethod
    async def list_groups(self) -> list[Group]: ...

    @abc.abstractmethod
    async def create_user(self, user: RemoteUser, audit: AuditEntry) -> None: ...

    @abc.abstractmethod
    async def update_user(self, user: RemoteUser, audit: AuditEntry) -> None: ...

    @abc.abstractmethod
    async def delete_user(self, user_id: str, audit: AuditEntry) -> bool: ...

    @abc.abstractmethod
    async def get_user(self, user_id: str) -> RemoteUser | None: ...

    @abc.abstractmethod
    async def find_user_by_login(self, login: str) -> RemoteUser | None:
        """A user by id or by e-mail address (case-insensitive)."""

    @abc.abstractmethod
    async def list_users(self, group_id: str | None = None) -> list[RemoteUser]: ...

    @abc.abstractmethod
    async def purge_candidates(self, cutoff: datetime) -> list[RemoteUser]:
        """Users not yet purged whose every request ended (or was revoked) at or before ``cutoff``."""

    @abc.abstractmethod
    async def purge_user(self, user_id: str, now: datetime, audit: AuditEntry) -> bool:
        """Erase a user's personal data in one transaction.

        Name becomes a pseudonym, e-mail and phone are cleared, ``purged_at`` is set, and the
        personal blobs of the audit events about the user (subject = user id, or events of the
        user's requests) are dropped. Event hashes cover only commitments, so the chain still
        verifies. Returns False when the user does not exist or is already purged.
        """

    @abc.abstractmethod
    async def has_open_requests(self, user_id: str, now: datetime) -> bool:
        """Whether the user has a saved or forwarded request whose window has not ended."""

    @abc.abstractmethod
    async def create_reason(self, reason: Reason, audit: AuditEntry) -> None: ...

    @abc.abstractmethod
    async def delete_reason(self, reason_id: str, audit: AuditEntry) -> bool: ...

    @abc.abstractmethod
    async def get_reason(self, reason_id: str) -> Reason | None: ...

    @abc.abstractmethod
    async def list_reasons(self) -> list[Reason]: ...

    @abc.abstractmethod
    async def create_target(self, target: Target, audit: AuditEntry) -> None: ...

    @abc.abstractmethod
    async def update_target(self, target: Target, audit: AuditEntry) -> None: ...

    @abc.abstractmethod
    async def delete_target(self, target_id: str, audit: AuditEntry) -> bool: ...

    @abc.abstractmethod
    async def get_target(self, target_id: str) -> Target | None:
        """A target by id or by name."""

    @abc.abstractmethod
    async def list_targets(self) -> list[Target]: ...

    # access requests ---------------------------------------------------------
    @abc.abstractmethod
    async def create_request(
        self, request: AccessRequest, new_user: RemoteUser | None, audit: AuditEntry
    ) -> None:
        """Save a request (and its inline third-party user) atomically."""

    @abc.abstractmethod
    async def get_request(self, request_id: str) -> AccessRequest | None: ...

    @abc.abstractmethod
    async def list_requests(self, flt: RequestFilter) -> Page[AccessRequest]: ...

    @abc.abstractmethod
    async def find_request_by_link(self, link_hash: str) -> AccessRequest | None: ...

    @abc.abstractmethod
    async def mark_forwarded(
        self, request_id: str, link_hash: str, now: datetime, actor: str, audit: AuditEntry
    ) -> AccessRequest | None:
        """Set the link and status ``forwarded`` if the request is still saved/forwarded."""

    @abc.abstractmethod
    async def revoke_request(
        self, request_id: str, now: datetime, actor: str, audit: AuditEntry
    ) -> AccessRequest | None:
        """Revoke and end every session of the request in one transaction."""

    @abc.abstractmethod
    async def expire_requests(self, now: datetime) -> list[str]:
        """Mark requests whose window ended as expired; return their ids."""

    @abc.abstractmethod
    async def count_active_grants(self, now: datetime) -> int:
        """How many forwarded requests have their window open at ``now`` (``start <= now < end``).

        Saved, revoked and expired requests never count; neither does a forwarded one whose
        window has not started, or has ended but is not yet marked expired.
        """

    # one-time tokens ---------------------------------------------------------
    @abc.abstractmethod
    async def issue_otp(
        self,
        request_id: str,
        otp_hash: str,
        now: datetime,
        expires_at: datetime,
        max_sends_per_hour: int,
    ) -> OtpIssue:
        """Replace the request's token, unless the hourly send limit is reached."""

    @abc.abstractmethod
    async def redeem_otp(self, request_id: str, otp_hash: str, now: datetime, max_tries: int) -> OtpResult:
        """Spend the token atomically (see the implementation for when it counts as spent)."""

    @abc.abstractmethod
    async def cancel_otp_send(self, request_id: str, otp_hash: str) -> None:
        """Undo a send that the provider refused (token unusable, send not counted)."""

    # sessions ----------------------------------------------------------------
    @abc.abstractmethod
    async def create_session(
        self, session: Session, session_hash: str, max_sessions: int, audit: AuditEntry
    ) -> SessionCreate: ...

    @abc.abstractmethod
    async def find_session(self, session_hash: str) -> Session | None:
        """The live session with this cookie hash."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> Session | None: ...

    @abc.abstractmethod
    async def touch_sessions(self, seen: dict[str, datetime]) -> None:
        """Record last activity for many sessions at once (batched off the hot path)."""

    @abc.abstractmethod
    async def end_session(
        self, session_id: str, reason: str, now: datetime, audit: AuditEntry | None
    ) -> bool: ...

    @abc.abstractmethod
    async def list_sessions(self, request_id: str | None = None, live: bool = True) -> list[Session]: ...

    # session secrets (tunnel tickets, host-mode codes and cookies) -------------
    @abc.abstractmethod
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
        """Store a secret bound to a live session (expired ones of that session go first).

        False, storing nothing, when the session has ended or already holds
        ``max_per_session`` unexpired secrets of this kind (a flood).
        """

    @abc.abstractmethod
    async def find_session_secret(
        self, kind: SecretKind, secret_hash: str, now: datetime
    ) -> SessionSecret | None:
        """The unexpired secret of this kind with this hash, if its session is still live."""

    @abc.abstractmethod
    async def take_session_secret(
        self, kind: SecretKind, secret_hash: str, now: datetime
    ) -> SessionSecret | None:
        """Delete and return a one-time secret in one statement: of concurrent takes on any
        replica exactly one gets it. None when unknown, expired or its session has ended."""

    @abc.abstractmethod
    async def drop_session_secrets(self, session_id: str, kind: SecretKind | None = None) -> int:
        """Delete a session's secrets (of one kind, or all); returns how many."""

    # admin console sessions ----------------------------------------------------
    @abc.abstractmethod
    async def create_console_session(self, record: ConsoleSessionRecord, max_sessions: int) -> None:
        """Store a new console session; beyond ``max_sessions`` live ones the least recently
        used are dropped (expired ones first)."""

    @abc.abstractmethod
    async def find_console_session(self, sid_hash: str, now: datetime) -> ConsoleSessionRecord | None:
        """The console session with this cookie hash unless idle or past its lifetime."""

    @abc.abstractmethod
    async def save_console_session(
        self, sid_hash: str, last_seen: datetime, idle_until: datetime, state: dict[str, Any]
    ) -> bool:
        """Record activity and state; False when the session is gone."""

    @abc.abstractmethod
    async def end_console_session(self, sid_hash: str) -> bool: ...

    @abc.abstractmethod
    async def end_console_sessions_for_token(self, token_hash: str) -> int: ...

    # live connections (the registry every replica shares) ---------------------------
    @abc.abstractmethod
    async def upsert_connections(self, records: Sequence[ConnectionRecord]) -> None:
        """Insert or refresh many connections in one transaction (byte counts, ``replica``,
        ``updated_at``; the rest is fixed when a connection opens). The last record of an id
        given twice wins."""

    @abc.abstractmethod
    async def delete_connections(self, ids: Collection[str]) -> int:
        """Delete the rows of these connection ids (unknown ids are ignored); how many went."""

    @abc.abstractmethod
    async def delete_replica_connections(self, replica: str) -> int:
        """Delete every row ``replica`` wrote (it is shutting down); how many went."""

    @abc.abstractmethod
    async def get_connection(self, connection_id: str) -> ConnectionRecord | None:
        """The row of one connection, however old its ``updated_at``."""

    @abc.abstractmethod
    async def list_connections(
        self,
        fresh_after: datetime,
        *,
        session_id: str | None = None,
        request_id: str | None = None,
    ) -> list[ConnectionRecord]:
        """Connections of every replica refreshed after ``fresh_after``, oldest first."""

    @abc.abstractmethod
    async def purge_stale_connections(self, fresh_after: datetime) -> int:
        """Delete the rows not refreshed after ``fresh_after`` (their replica died); how many went."""

    # housekeeping ------------------------------------------------------------------
    @abc.abstractmethod
    async def purge_expired(self, now: datetime) -> int:
        """Delete expired session secrets, secrets of ended sessions and expired console
        sessions; returns how many rows went."""

    # audit -------------------------------------------------------------------
    @abc.abstractmethod
    async def append_audit(self, entry: AuditEntry) -> None: ...

    @abc.abstractmethod
    async def list_audit(self, flt: AuditFilter) -> Page[AuditEvent]: ...

    @abc.abstractmethod
    async def all_audit(self) -> Sequence[AuditEvent]:
        """Every event in seq order (for verification)."""

    @abc.abstractmethod
    async def audit_head(self) -> tuple[int, str] | None: ...
