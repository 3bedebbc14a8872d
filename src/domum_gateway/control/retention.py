"""Data protection: scheduled purge of personal data, data-subject export and erasure.

Personal data (name, e-mail, phone) of a user whose grants all ended more than
``retention.days`` ago is replaced by a pseudonym; the audit trail keeps only the user id
and the salted commitments of what was erased, so ``audit verify`` still passes.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from ..bus import Bus, Change, ChangeKind
from ..clock import Clock
from ..errors import Conflict, NotFound
from ..model import RemoteUser
from ..store.base import AuditFilter, RequestFilter, Store
from .service import Actor
from .views import event_json, iso, request_json, session_json, user_json

__all__ = ["Retention"]

log = logging.getLogger("domum.retention")


class Retention:
    def __init__(self, store: Store, clock: Clock, bus: Bus, days: int) -> None:
        self._store = store
        self._clock = clock
        self._bus = bus
        self.days = days

    async def candidates(self) -> list[RemoteUser]:
        """Users whose personal data is due for purging now."""
        return await self._store.purge_candidates(self._clock.now() - timedelta(days=self.days))

    async def purge(self, actor: Actor, *, dry_run: bool = False) -> list[RemoteUser]:
        """Purge every due user (or only list them with ``dry_run``)."""
        due = await self.candidates()
        if dry_run:
            return due
        done: list[RemoteUser] = []
        for user in due:
            ok = await self._store.purge_user(
                user.id,
                self._clock.now(),
                actor.entry("user.purged", user.id, details={"retention_days": self.days}),
            )
            if ok:
                done.append(user)
                self._bus.publish(Change(ChangeKind.USER, user.id, "personal data purged"))
        if done:
            log.info("retention.purged users=%d", len(done))
        return done

    async def erase(self, user_id: str, actor: Actor) -> None:
        """Erase one user's personal data on request (right to erasure)."""
        user = await self._store.get_user(user_id)
        if user is None:
            raise NotFound(f"No user {user_id!r}.")
        if user.purged_at is not None:
            raise Conflict("The user's personal data was already erased.")
        if await self._store.has_open_requests(user_id, self._clock.now()):
            raise Conflict("The user still has access that has not ended; revoke it first, then erase.")
        await self._store.purge_user(
            user_id, self._clock.now(), actor.entry("user.erased", user_id, details={"on_request": True})
        )
        self._bus.publish(Change(ChangeKind.USER, user_id, "personal data erased"))

    async def export(self, user_id: str) -> dict[str, Any]:
        """Everything the gateway holds about one user (data-subject access)."""
        user = await self._store.get_user(user_id)
        if user is None:
            raise NotFound(f"No user {user_id!r}.")
        requests = []
        cursor: str | None = None
        while True:
            page = await self._store.list_requests(RequestFilter(user_id=user_id, limit=500, cursor=cursor))
            requests += page.items
            cursor = page.next_cursor
            if not cursor:
                break
        sessions = []
        events = []
        for req in requests:
            sessions += [session_json(s) for s in await self._store.list_sessions(req.id, live=False)]
            events += await self._all_events(AuditFilter(request_id=req.id, limit=1000))
        events += await self._all_events(AuditFilter(subject=user_id, limit=1000))
        unique = sorted({e.seq: e for e in events}.values(), key=lambda e: e.seq)
        return {
            "format": "domum-user-export/1",
            "generated_at": iso(self._clock.now()),
            "user": user_json(user),
            "access_requests": [request_json(r) for r in requests],
            "sessions": sessions,
            "audit_events": [event_json(e) for e in unique],
        }

    async def _all_events(self, flt: AuditFilter) -> list[Any]:
        out: list[Any] = []
        cursor: str | None = None
        while True:
            page = await self._store.list_audit(
                AuditFilter(request_id=flt.request_id, subject=flt.subject, limit=flt.limit, cursor=cursor)
            )
            out += page.items
            cursor = page.next_cursor
            if not cursor:
                return out
