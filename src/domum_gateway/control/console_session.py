"""Admin console sign-in sessions: server-side, in memory, keyed by the hash of the cookie.

An administrator or auditor signs in with an API token once; the console then hands out a
random session id in the ``__Host-domum-admin`` cookie. The token itself is never put in
the cookie or a page: the session keeps only the token's SHA-256 digest, so every request
can check that the token is still active (revoking the token ends its console sessions).

Sessions live in this process's memory. That is enough for one gateway process; several
replicas behind one address would need sticky routing or a shared table (a later change).
A session ends after ``IDLE`` without a request or ``ABSOLUTE`` after sign-in, whichever
comes first. Each session carries a synchronizer CSRF token that every form must echo.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ..auth.secrets import hash_secret, new_session_id
from ..clock import Clock
from ..model import Role

__all__ = [
    "ABSOLUTE",
    "COOKIE",
    "IDLE",
    "LOGIN_COOKIE",
    "ConsoleSession",
    "ConsoleSessions",
    "Notice",
    "same_secret",
]

COOKIE = "__Host-domum-admin"
"""The session cookie: ``__Host-`` makes browsers insist on Secure, Path=/ and no Domain."""

LOGIN_COOKIE = "__Host-domum-admin-login"
"""Short-lived double-submit cookie that protects the sign-in form itself from CSRF."""

IDLE = timedelta(minutes=30)
ABSOLUTE = timedelta(hours=12)
MAX_SESSIONS = 1000
"""Beyond this many live sessions the oldest is dropped (memory stays bounded)."""
MAX_DRAFTS = 50


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

    def remember_draft(self, draft: str, request_id: str) -> None:
        """Note that a wizard draft was saved, so a second Save does not make a twin."""
        self.saved_drafts[draft] = request_id
        while len(self.saved_drafts) > MAX_DRAFTS:
            del self.saved_drafts[next(iter(self.saved_drafts))]

    def flash(self, text: str, kind: str = "ok") -> None:
        self.notices.append(Notice(kind, text))

    def take_notices(self) -> list[Notice]:
        out, self.notices = self.notices, []
        return out


class ConsoleSessions:
    """The live console sessions of this process."""

    def __init__(self, clock: Clock, idle: timedelta = IDLE, absolute: timedelta = ABSOLUTE) -> None:
        self._clock = clock
        self._idle = idle
        self._absolute = absolute
        self._by_hash: dict[str, ConsoleSession] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def create(self, token_hash: str, token_name: str, role: Role) -> tuple[str, ConsoleSession]:
        """Start a session; return the cookie value (shown once) and the session."""
        now = self._clock.now()
        self._sweep(now)
        while len(self._by_hash) >= MAX_SESSIONS:
            oldest = min(self._by_hash, key=lambda k: self._by_hash[k].last_seen)
            del self._by_hash[oldest]
        sid = new_session_id()
        session = ConsoleSession(
            token_hash=token_hash,
            token_name=token_name,
            role=role,
            csrf=secrets.token_urlsafe(32),
            created_at=now,
            last_seen=now,
        )
        self._by_hash[hash_secret(sid)] = session
        return sid, session

    def find(self, sid: str | None) -> ConsoleSession | None:
        """The live session for a cookie value, touched; None if unknown or expired."""
        if not sid or len(sid) > 200:
            return None
        key = hash_secret(sid)
        session = self._by_hash.get(key)
        if session is None:
            return None
        now = self._clock.now()
        if self._expired(session, now):
            del self._by_hash[key]
            return None
        session.last_seen = now
        return session

    def end(self, sid: str | None) -> None:
        if sid:
            self._by_hash.pop(hash_secret(sid), None)

    def end_for_token(self, token_hash: str) -> None:
        for key in [k for k, s in self._by_hash.items() if s.token_hash == token_hash]:
            del self._by_hash[key]

    def _expired(self, session: ConsoleSession, now: datetime) -> bool:
        return now - session.last_seen >= self._idle or now - session.created_at >= self._absolute

    def _sweep(self, now: datetime) -> None:
        for key in [k for k, s in self._by_hash.items() if self._expired(s, now)]:
            del self._by_hash[key]
