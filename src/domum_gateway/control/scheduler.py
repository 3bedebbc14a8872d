"""Background housekeeping: mark ended windows expired and cut what they allowed.

Live connections are cut at a window's end by the session manager's per-grant timer;
this tick records the expiry in the store (and tells other replicas). The scheduler
also counts ``domum_grants_active`` from the store before each scrape, and every
``sweep_every`` deletes expired short-lived rows (tunnel tickets, host-mode codes and
cookies, console sessions: ``Store.purge_expired``) and the shared registry's rows of
replicas that died (``Store.purge_stale_connections``) so those tables stay bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..errors import DomumError
from ..metrics import Metrics
from ..store.base import CONNECTION_STALE_AFTER, Store
from .retention import Retention
from .service import Actor, AdminService

__all__ = ["Scheduler"]

log = logging.getLogger("domum.scheduler")


class Scheduler:
    """Runs periodic jobs; a failing job is logged and retried on the next tick."""

    def __init__(
        self,
        service: AdminService,
        store: Store,
        retention: Retention | None = None,
        interval: float = 15.0,
        purge_every: float = 3600.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._service = service
        self._store = store
        self._retention = retention
        self._interval = interval
        self._purge_every = purge_every
        self._last_purge = float("-inf")
        self.sweep_every = 60.0
        self._last_sweep = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._metrics = metrics
        if metrics is not None:
            metrics.add_refresher(self.count_grants)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="domum-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def tick(self) -> None:
        expired = await self._service.expire_due()
        if expired:
            log.info("scheduler.expired count=%d", len(expired))
        now = time.monotonic()
        if now - self._last_sweep >= self.sweep_every:
            self._last_sweep = now
            wall = self._service.clock.now()
            gone = await self._store.purge_expired(wall)
            if gone:
                log.info("scheduler.purged_expired rows=%d", gone)
            stale = await self._store.purge_stale_connections(wall - CONNECTION_STALE_AFTER)
            if stale:
                log.info("scheduler.purged_stale_connections rows=%d", stale)
        if self._retention is not None and now - self._last_purge >= self._purge_every:
            self._last_purge = now
            await self._retention.purge(Actor("system:retention"))

    async def active_grants(self) -> int:
        """Forwarded requests whose window is open now, counted in the store (every replica's truth).

        One COUNT query (``Store.count_active_grants``), not a walk over every request: this
        runs on each scrape. Revoked and expired requests never count, nor does a window
        that ended but is not yet marked expired.
        """
        return await self._store.count_active_grants(self._service.clock.now())

    async def count_grants(self) -> None:
        """Set ``domum_grants_active`` (bounded: a slow store keeps the last value)."""
        if self._metrics is None:
            return
        try:
            count = await asyncio.wait_for(self.active_grants(), 5.0)
        except (DomumError, TimeoutError) as exc:
            log.warning("scheduler.grants_not_counted error=%s", type(exc).__name__)
            return
        self._metrics.grants_active.set(count)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except DomumError as exc:
                log.warning("scheduler.tick_failed detail=%s", exc.detail)
            except Exception:
                log.exception("scheduler.tick_crashed")
            await asyncio.sleep(self._interval)
