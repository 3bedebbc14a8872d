"""Background housekeeping: mark ended windows expired and cut what they allowed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..errors import DomumError
from ..store.base import Store
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
    ) -> None:
        self._service = service
        self._store = store
        self._retention = retention
        self._interval = interval
        self._purge_every = purge_every
        self._last_purge = float("-inf")
        self._task: asyncio.Task[None] | None = None

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
        if self._retention is not None and now - self._last_purge >= self._purge_every:
            self._last_purge = now
            await self._retention.purge(Actor("system:retention"))

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except DomumError as exc:
                log.warning("scheduler.tick_failed detail=%s", exc.detail)
            except Exception:
                log.exception("scheduler.tick_crashed")
            await asyncio.sleep(self._interval)
