"""LISTEN/NOTIFY between replicas: every replica hears the changes the others publish.

Each replica listens on channel ``domum_changes`` over one dedicated connection and sends
its own changes with ``pg_notify`` through the store's pool, one at a time and in order.
A payload is compact JSON ``{"i": instance, "k": kind, "id": id, "r": reason}``; a
replica ignores payloads carrying its own instance id (it already published them
locally).

The listening connection is watched (termination callback plus a periodic ``SELECT 1``).
When it is lost the feed reports itself down (the store's ``ping`` fails, so readiness
turns 503), reconnects with capped exponential backoff, and delivers
:func:`everything_changed` both when it notices the loss and after it is back: a change
published meanwhile was never heard, so every cached grant and target is dropped and every
live session re-checked against the database (which fails closed while that is
unreachable). An id of ``"*"`` means "anything of this kind may have changed";
subscribers must treat it as such.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from ..bus import Change, ChangeKind
from ..errors import DomumError

__all__ = ["CHANNEL", "ChangeFeed", "decode_change", "encode_change", "everything_changed"]

log = logging.getLogger("domum.notify")

CHANNEL = "domum_changes"
# PostgreSQL refuses payloads of 8000 bytes or more; ids are short, reasons are bounded.
_MAX_REASON = 500


def everything_changed() -> tuple[Change, ...]:
    """The changes that make every cache re-read what it holds.

    ``GROUP`` makes the session cache drop every grant and re-check every live session;
    ``TARGET`` makes the target caches (tunnels, SSH) reload.
    """
    return (Change(ChangeKind.GROUP, "*"), Change(ChangeKind.TARGET, "*"))


def encode_change(instance_id: str, change: Change) -> str:
    return json.dumps(
        {"i": instance_id, "k": change.kind.value, "id": change.id, "r": change.reason[:_MAX_REASON]},
        separators=(",", ":"),
        ensure_ascii=False,
    )


def decode_change(payload: str) -> tuple[str, Change] | None:
    """(sender instance id, change), or None for a payload that is not ours."""
    try:
        data = json.loads(payload)
        return str(data["i"]), Change(ChangeKind(data["k"]), str(data["id"]), str(data.get("r", "")))
    except (ValueError, KeyError, TypeError):
        return None


class ChangeFeed:
    """One replica's end of the channel: a listening connection and an ordered sender.

    Args:
        instance_id: this replica's id; payloads carrying it are our own and ignored.
        connect: opens a new dedicated connection (asyncpg); may raise anything.
        send: sends one payload with ``pg_notify`` (raises ``DomumError`` on failure).
        on_change: receives every change published by another replica, and the
            changes of :func:`everything_changed` when the connection drops and when it
            is back.
        timeout: seconds for connecting and for each health check.
    """

    def __init__(
        self,
        *,
        instance_id: str,
        connect: Callable[[], Awaitable[Any]],
        send: Callable[[str], Awaitable[None]],
        on_change: Callable[[Change], None],
        timeout: float = 5.0,
        health_interval: float = 2.0,
        max_backoff: float = 5.0,
        send_patience: float = 30.0,
        queue_limit: int = 10_000,
    ) -> None:
        self.instance_id = instance_id
        self._connect = connect
        self._send = send
        self._on_change = on_change
        self._timeout = timeout
        self._health_interval = health_interval
        self._max_backoff = max_backoff
        self._send_patience = send_patience
        self._queue: asyncio.Queue[str] = asyncio.Queue(queue_limit)
        self._conn: Any = None
        self._lost = asyncio.Event()
        self._connected = False
        self._listener_task: asyncio.Task[None] | None = None
        self._sender_task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def connected(self) -> bool:
        """True while the listening connection is up (notifications are being heard)."""
        return self._connected

    async def start(self) -> None:
        """Connect once (raising on failure), then keep listening in the background."""
        self._conn = await self._open()
        self._connected = True
        self._listener_task = asyncio.create_task(self._listen_loop(), name="domum-notify-listen")
        self._sender_task = asyncio.create_task(self._send_loop(), name="domum-notify-send")

    async def stop(self) -> None:
        """Send what is queued (briefly), then stop listening and close the connection."""
        self._stopping = True
        if self._sender_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout=1.0)
        for task in (self._listener_task, self._sender_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._listener_task = self._sender_task = None
        self._connected = False
        await self._close(self._conn)
        self._conn = None

    def publish(self, change: Change) -> None:
        """Queue a local change for the other replicas (the Bus's remote hook: never blocks)."""
        if self._stopping:
            return
        payload = encode_change(self.instance_id, change)
        if self._queue.full():
            log.warning("notify.queue_full dropped_oldest=1")
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
                self._queue.task_done()
        self._queue.put_nowait(payload)

    # listening -------------------------------------------------------------------
    async def _open(self) -> Any:
        conn = await asyncio.wait_for(self._connect(), timeout=self._timeout + 1.0)
        try:
            self._lost = asyncio.Event()
            lost = self._lost
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(CHANNEL, self._on_notify)
        except BaseException:
            await self._close(conn)
            raise
        return conn

    async def _close(self, conn: Any) -> None:
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), timeout=1.0)
        except Exception:  # already dead or hung: drop it without a goodbye
            conn.terminate()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        decoded = decode_change(payload)
        if decoded is None:
            log.warning("notify.unreadable_payload")
            return
        sender, change = decoded
        if sender == self.instance_id:
            return
        self._deliver(change)

    def _deliver(self, change: Change) -> None:
        try:
            self._on_change(change)
        except Exception:
            log.exception("notify.subscriber_failed kind=%s", change.kind)

    def _resync(self) -> None:
        for change in everything_changed():
            self._deliver(change)

    async def _listen_loop(self) -> None:
        while True:
            try:
                await self._watch(self._conn)
            except Exception:  # never let the watcher die silently: treat it as a loss
                log.exception("notify.watch_failed")
            self._connected = False
            log.warning("notify.listener_lost reconnecting=1")
            await self._close(self._conn)
            self._conn = None
            # Whatever was published from now on is unheard: re-check everything.
            self._resync()
            self._conn = await self._reconnect()
            self._connected = True
            log.info("notify.listener_restored")
            self._resync()

    async def _watch(self, conn: Any) -> None:
        """Return once the listening connection is gone or stops answering."""
        while not self._lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout=self._health_interval)
            if self._lost.is_set() or conn.is_closed():
                return
            try:
                await conn.fetchval("SELECT 1", timeout=self._timeout)
            except Exception as exc:
                log.warning("notify.health_check_failed error=%s", type(exc).__name__)
                return

    async def _reconnect(self) -> Any:
        delay = 0.1
        while True:
            try:
                return await self._open()
            except Exception as exc:
                log.warning("notify.reconnect_failed error=%s retry_in=%.1f", type(exc).__name__, delay)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self._max_backoff)

    # sending ---------------------------------------------------------------------
    async def _send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            payload = await self._queue.get()
            try:
                deadline = loop.time() + self._send_patience
                delay = 0.1
                while True:
                    try:
                        await self._send(payload)
                        break
                    except DomumError as exc:
                        if loop.time() >= deadline:
                            log.error("notify.dropped detail=%s", exc.detail)
                            break
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._max_backoff)
            finally:
                self._queue.task_done()
