"""Live sessions: the in-memory view every enforcement point reads, and the cut-off switch.

The hot path (each proxied request, each tunnel open, each SSH channel) calls
:meth:`SessionManager.check`, which touches memory only: the session and its grant are
cached after the first lookup, ``auth.decide`` runs on the cached values, and activity is
written back to the store in batches off the hot path.

Connections register a closer with :meth:`SessionManager.attach`; when a session ends for
any reason (logout, revoke, window end, idle, terminate, address change) every closer is
called with the reason, so websockets, tunnels and SSH channels end within the same tick.
Window ends are timers (one per grant), not polling.

Idle timeouts are timers too, one per live session. Activity is what the user sends
(requests, keystrokes, bytes into a tunnel or a proxied websocket; output from a target
alone does not keep a session alive): the hot paths stamp ``LiveSession.active_at`` with
``time.monotonic()`` and nothing else. The timer fires at ``active_at + idle``; when the
session was active meanwhile it is re-armed for the new deadline, else the store is
asked once whether another replica saw activity (its ``last_seen``), and if not the
session ends, its cut timed from the deadline.

Each cut of a registered connection is timed for ``domum_cutoff_seconds{cause}``: the
session (or the connection, for ``terminate``) is stamped with the cause and the
monotonic moment the cut was decided, and the observation is made when the
connection's owner reports it closed (:meth:`SessionManager.close_connection`, called
once its transport is gone), not when the close was requested.

The live-connection registry in memory is this process's truth; the store holds every
replica's copy (table ``live_connections``) so that any replica can list them all. Opening
and closing a connection touch memory only: the flush loop (every ``flush_interval``
seconds, with the session touches) writes one batched upsert of the connections that are
new or moved bytes and one batched delete of those gone, and every ``heartbeat`` seconds
upserts them all, refreshing ``updated_at`` so that a quiet connection stays within
``store.base.CONNECTION_STALE_AFTER``. A failed flush is logged and retried whole on the
next one. A connection held by another replica is cut through the bus
(``ChangeKind.CONNECTION``); the holder cuts it and flushes at once, so its row goes
within a round trip instead of a flush interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..audit import AuditEntry
from ..auth.decide import ALLOW, Decision, Deny, DenyReason, SessionFacts, decide
from ..auth.grant import build_grant
from ..auth.origin import CompiledOrigins, IPAddress, compile_origins, normalise_address
from ..auth.secrets import hash_secret, new_id, new_session_id
from ..bus import Bus, Change, ChangeKind
from ..clock import Clock
from ..errors import DomumError
from ..metrics import Metrics
from ..model import AccessRequest, Grant, RequestStatus, Session
from ..store.base import ConnectionRecord, SessionCreate, Store
from .geoip import CountryLookup

__all__ = ["Closer", "Connection", "LiveSession", "SessionManager", "TooManySessions"]

log = logging.getLogger("domum.sessions")

Closer = Callable[[str], None]
"""Called with a human-readable reason when the session a connection belongs to ends."""

# Reasons that end a session for good (as opposed to refusing one request).
_TERMINAL = frozenset(
    {
        DenyReason.EXPIRED,
        DenyReason.REVOKED,
        DenyReason.SESSION_IDLE,
        DenyReason.SESSION_ENDED,
        DenyReason.ADDRESS_CHANGED,
        DenyReason.NOT_FORWARDED,
        DenyReason.ORIGIN_DENIED,
        DenyReason.COUNTRY_DENIED,
        DenyReason.UNKNOWN,
    }
)


class TooManySessions(DomumError):
    status = 429
    type = "too-many-sessions"
    title = "Too many sessions"


@dataclass(eq=False, slots=True)
class LiveSession:
    """A logged-in session as the hot path sees it."""

    id: str
    request_id: str
    user_id: str
    address: str
    created_at: datetime
    last_seen: datetime
    grant: Grant
    origins: CompiledOrigins
    hash: str = ""
    ended: bool = False
    end_reason: str | None = None
    closers: set[Closer] = field(default_factory=set)
    # The bound address's country (GeoIP), looked up once: the address cannot change
    # without ending the session.
    country: str | None = None
    # Why and when (time.monotonic) the session was cut: stamped before its closers run.
    cut_cause: str = ""
    cut_at: float = 0.0
    # The user's latest activity (time.monotonic), stamped by the hot paths; ``last_seen``
    # follows it when the manager syncs (``synced_at``: the stamp it last synced from).
    active_at: float = field(default_factory=time.monotonic)
    synced_at: float = 0.0
    idle_timer: asyncio.TimerHandle | None = None

    def facts(self) -> SessionFacts:
        return SessionFacts(address=self.address, last_seen=self.last_seen, ended=self.ended)

    def active(self) -> None:
        """The user did something on a long-lived connection (cheap: one clock read)."""
        self.active_at = time.monotonic()


@dataclass(eq=False, slots=True)
class Connection:
    """One long-lived connection of a session, as the live registry shows it."""

    id: str
    session: LiveSession
    protocol: str  # "tcp", "rdp", "ssh", "ssh-terminal", "websocket"
    target: str | None
    origin: str
    since: datetime
    closer: Closer
    bytes_in: int = 0  # from the user towards the target
    bytes_out: int = 0  # from the target towards the user
    cut_reason: str | None = None
    counted: bool = True  # whether it counts in domum_sessions_active here (else its owner does)
    cut_cause: str = ""  # the domum_cutoff_seconds label
    cut_at: float = 0.0  # time.monotonic() when the cut was decided; 0: not cut
    timed: bool = False  # its cut-off latency was observed

    def cut(self, reason: str, cause: str | None = None) -> None:
        """Close the connection with ``reason`` (once).

        Without ``cause`` the connection is cut with its session, whose stamp (cause and
        moment) it takes; with one it is cut alone, now.
        """
        if self.cut_reason is None:
            self.cut_reason = reason
            live = self.session
            if cause is None and live.cut_at:
                self.cut_cause, self.cut_at = live.cut_cause, live.cut_at
            else:
                self.cut_cause, self.cut_at = cause or "other", time.monotonic()
            self.closer(reason)


@dataclass(slots=True)
class _GrantEntry:
    grant: Grant
    origins: CompiledOrigins
    timer: asyncio.TimerHandle | None = None


class SessionManager:
    """Owns the session and grant caches; subscribes to the bus for invalidation."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        bus: Bus,
        metrics: Metrics,
        flush_interval: float = 5.0,
        *,
        replica: str | None = None,
        heartbeat: float = 30.0,
        shared: bool = True,
    ) -> None:
        self._store = store
        self._clock = clock
        self._bus = bus
        self._metrics = metrics
        # Read on every turn of the flush loop (tests shorten it; ``flush_soon`` applies it).
        self.flush_interval = flush_interval
        self.heartbeat = heartbeat
        # Names this process in the shared registry (``live_connections.replica``).
        self.replica = replica or secrets.token_hex(8)
        # Whether to write the registry to the store at all: only replicas sharing a
        # database need it (SQLite is one process, and a 1,000-row upsert every flush
        # would hold its single writer lock against revokes and logins).
        self.shared = shared
        self._by_hash: dict[str, LiveSession] = {}
        self._by_id: dict[str, LiveSession] = {}
        self._grants: dict[str, _GrantEntry] = {}
        self._dirty: dict[str, datetime] = {}
        # Hashes of sessions cut in memory whose end the store has not recorded yet: a
        # lookup in that gap must not load the still-"live" row and revive the session.
        self._ending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._connections: dict[str, Connection] = {}
        # The shared registry's view of ours: byte counts the store holds per connection
        # (after a successful upsert), ids ever sent in an upsert (their rows may exist),
        # ids to delete, and when (time.monotonic) every row was last refreshed.
        self._stored: dict[str, tuple[int, int]] = {}
        self._written: set[str] = set()
        self._gone: set[str] = set()
        self._beat_at = float("-inf")
        self._wake = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        # Set by the composition root when ``geoip.database`` is configured.
        self.countries: CountryLookup | None = None
        bus.subscribe(self._on_change)

    # lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="domum-session-flush")

    async def stop(self) -> None:
        self._bus.unsubscribe(self._on_change)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        for entry in self._grants.values():
            if entry.timer is not None:
                entry.timer.cancel()
        for s in list(self._by_id.values()):
            self._cut(s, "the gateway is shutting down", "shutdown")
        with contextlib.suppress(DomumError):
            await self.flush()
        # Whatever is left of ours in the shared registry (a failed flush, a stray row).
        if self.shared:
            try:
                await self._store.delete_replica_connections(self.replica)
            except DomumError as exc:
                log.warning("sessions.registry_not_cleared replica=%s detail=%s", self.replica, exc.detail)
        for task in list(self._tasks):
            task.cancel()

    # grants ----------------------------------------------------------------------
    async def grant_for(self, request: AccessRequest) -> tuple[Grant, CompiledOrigins] | None:
        """The cached grant of ``request`` (loading its group's policy on a miss)."""
        entry = self._grants.get(request.id)
        if entry is None:
            group = await self._store.get_group(request.group_id)
            if group is None:
                return None
            grant = build_grant(request, group.policy)
            entry = _GrantEntry(grant, compile_origins(grant.origins))
            self._grants[request.id] = entry
            self._schedule_end(entry)
        return entry.grant, entry.origins

    async def _grant_by_id(self, request_id: str) -> _GrantEntry | None:
        entry = self._grants.get(request_id)
        if entry is not None:
            return entry
        request = await self._store.get_request(request_id)
        if request is None:
            return None
        await self.grant_for(request)
        return self._grants.get(request_id)

    def _schedule_end(self, entry: _GrantEntry) -> None:
        if entry.grant.status not in (RequestStatus.SAVED, RequestStatus.FORWARDED):
            return
        delay = (entry.grant.end - self._clock.now()).total_seconds()
        if delay > 40 * 86400:  # asyncio timers are fine far ahead, but re-arm on reload instead
            return
        loop = asyncio.get_running_loop()
        rid = entry.grant.request_id
        entry.timer = loop.call_later(max(0.0, delay), self._window_ended, rid)

    def _window_ended(self, request_id: str) -> None:
        sessions = [s for s in self._by_id.values() if s.request_id == request_id]
        if not sessions:
            return
        # The cut was decided at the window's end: a timer that fires late counts as late.
        late = max(0.0, (self._clock.now() - sessions[0].grant.end).total_seconds())
        at = time.monotonic() - late
        for s in sessions:
            self._end_later(s, DenyReason.EXPIRED, at)

    # sessions --------------------------------------------------------------------
    async def open(self, request: AccessRequest, address: IPAddress, origin: str) -> tuple[str, LiveSession]:
        """Create a session for a verified login; return (cookie value, session)."""
        loaded = await self.grant_for(request)
        if loaded is None:
            raise DomumError("The access request's group no longer exists.")
        grant, origins = loaded
        await self.sweep_idle(request.id, grant)
        cookie = new_session_id()
        now = self._clock.now()
        session = Session(
            id=new_id("ses"),
            request_id=request.id,
            address=str(address),
            created_at=now,
            last_seen=now,
        )
        digest = hash_secret(cookie)
        outcome = await self._store.create_session(
            session,
            digest,
            grant.max_sessions,
            AuditEntry(
                actor=f"user:{request.user_id}",
                action="session.started",
                subject=session.id,
                origin=origin,
                details={"request_id": request.id},
            ),
        )
        if outcome is SessionCreate.TOO_MANY:
            raise TooManySessions(
                f"This access allows {grant.max_sessions} session(s) at once. "
                "Log out elsewhere, or wait for an idle session to end."
            )
        live = LiveSession(
            id=session.id,
            request_id=request.id,
            user_id=request.user_id,
            address=str(address),
            created_at=now,
            last_seen=now,
            grant=grant,
            origins=origins,
            hash=digest,
            country=self._country(address),
        )
        live.synced_at = live.active_at
        self._by_hash[digest] = live
        self._by_id[live.id] = live
        self._metrics.sessions_active.labels("web").inc()
        self._arm_idle(live)
        return cookie, live

    async def at_capacity(self, request: AccessRequest) -> bool:
        """Whether the grant already has ``max_sessions`` live sessions (idle ones swept)."""
        loaded = await self.grant_for(request)
        if loaded is None:
            return False  # ``open`` refuses it with a clearer error
        grant = loaded[0]
        live = await self.sweep_idle(request.id, grant)
        return live >= grant.max_sessions

    async def sweep_idle(self, request_id: str, grant: Grant) -> int:
        """End the request's sessions idle past the timeout; return how many stay live.

        A session nobody uses again is never checked again, so without this sweep an
        abandoned browser tab would hold one of ``max_sessions`` until the window ends.
        Memory knows the latest activity; the store's ``last_seen`` lags by one flush.
        """
        now = self._clock.now()
        idle = timedelta(seconds=grant.idle_timeout_seconds)
        remaining = 0
        for stored in await self._store.list_sessions(request_id, live=True):
            cached = self._by_id.get(stored.id)
            if cached is not None:
                self._sync(cached)
            last_seen = max(stored.last_seen, cached.last_seen) if cached is not None else stored.last_seen
            if now - last_seen < idle:
                remaining += 1
                continue
            if cached is not None:
                self._cut(cached, _REASON_TEXT[DenyReason.SESSION_IDLE], "idle")
            await self._store.end_session(
                stored.id,
                DenyReason.SESSION_IDLE.value,
                now,
                AuditEntry(
                    actor="system",
                    action="session.ended",
                    subject=stored.id,
                    outcome="denied",
                    details={"request_id": request_id, "reason": DenyReason.SESSION_IDLE.value},
                ),
            )
        return remaining

    def _country(self, address: IPAddress | str) -> str | None:
        if self.countries is None:
            return None
        try:
            peer = normalise_address(address) if isinstance(address, str) else address
        except ValueError:
            return None
        return self.countries.country(peer)

    async def lookup(self, cookie: str) -> LiveSession | None:
        """The live session for a cookie value: memory first, the store once on a miss."""
        if not cookie or len(cookie) > 128:
            return None
        return await self.lookup_hash(hash_secret(cookie))

    async def lookup_hash(self, digest: str) -> LiveSession | None:
        """The live session whose cookie hashes to ``digest``: memory first, then the store.

        For credentials that name a session instead of carrying its cookie (tunnel tickets,
        host-mode cookies; ``SessionSecret.session_hash``), possibly minted by another
        replica: a session this process has not loaded yet is loaded here by its hash.
        """
        live = self._by_hash.get(digest)
        if live is not None:
            return None if live.ended else live
        if digest in self._ending:
            return None
        stored = await self._store.find_session(digest)
        if stored is None:
            return None
        entry = await self._grant_by_id(stored.request_id)
        if entry is None or digest in self._ending:
            return None
        live = self._by_id.get(stored.id)
        if live is None:
            live = LiveSession(
                id=stored.id,
                request_id=stored.request_id,
                user_id=entry.grant.user_id,
                address=stored.address,
                created_at=stored.created_at,
                last_seen=stored.last_seen,
                grant=entry.grant,
                origins=entry.origins,
                hash=digest,
                country=self._country(stored.address),
            )
            # Its latest activity is what the store knows (another replica's, perhaps).
            ago = (self._clock.now() - stored.last_seen).total_seconds()
            live.active_at = live.synced_at = time.monotonic() - max(0.0, ago)
            self._by_id[live.id] = live
            self._metrics.sessions_active.labels("web").inc()
            self._arm_idle(live)
        self._by_hash[digest] = live
        return live

    def check(
        self,
        live: LiveSession,
        peer: IPAddress,
        target: str | None = None,
        country: str | None = None,
        *,
        activity: bool = True,
    ) -> Decision:
        """Decide for one request on ``live`` (memory only). Ends the session when terminal."""
        now = self._clock.now()
        if live.active_at > live.synced_at:
            self._sync(live, now)
        if country is None:
            country = live.country
        decision = decide(live.grant, now, peer, target, live.facts(), country, live.origins)
        if isinstance(decision, Deny):
            self._metrics.denied.labels(decision.reason.value).inc()
            if decision.reason in _TERMINAL and not live.ended:
                self._end_later(live, decision.reason)
            return decision
        if activity:
            live.last_seen = now
            live.active_at = live.synced_at = time.monotonic()
            self._dirty[live.id] = now
        return ALLOW

    def touch(self, live: LiveSession) -> None:
        """Count traffic on a long-lived connection as activity (for the idle timeout)."""
        now = self._clock.now()
        live.last_seen = now
        live.active_at = live.synced_at = time.monotonic()
        self._dirty[live.id] = now

    def sync(self, live: LiveSession) -> None:
        """Carry the hot paths' activity stamp into ``last_seen`` (and the store, batched)."""
        if live.active_at > live.synced_at and not live.ended:
            self._sync(live)

    def _sync(self, live: LiveSession, now: datetime | None = None) -> None:
        stamp = live.active_at
        if stamp <= live.synced_at:
            return
        now = now or self._clock.now()
        seen = now - timedelta(seconds=max(0.0, time.monotonic() - stamp))
        live.synced_at = stamp
        if seen > live.last_seen:
            live.last_seen = seen
            self._dirty[live.id] = seen

    # idle timeout ------------------------------------------------------------------
    def _arm_idle(self, live: LiveSession) -> None:
        """(Re-)arm ``live``'s idle timer for ``active_at + idle``."""
        self._disarm_idle(live)
        if live.ended:
            return
        delay = live.active_at + live.grant.idle_timeout_seconds - time.monotonic()
        live.idle_timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._idle_due, live)

    @staticmethod
    def _disarm_idle(live: LiveSession) -> None:
        if live.idle_timer is not None:
            live.idle_timer.cancel()
            live.idle_timer = None

    def _idle_due(self, live: LiveSession) -> None:
        live.idle_timer = None
        if live.ended:
            return
        deadline = live.active_at + live.grant.idle_timeout_seconds
        if deadline > time.monotonic():  # active meanwhile: wait for the new deadline
            self._sync(live)
            self._arm_idle(live)
            return
        self._spawn(self._idle_confirm(live, deadline))

    async def _idle_confirm(self, live: LiveSession, deadline: float) -> None:
        """No activity here until ``deadline``: end ``live`` unless another replica saw some."""
        stamp = live.active_at
        try:
            stored = await self._store.get_session(live.id)
        except DomumError as exc:
            stored = None  # fail closed: nobody can vouch for activity elsewhere
            log.warning("sessions.idle_check_failed session=%s detail=%s", live.id, exc.detail)
        if live.ended:
            return
        idle = live.grant.idle_timeout_seconds
        if live.active_at != stamp:  # active while the store answered
            self._arm_idle(live)
            return
        if stored is not None and stored.last_seen > live.last_seen:
            ago = (self._clock.now() - stored.last_seen).total_seconds()
            if ago < idle:  # another replica relayed activity: adopt it
                live.last_seen = stored.last_seen
                live.active_at = live.synced_at = time.monotonic() - max(0.0, ago)
                self._arm_idle(live)
                return
        self._end_later(live, DenyReason.SESSION_IDLE, deadline)

    def attach(self, live: LiveSession, closer: Closer) -> Callable[[], None]:
        """Register a connection to cut when the session ends; returns the detach function."""
        live.closers.add(closer)
        return lambda: live.closers.discard(closer)

    def open_connection(
        self,
        live: LiveSession,
        protocol: str,
        target: str | None,
        origin: str,
        closer: Closer,
        *,
        count: bool = True,
    ) -> Connection:
        """Register a long-lived connection (tunnel, terminal, SSH channel, proxied websocket).

        It shows in the live registry (``GET /api/v1/sessions``), can be cut on its own
        (``terminate``), and is cut with its session. Call :meth:`close_connection` when it
        ends by itself.
        """
        conn = Connection(
            id=new_id("con"),
            session=live,
            protocol=protocol,
            target=target,
            origin=origin,
            since=self._clock.now(),
            closer=closer,
            counted=count,
        )
        self._connections[conn.id] = conn
        live.closers.add(conn.cut)
        if count:
            self._metrics.sessions_active.labels(protocol).inc()
        return conn

    def close_connection(self, conn: Connection) -> None:
        """The owner's report that a connection has ended, its transport gone (idempotent).

        A connection that was cut has its cut-off latency observed here, once.
        """
        self._forget(conn)
        if conn.cut_at and not conn.timed:
            conn.timed = True
            self._metrics.cutoff.labels(conn.cut_cause).observe(max(0.0, time.monotonic() - conn.cut_at))

    def _forget(self, conn: Connection) -> None:
        """Drop a connection from the live registry (it is ending or has ended)."""
        if self._connections.pop(conn.id, None) is not None:
            conn.session.closers.discard(conn.cut)
            if conn.counted:
                self._metrics.sessions_active.labels(conn.protocol).dec()
            self._stored.pop(conn.id, None)
            if conn.id in self._written:  # the shared registry may hold it: delete next flush
                self._written.discard(conn.id)
                self._gone.add(conn.id)

    def terminate_connection(self, connection_id: str, reason: str) -> bool:
        """Cut one connection (the session stays); False when it is not live here.

        Its row leaves the shared registry at once (an early flush), so the replica that
        asked for the cut sees it gone within a round trip.
        """
        conn = self._connections.get(connection_id)
        if conn is None:
            return False
        self._forget(conn)
        conn.cut(reason, "terminate")
        self.flush_soon()
        return True

    def cut_elsewhere(self, connection_id: str, reason: str) -> None:
        """Ask every replica to cut ``connection_id`` (the one holding it does; asynchronous)."""
        self._bus.publish(Change(ChangeKind.CONNECTION, connection_id, reason))

    def connections(self, session_id: str | None = None) -> list[Connection]:
        return [c for c in self._connections.values() if session_id is None or c.session.id == session_id]

    def registry(self) -> list[dict[str, object]]:
        """The live connections of this process, for the control API (no secrets)."""
        return [
            {
                "id": c.id,
                "session_id": c.session.id,
                "request_id": c.session.request_id,
                "user_id": c.session.user_id,
                "protocol": c.protocol,
                "target": c.target,
                "origin": c.origin,
                "since": c.since.isoformat().replace("+00:00", "Z"),
                "bytes_in": c.bytes_in,
                "bytes_out": c.bytes_out,
                "replica": self.replica,
            }
            for c in self._connections.values()
        ]

    def _record(self, c: Connection, now: datetime) -> ConnectionRecord:
        return ConnectionRecord(
            id=c.id,
            session_id=c.session.id,
            request_id=c.session.request_id,
            user_id=c.session.user_id,
            protocol=c.protocol,
            target=c.target,
            origin=c.origin,
            since=c.since,
            bytes_in=c.bytes_in,
            bytes_out=c.bytes_out,
            replica=self.replica,
            updated_at=now,
        )

    async def end(
        self, live: LiveSession, reason: str, actor: str, origin: str = "", *, cause: str | None = None
    ) -> None:
        """End a session now (logout, terminate) and cut its connections.

        ``cause`` labels the cut-off; by default ``logout`` when the user ends it, else
        ``terminate``.
        """
        self._ending.add(live.hash)
        self._cut(live, reason, cause or ("logout" if actor.startswith("user:") else "terminate"))
        await self._store.end_session(
            live.id,
            reason,
            self._clock.now(),
            AuditEntry(
                actor=actor,
                action="session.ended",
                subject=live.id,
                origin=origin,
                details={"request_id": live.request_id, "reason": reason},
            ),
        )
        self._ending.discard(live.hash)
        self._bus.publish(Change(ChangeKind.SESSION, live.id, reason))

    def live_sessions(self) -> list[LiveSession]:
        return [s for s in self._by_id.values() if not s.ended]

    def get(self, session_id: str) -> LiveSession | None:
        return self._by_id.get(session_id)

    # internals -------------------------------------------------------------------
    def _cut(self, live: LiveSession, reason: str, cause: str, at: float | None = None) -> None:
        """End ``live`` in memory and cut its connections (``at``: when it was decided)."""
        if not live.ended:
            live.ended = True
            live.end_reason = reason
            live.cut_cause, live.cut_at = cause, at if at is not None else time.monotonic()
            self._metrics.sessions_active.labels("web").dec()
        self._disarm_idle(live)
        self._by_hash.pop(live.hash, None)
        self._by_id.pop(live.id, None)
        self._dirty.pop(live.id, None)
        for closer in list(live.closers):
            try:
                closer(reason)
            except Exception:
                log.exception("sessions.closer_failed session=%s", live.id)
        live.closers.clear()
        for conn in [c for c in self._connections.values() if c.session is live]:
            self._forget(conn)  # observed when its owner reports it closed

    def _end_later(self, live: LiveSession, reason: DenyReason, at: float | None = None) -> None:
        """Cut now (synchronously), record the end in the store in the background."""
        text = _REASON_TEXT.get(reason, reason.value)
        self._ending.add(live.hash)
        self._cut(live, text, _CAUSE.get(reason, "other"), at)
        self._spawn(self._record_end(live, reason))

    async def _record_end(self, live: LiveSession, reason: DenyReason) -> None:
        try:
            await self._store.end_session(
                live.id,
                reason.value,
                self._clock.now(),
                AuditEntry(
                    actor="system",
                    action="session.ended",
                    subject=live.id,
                    outcome="denied",
                    details={"request_id": live.request_id, "reason": reason.value},
                ),
            )
        except DomumError as exc:
            # Keep the hash in ``_ending``: the session stays dead here even though the
            # store could not say so.
            log.warning("sessions.end_not_recorded session=%s detail=%s", live.id, exc.detail)
            return
        self._ending.discard(live.hash)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_change(self, change: Change) -> None:
        at = time.monotonic()  # the decision reaches this process now
        if change.kind is ChangeKind.REQUEST:
            entry = self._grants.pop(change.id, None)
            if entry is not None and entry.timer is not None:
                entry.timer.cancel()
            self._spawn(self._recheck_request(change.id, change.reason, at))
        elif change.kind is ChangeKind.SESSION:
            live = self._by_id.get(change.id)
            if live is not None:
                cause = "terminate" if change.reason.startswith("terminated") else "logout"
                self._cut(live, change.reason or "the session was ended", cause, at)
        elif change.kind is ChangeKind.CONNECTION:
            reason = change.reason or "terminated by an administrator"
            if not self.terminate_connection(change.id, reason) and change.id in self._gone:
                self.flush_soon()  # it ended here by itself: let its row go now, not next flush
        elif change.kind in (ChangeKind.GROUP, ChangeKind.TARGET, ChangeKind.USER):
            # Policies changed: drop every cached grant; sessions re-check on next use.
            affected = {s.request_id for s in self._by_id.values()}
            for entry in self._grants.values():
                if entry.timer is not None:
                    entry.timer.cancel()
            self._grants.clear()
            for rid in affected:
                self._spawn(self._recheck_request(rid, change.reason, at))

    async def _recheck_request(self, request_id: str, reason: str, at: float) -> None:
        sessions = [s for s in self._by_id.values() if s.request_id == request_id]
        if not sessions:
            return
        try:
            entry = await self._grant_by_id(request_id)
        except DomumError:
            entry = None  # fail closed: the store cannot vouch for the grant
        for s in sessions:
            if entry is None:
                self._cut(s, reason or "access could not be confirmed", "unconfirmed", at)
                continue
            idle_changed = s.grant.idle_timeout_seconds != entry.grant.idle_timeout_seconds
            s.grant, s.origins = entry.grant, entry.origins
            if idle_changed:
                self._arm_idle(s)
            if entry.grant.status is RequestStatus.REVOKED:
                self._cut(s, reason or _REASON_TEXT[DenyReason.REVOKED], "revoke", at)
            elif entry.grant.status is RequestStatus.EXPIRED:
                self._cut(s, reason or _REASON_TEXT[DenyReason.EXPIRED], "window_end", at)

    async def flush(self) -> None:
        """Write batched activity and this process's connections to the store.

        Raises the first ``DomumError``; what failed stays pending for the next flush.
        """
        failed: DomumError | None = None
        if self._dirty:
            batch, self._dirty = self._dirty, {}
            try:
                await self._store.touch_sessions(batch)
            except DomumError as exc:
                failed = exc
                for sid, seen in batch.items():  # retried next time (unless ended meanwhile)
                    if sid in self._by_id:
                        self._dirty[sid] = max(seen, self._dirty.get(sid, seen))
        try:
            await self._flush_connections()
        except DomumError as exc:
            failed = failed or exc
        if failed is not None:
            raise failed

    async def _flush_connections(self) -> None:
        """One upsert (new, moved, or every row when the heartbeat is due), then one delete."""
        if not self.shared:
            return
        started = time.monotonic()
        beat = started - self._beat_at >= self.heartbeat
        now = self._clock.now()
        batch: list[tuple[Connection, tuple[int, int]]] = []
        for c in self._connections.values():
            counts = (c.bytes_in, c.bytes_out)
            if beat or self._stored.get(c.id) != counts:
                batch.append((c, counts))
        if batch:
            # Marked before the write: a connection that closes while it is under way is
            # deleted afterwards, whether or not its row made it.
            self._written.update(c.id for c, _ in batch)
            await self._store.upsert_connections([self._record(c, now) for c, _ in batch])
            for c, counts in batch:
                if c.id in self._connections:
                    self._stored[c.id] = counts
        if beat:
            self._beat_at = started
        if self._gone:
            gone = set(self._gone)
            await self._store.delete_connections(gone)
            self._gone -= gone

    def flush_soon(self) -> None:
        """Have the flush loop run now instead of at the end of its interval."""
        self._wake.set()

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            try:
                await self.flush()
            except DomumError as exc:
                log.warning("sessions.flush_failed detail=%s", exc.detail)
            except Exception:  # never let the loop die: the next turn tries again
                log.exception("sessions.flush_crashed")


_CAUSE = {
    DenyReason.EXPIRED: "window_end",
    DenyReason.REVOKED: "revoke",
    DenyReason.SESSION_IDLE: "idle",
    DenyReason.SESSION_ENDED: "logout",
    DenyReason.ADDRESS_CHANGED: "address_change",
    DenyReason.NOT_FORWARDED: "revoke",
    DenyReason.ORIGIN_DENIED: "origin",
    DenyReason.COUNTRY_DENIED: "origin",
}
"""The ``domum_cutoff_seconds`` cause of each session-ending denial (else ``other``)."""

_REASON_TEXT = {
    DenyReason.EXPIRED: "the access window has ended",
    DenyReason.REVOKED: "access was revoked",
    DenyReason.SESSION_IDLE: "the session was idle for too long",
    DenyReason.SESSION_ENDED: "the session has ended",
    DenyReason.ADDRESS_CHANGED: "your network address changed; log in again",
    DenyReason.NOT_FORWARDED: "this access is not active",
    DenyReason.ORIGIN_DENIED: "your network address is not allowed",
    DenyReason.COUNTRY_DENIED: "your location is not allowed",
    DenyReason.UNKNOWN: "access could not be confirmed",
}
