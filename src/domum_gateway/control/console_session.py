"""Admin console sign-in sessions: server-side, in the store, keyed by the hash of the cookie.

An administrator or auditor signs in with an API token once; the console then hands out a
random session id in the ``__Host-domum-admin`` cookie. The token itself is never put in
the cookie or a page: the session keeps only the token's SHA-256 digest, so every request
can check that the token is still active (revoking the token ends its console sessions).

Sessions live in the store (``console_sessions``), so behind a load balancer without
stickiness every replica serves every request of a console session. The row is keyed by
the cookie value's SHA-256 hash; the synchronizer CSRF token that every form must echo is
derived from the cookie value (so it is the same on every replica and never stored); the
one-shot notices and the saved-draft markers are the row's ``state``, written back after
a request that changed them (:meth:`ConsoleSessions.save`). A session ends after ``IDLE``
without a request or ``ABSOLUTE`` after sign-in, whichever comes first; both limits are
part of the lookup query, activity is written at most every ``TOUCH_EVERY``, and expired
rows are deleted by the scheduler. A store that cannot answer means an error page (the
request is refused), never a session taken on trust.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..auth.secrets import hash_secret, new_session_id
from ..clock import Clock
from ..model import Role
from ..store.base import ConsoleSessionRecord, Store

__all__ = [
    "ABSOLUTE",
    "COOKIE",
    "IDLE",
    "LOGIN_COOKIE",
    "TOUCH_EVERY",
    "ConsoleSession",
    "ConsoleSessions",
    "Notice",
    "csrf_for",
    "same_secret",
]

COOKIE = "__Host-domum-admin"
"""The session cookie: ``__Host-`` makes browsers insist on Secure, Path=/ and no Domain."""

LOGIN_COOKIE = "__Host-domum-admin-login"
"""Short-lived double-submit cookie that protects the sign-in form itself from CSRF."""

IDLE = timedelta(minutes=30)
ABSOLUTE = timedelta(hours=12)
MAX_SESSIONS = 1000
"""Beyond this many live sessions the least recently used is dropped (the table stays bounded)."""
MAX_DRAFTS = 50
MAX_NOTICES = 20
TOUCH_EVERY = timedelta(seconds=30)
"""Activity is written back at most this often per session (idle expiry is that coarse)."""


def csrf_for(sid: str) -> str:
    """The session's CSRF token: derived from the cookie value, so any replica knows it and
    the store, which holds only ``hash_secret(sid)``, holds neither."""
    return hash_secret("domum-console-csrf\x00" + sid)


def same_secret(presented: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented secret with the expected one."""
    if not presented:
        return False
    return hmac.compare_digest(
        presented.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


@dataclass(frozen=True, slots=True)
class Notice:
    """A one-shot message shown on the next page (after a redirect)."""

    kind: str  # "ok" or "error"
    text: str


@dataclass(slots=True)
class ConsoleSession:
    token_hash: str
    token_name: str
    role: Role
    csrf: str
    created_at: datetime
    last_seen: datetime
    notices: list[Notice] = field(default_factory=list)
    saved_drafts: dict[str, str] = field(default_factory=dict)  # wizard draft -> request id
    sid_hash: str = ""
    dirty: bool = False  # notices or drafts changed since loaded: ``ConsoleSessions.save``

    def remember_draft(self, draft: str, request_id: str) -> None:
        """Note that a wizard draft was saved, so a second Save does not make a twin."""
        self.saved_drafts[draft] = request_id
        while len(self.saved_drafts) > MAX_DRAFTS:
            del self.saved_drafts[next(iter(self.saved_drafts))]
        self.dirty = True

    def flash(self, text: str, kind: str = "ok") -> None:
        self.notices.append(Notice(kind, text))
        del self.notices[:-MAX_NOTICES]
        self.dirty = True

    def take_notices(self) -> list[Notice]:
        out, self.notices = self.notices, []
        if out:
            self.dirty = True
        return out

    def state(self) -> dict[str, Any]:
        return {
            "notices": [[n.kind, n.text] for n in self.notices],
            "drafts": [[draft, rid] for draft, rid in self.saved_drafts.items()],
        }


class ConsoleSessions:
    """The console sessions every replica shares, in the store."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        idle: timedelta = IDLE,
        absolute: timedelta = ABSOLUTE,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self._store = store
        self._clock = clock
        self._idle = idle
        self._absolute = absolute
        self.max_sessions = max_sessions

    async def create(self, token_hash: str, token_name: str, role: Role) -> tuple[str, ConsoleSession]:
        """Start a session; return the cookie value (shown once) and the session."""
        now = self._clock.now()
        sid = new_session_id()
        record = ConsoleSessionRecord(
            sid_hash=hash_secret(sid),
            token_hash=token_hash,
            token_name=token_name,
            role=role,
            created_at=now,
            last_seen=now,
            idle_until=now + self._idle,
            expires_at=now + self._absolute,
            state={},
        )
        await self._store.create_console_session(record, self.max_sessions)
        return sid, _session(sid, record)

    async def find(self, sid: str | None) -> ConsoleSession | None:
        """The live session for a cookie value, touched; None if unknown or expired.

        Raises:
            StoreError: the store could not answer (the caller refuses the request).
        """
        if not sid or len(sid) > 200:
            return None
        now = self._clock.now()
        record = await self._store.find_console_session(hash_secret(sid), now)
        if record is None:
            return None
        session = _session(sid, record)
        if now - record.last_seen >= TOUCH_EVERY:
            session.last_seen = now
            await self._store.save_console_session(record.sid_hash, now, now + self._idle, record.state)
        return session

    async def save(self, session: ConsoleSession) -> None:
        """Write back notices and drafts changed during a request (no-op when unchanged)."""
        if not session.dirty:
            return
        last = session.last_seen
        await self._store.save_console_session(session.sid_hash, last, last + self._idle, session.state())
        session.dirty = False

    async def end(self, sid: str | None) -> None:
        if sid and len(sid) <= 200:
            await self._store.end_console_session(hash_secret(sid))

    async def end_for_token(self, token_hash: str) -> None:
        await self._store.end_console_sessions_for_token(token_hash)


def _session(sid: str, record: ConsoleSessionRecord) -> ConsoleSession:
    state = record.state
    notices = [
        Notice(str(n[0]), str(n[1])) for n in state.get("notices", []) if isinstance(n, list) and len(n) == 2
    ]
    drafts = {str(d[0]): str(d[1]) for d in state.get("drafts", []) if isinstance(d, list) and len(d) == 2}
    return ConsoleSession(
        token_hash=record.token_hash,
        token_name=record.token_name,
        role=record.role,
        csrf=csrf_for(sid),
        created_at=record.created_at,
        last_seen=record.last_seen,
        notices=notices,
        saved_drafts=drafts,
        sid_hash=record.sid_hash,
    )
