"""Tunnel tickets: the short-lived bearer credential the ``connect`` client holds.

A ticket is minted after a normal login (link + one-time token through
:class:`~domum_gateway.proxy.login.LoginService`) and maps to the session that login
created; it is never a session of its own. It authorises opening tunnels (one websocket
per local connection, so it is reused) until it expires or its session ends, whichever
comes first; the client renews it before it expires. Ending the session (logout,
revoke, window end, idle, terminate) makes every ticket of it worthless at once.

Tickets live in the store (``session_secrets``, kind ``ticket``) as SHA-256 hashes only,
like every other secret of the gateway, so behind a load balancer any replica accepts a
ticket another replica minted, and a restart forgets none. A replica that has not loaded
the ticket's session yet loads it by the session's hash
(:meth:`~.sessions.SessionManager.lookup_hash`). Tickets this process has checked stay in
a small cache next to their :class:`~.sessions.LiveSession`; a session that ends anywhere
is cut here by the bus (LISTEN/NOTIFY between replicas), which marks that object ended,
so a cached ticket never outlives its session. When the store cannot answer, a ticket is
refused (the caller answers 503), never let through. Expired tickets and those of ended
sessions are deleted by the scheduler's periodic :meth:`~..store.base.Store.purge_expired`.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from ..auth.secrets import hash_secret
from ..clock import Clock
from ..errors import DomumError
from ..store.base import SecretKind, Store
from .sessions import LiveSession, SessionManager

__all__ = ["MAX_TICKETS_PER_SESSION", "TICKET_PREFIX", "TICKET_TTL", "TicketStore", "TooManyTickets"]

log = logging.getLogger("domum.tunnel")

TICKET_PREFIX = "dgt_"
"""Marks tunnel tickets so people and secret scanners recognise them."""

TICKET_TTL = timedelta(minutes=10)

MAX_TICKETS_PER_SESSION = 32
"""Unexpired tickets one session may hold (the client renews every few minutes)."""

_MAX_TICKET_CHARS = 128


class TooManyTickets(Exception):
    """The session holds too many unexpired tickets (a flood), or ended meanwhile."""


@dataclass(slots=True)
class _Cached:
    live: LiveSession
    expires_at: datetime


class TicketStore:
    """Hashed tickets -> sessions, with expiry, in the shared store (see module docstring)."""

    def __init__(
        self,
        sessions: SessionManager,
        store: Store,
        clock: Clock,
        ttl: timedelta = TICKET_TTL,
        max_per_session: int = MAX_TICKETS_PER_SESSION,
        max_cached: int = 10_000,
    ) -> None:
        self._sessions = sessions
        self._store = store
        self._clock = clock
        self.ttl = ttl
        self.max_per_session = max_per_session
        self.max_cached = max_cached
        self._cache: dict[str, _Cached] = {}  # ticket hash -> its session, checked before

    def __len__(self) -> int:
        """Tickets cached in this process."""
        return len(self._cache)

    async def issue(self, live: LiveSession) -> tuple[str, datetime]:
        """A new ticket for ``live``; returns (ticket, expires_at).

        Raises:
            TooManyTickets: the session already holds ``max_per_session`` unexpired
                tickets, or it has ended.
            StoreError: the store could not record it (no ticket is handed out).
        """
        now = self._clock.now()
        ticket = TICKET_PREFIX + secrets.token_urlsafe(32)
        digest = hash_secret(ticket)
        expires = now + self.ttl
        stored = await self._store.add_session_secret(
            SecretKind.TICKET, digest, live.id, now, expires, max_per_session=self.max_per_session
        )
        if not stored:
            raise TooManyTickets
        self._remember(digest, live, expires)
        return ticket, expires

    async def lookup(self, raw: str) -> LiveSession | None:
        """The live session a ticket belongs to, or None (unknown, expired, session over).

        Raises:
            StoreError: the store could not answer; the caller refuses the request.
        """
        if not raw.startswith(TICKET_PREFIX) or len(raw) > _MAX_TICKET_CHARS:
            return None
        digest = hash_secret(raw)
        now = self._clock.now()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached.expires_at > now and not cached.live.ended:
                return cached.live
            del self._cache[digest]
            return None
        try:
            found = await self._store.find_session_secret(SecretKind.TICKET, digest, now)
            live = await self._sessions.lookup_hash(found.session_hash) if found is not None else None
        except DomumError as exc:
            log.warning("tunnel.ticket_check_failed detail=%s", exc.detail)
            raise
        if found is None or live is None or live.ended:
            return None
        self._remember(digest, live, found.expires_at)
        return live

    async def drop_session(self, session_id: str) -> None:
        """Forget every ticket of a session, here and in the store."""
        for digest in [d for d, t in self._cache.items() if t.live.id == session_id]:
            del self._cache[digest]
        await self._store.drop_session_secrets(session_id, SecretKind.TICKET)

    def prune(self) -> None:
        """Drop expired tickets and those of ended sessions from this process's cache."""
        now = self._clock.now()
        for digest in [d for d, t in self._cache.items() if t.expires_at <= now or t.live.ended]:
            del self._cache[digest]

    def _remember(self, digest: str, live: LiveSession, expires: datetime) -> None:
        if len(self._cache) >= self.max_cached:
            self.prune()
            if len(self._cache) >= self.max_cached:
                self._cache.clear()  # a cache: the store still knows every ticket
        self._cache[digest] = _Cached(live, expires)
