"""Tunnel tickets: the short-lived bearer credential the ``connect`` client holds.

A ticket is minted after a normal login (link + one-time token through
:class:`~domum_gateway.proxy.login.LoginService`) and maps to the session that login
created; it is never a session of its own. It authorises opening tunnels (one websocket
per local connection, so it is reused) until it expires or its session ends, whichever
comes first; the client renews it before it expires. Ending the session (logout,
revoke, window end, idle, terminate) makes every ticket of it worthless at once.

Tickets live in this process's memory, stored only as SHA-256 hashes, like every other
secret of the gateway. That is enough for one gateway process; several replicas behind
one address would need them in the shared store (a restart also forgets them: the
client then has to log in again).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..auth.secrets import hash_secret
from ..clock import Clock
from .sessions import LiveSession, SessionManager

__all__ = ["TICKET_PREFIX", "TICKET_TTL", "TicketStore", "TooManyTickets"]

TICKET_PREFIX = "dgt_"
"""Marks tunnel tickets so people and secret scanners recognise them."""

TICKET_TTL = timedelta(minutes=10)

_MAX_TICKET_CHARS = 128


class TooManyTickets(Exception):
    """The in-memory ticket table is full (a flood of logins); refuse new ones."""


@dataclass(slots=True)
class _Ticket:
    session_id: str
    expires_at: datetime


class TicketStore:
    """Hashed tickets -> session ids, with expiry; memory only (see module docstring)."""

    def __init__(
        self,
        sessions: SessionManager,
        clock: Clock,
        ttl: timedelta = TICKET_TTL,
        max_tickets: int = 100_000,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self.ttl = ttl
        self.max_tickets = max_tickets
        self._by_hash: dict[str, _Ticket] = {}

    def __len__(self) -> int:
        return len(self._by_hash)

    def issue(self, live: LiveSession) -> tuple[str, datetime]:
        """A new ticket for ``live``; returns (ticket, expires_at).

        Raises:
            TooManyTickets: the table is full even after dropping expired tickets.
        """
        now = self._clock.now()
        if len(self._by_hash) >= self.max_tickets:
            self.prune()
            if len(self._by_hash) >= self.max_tickets:
                raise TooManyTickets
        ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
        expires = now + self.ttl
        self._by_hash[hash_secret(ticket)] = _Ticket(live.id, expires)
        return ticket, expires

    def lookup(self, raw: str) -> LiveSession | None:
        """The live session a ticket belongs to, or None (unknown, expired, session over)."""
        if not raw.startswith(TICKET_PREFIX) or len(raw) > _MAX_TICKET_CHARS:
            return None
        digest = hash_secret(raw)
        entry = self._by_hash.get(digest)
        if entry is None:
            return None
        if entry.expires_at <= self._clock.now():
            del self._by_hash[digest]
            return None
        live = self._sessions.get(entry.session_id)
        if live is None or live.ended:
            del self._by_hash[digest]
            return None
        return live

    def drop(self, raw: str) -> None:
        """Forget one ticket (logout, renewal of a ticket that leaked)."""
        self._by_hash.pop(hash_secret(raw), None)

    def drop_session(self, session_id: str) -> None:
        """Forget every ticket of a session."""
        for digest in [d for d, t in self._by_hash.items() if t.session_id == session_id]:
            del self._by_hash[digest]

    def prune(self) -> None:
        """Drop expired tickets (tickets of ended sessions go on their next lookup)."""
        now = self._clock.now()
        for digest in [d for d, t in self._by_hash.items() if t.expires_at <= now]:
            del self._by_hash[digest]
