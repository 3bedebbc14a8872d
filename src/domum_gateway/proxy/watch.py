"""Live watch: a read-only, in-memory fan-out of browser SSH terminals to auditors.

The terminal (``proxy/terminal.py``) opens a :class:`Channel` on the :class:`WatchHub`
under its live-registry id (``con_...``) and publishes the bytes it has just sent to the
user, plus its size when it changes. An auditor or administrator (``GET
/api/v1/sessions/{id}/watch`` on the admin listener) subscribes a :class:`Watcher` and
:meth:`Watcher.relay` streams to their websocket: first ``{"type": "size", "cols": C,
"rows": R}`` as a text frame, then the terminal's output as binary frames, and every size
change as another text frame.

Guarantees:

* Nothing is kept: output is passed by reference to each watcher's queue and dropped
  once sent; there is no scrollback, recording or replay. A watcher sees the terminal
  from the moment it joins.
* A watcher never slows the user: :meth:`Channel.publish` is synchronous and never
  waits. Each watcher has a queue bounded in bytes; one that falls behind is dropped
  and its websocket closed (1008) with a reason saying so.
* Read-only: what a watcher sends is read and thrown away, never forwarded; frames over
  a few KiB close its socket.
* The watched person is told: a line appears in their terminal when someone starts and
  stops watching, naming them and their role.
* When the terminal ends (exit, logout, revoke, terminate, window end, shutdown) every
  watcher's websocket closes with the terminal's reason (1000 for a normal end, 1008
  when it was cut, 1001 when the gateway shuts down).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable

from aiohttp import WSMsgType, web

from ..errors import Conflict, NotFound

__all__ = ["MAX_WATCHERS", "QUEUE_BYTES", "Channel", "WatchHub", "Watcher"]

log = logging.getLogger("domum.ssh.watch")

QUEUE_BYTES = 1024 * 1024
"""How much output may wait for one watcher before it is dropped as too slow."""

MAX_WATCHERS = 8
"""Watchers of one terminal at once."""

_DRAIN = 5.0  # seconds a watcher gets to receive the last output after the terminal ends
_CLOSE_TIMEOUT = 10.0  # bounds the closing handshake with a watcher that stopped reading
_NAME_CHARS = 64

Notify = Callable[[bytes], None]
"""Writes a line into the watched person's terminal (without waiting)."""


def _printable(text: str, limit: int = _NAME_CHARS) -> str:
    """``text`` safe to print inside a terminal line: no control or escape characters."""
    clean = "".join(c if c.isprintable() else "?" for c in text)[:limit]
    return clean or "someone"


def close_reason(text: str) -> str:
    """A websocket close reason: at most 123 bytes of UTF-8, cut on a character boundary."""
    data = text.encode()
    if len(data) <= 123:
        return text
    return data[:120].decode(errors="ignore") + "..."


class Watcher:
    """One person watching one terminal: a bounded queue and the websocket relay."""

    def __init__(self, channel: Channel, name: str, role: str, limit: int) -> None:
        self.channel = channel
        self.name = _printable(name)
        self.role = _printable(role, 16)
        self.limit = limit
        self._items: deque[bytes | str] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()
        self.ending: tuple[int, str] | None = None
        self.dropped = False
        self.announced = False
        self.left = False

    # fed by the channel (synchronous, never waits) --------------------------------
    def offer(self, item: bytes | str) -> None:
        if self.ending is not None:
            return
        size = len(item)
        if self._queued + size > self.limit:
            self.dropped = True
            log.info(
                "watch.dropped connection=%s watcher=%s (fell behind)", self.channel.connection_id, self.name
            )
            self._items.clear()
            self._queued = 0
            self.end(1008, "the watcher fell behind the terminal's output; reopen to keep watching")
            return
        self._items.append(item)
        self._queued += size
        self._wake.set()

    def end(self, code: int, reason: str) -> None:
        """Stop this watcher: what is queued is still sent (unless it was dropped), then close."""
        if self.ending is None:
            self.ending = (code, close_reason(reason))
            self._ended.set()
            self._wake.set()

    async def _next(self) -> bytes | str | None:
        while not self._items:
            if self.ending is not None:
                return None
            self._wake.clear()
            await self._wake.wait()
        item = self._items.popleft()
        self._queued -= len(item)
        return item

    # the websocket ----------------------------------------------------------------
    async def relay(self, ws: web.WebSocketResponse) -> str:
        """Stream the terminal to ``ws`` until either side ends; return why (then :meth:`close`)."""
        self.channel.announce(self)
        sender = asyncio.ensure_future(self._send(ws))
        reader = asyncio.ensure_future(_discard_input(ws))
        ended = asyncio.ensure_future(self._ended.wait())
        tasks = {sender, reader, ended}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if ended in done and not self.dropped and not sender.done() and not reader.done():
                # The terminal ended: let its last output through, for a bounded time.
                await asyncio.wait({sender, reader}, timeout=_DRAIN, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.leave()
        if self.ending is None:
            # The watcher closed its side (or its connection broke).
            self.ending = (1000, "the watcher left")
        return self.ending[1]

    async def close(self, ws: web.WebSocketResponse) -> None:
        """Close ``ws`` with the reason watching ended; bounded, even if the watcher stalls."""
        code, reason = self.ending or (1000, "the watch ended")
        if not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError, asyncio.TimeoutError):
                await asyncio.wait_for(ws.close(code=code, message=reason.encode()), _CLOSE_TIMEOUT)

    async def _send(self, ws: web.WebSocketResponse) -> None:
        while True:
            item = await self._next()
            if item is None:
                return
            if isinstance(item, bytes):
                await ws.send_bytes(item)
            else:
                await ws.send_str(item)

    def leave(self) -> None:
        """Unsubscribe (idempotent); the watched person sees that watching stopped."""
        if not self.left:
            self.left = True
            self.channel.remove(self)


async def _discard_input(ws: web.WebSocketResponse) -> None:
    """Read what the watcher sends (pings, closes) and throw any data away: read-only."""
    ignored = 0
    async for msg in ws:
        if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
            ignored += 1
            if ignored == 1:
                log.info("watch.input_ignored (watchers are read-only)")
        else:
            return


class Channel:
    """One watchable terminal."""

    def __init__(self, hub: WatchHub, connection_id: str, cols: int, rows: int, notify: Notify) -> None:
        self.hub = hub
        self.connection_id = connection_id
        self.cols, self.rows = cols, rows
        self._notify = notify
        self.watchers: set[Watcher] = set()
        self.ending: tuple[int, str] | None = None

    def publish(self, data: bytes) -> None:
        """Bytes the terminal has just sent to its user (called on the hot path)."""
        if self.watchers and data:
            for watcher in list(self.watchers):
                watcher.offer(data)

    def resize(self, cols: int, rows: int) -> None:
        if (cols, rows) != (self.cols, self.rows):
            self.cols, self.rows = cols, rows
            for watcher in list(self.watchers):
                watcher.offer(self._size())

    def _size(self) -> str:
        return json.dumps({"type": "size", "cols": self.cols, "rows": self.rows})

    def subscribe(self, name: str, role: str) -> Watcher:
        if self.ending is not None:
            raise NotFound("This terminal has just ended.")
        if len(self.watchers) >= self.hub.max_watchers:
            raise Conflict(f"This terminal already has {self.hub.max_watchers} watchers.")
        watcher = Watcher(self, name, role, self.hub.queue_bytes)
        watcher.offer(self._size())
        self.watchers.add(watcher)
        return watcher

    def announce(self, watcher: Watcher) -> None:
        """Tell the watched person that ``watcher`` is watching (once)."""
        if self.ending is None and watcher in self.watchers and not watcher.announced:
            watcher.announced = True
            self._notify(_line(f"*** {watcher.name} ({watcher.role}) is watching this session ***"))

    def remove(self, watcher: Watcher) -> None:
        if watcher in self.watchers:
            self.watchers.discard(watcher)
            if self.ending is None and watcher.announced:
                self._notify(_line(f"*** {watcher.name} ({watcher.role}) stopped watching this session ***"))

    def end(self, code: int, reason: str) -> None:
        """The terminal ended: close every watcher with its reason."""
        if self.ending is not None:
            return
        code = code if code in (1000, 1001) else 1008
        self.ending = (code, reason)
        for watcher in list(self.watchers):
            watcher.end(code, f"the watched session ended: {reason}")


def _line(text: str) -> bytes:
    return f"\r\n\x1b[1;33m{text}\x1b[0m\r\n".encode()


class WatchHub:
    """The watchable terminals of one gateway process, by live-registry connection id."""

    def __init__(self, *, queue_bytes: int = QUEUE_BYTES, max_watchers: int = MAX_WATCHERS) -> None:
        self.queue_bytes = queue_bytes
        self.max_watchers = max_watchers
        self._channels: dict[str, Channel] = {}

    def open(self, connection_id: str, cols: int, rows: int, notify: Notify) -> Channel:
        """Make a terminal watchable (the terminal calls this once it is registered)."""
        channel = Channel(self, connection_id, cols, rows, notify)
        self._channels[connection_id] = channel
        return channel

    def close(self, channel: Channel, code: int, reason: str) -> None:
        """The terminal ended: forget it and close its watchers (idempotent)."""
        if self._channels.get(channel.connection_id) is channel:
            del self._channels[channel.connection_id]
        channel.end(code, reason)

    def subscribe(self, connection_id: str, name: str, role: str) -> Watcher:
        """A new watcher of the terminal ``connection_id``; NotFound or Conflict otherwise.

        Nothing is shown to the watched person until :meth:`Watcher.relay` starts.
        """
        channel = self._channels.get(connection_id)
        if channel is None:
            raise NotFound("No browser SSH terminal with this id is live on this gateway.")
        return channel.subscribe(name, role)

    def shutdown(self, reason: str) -> None:
        """Close every watcher (the admin listener is going away); terminals go on."""
        for channel in list(self._channels.values()):
            for watcher in list(channel.watchers):
                watcher.end(1001, reason)
