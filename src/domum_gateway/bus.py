"""In-process change notifications that keep hot-path caches honest.

The store tells the bus nothing by itself: the service that made a change publishes it
after the commit. Subscribers (the session/grant cache, live tunnels) drop or cut what
the change affects. A PostgreSQL deployment bridges the bus to LISTEN/NOTIFY so other
replicas hear the same events.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Bus", "Change", "ChangeKind"]

log = logging.getLogger("domum.bus")


class ChangeKind(enum.StrEnum):
    REQUEST = "request"  # an access request changed (revoked, expired, edited)
    SESSION = "session"  # a session ended
    GROUP = "group"  # a group's policy changed: every grant of it may change
    TARGET = "target"  # a target changed or was removed
    USER = "user"
    # cut one live connection (id: its con_ id) on whichever replica holds it
    CONNECTION = "connection"


@dataclass(frozen=True, slots=True)
class Change:
    kind: ChangeKind
    id: str
    reason: str = ""


Subscriber = Callable[[Change], None]


class Bus:
    """Synchronous fan-out; subscribers must not block (schedule work instead)."""

    def __init__(self) -> None:
        self._subs: list[Subscriber] = []
        self._remote: Callable[[Change], None] | None = None

    def subscribe(self, fn: Subscriber) -> None:
        self._subs.append(fn)

    def unsubscribe(self, fn: Subscriber) -> None:
        if fn in self._subs:
            self._subs.remove(fn)

    def set_remote(self, fn: Callable[[Change], None] | None) -> None:
        """Forward every local publication to other replicas (PostgreSQL NOTIFY)."""
        self._remote = fn

    def publish(self, change: Change, *, local_only: bool = False) -> None:
        for fn in list(self._subs):
            try:
                fn(change)
            except Exception:  # a broken subscriber must not stop the others
                log.exception("bus.subscriber_failed kind=%s", change.kind)
        if self._remote is not None and not local_only:
            self._remote(change)
