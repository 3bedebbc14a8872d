"""What the browser terminal and the jump server share: algorithms, target lookup, watching.

* Algorithm lists. The SSH client picks the cipher (the first of *its* list that the
  server offers), and OpenSSH clients list ChaCha20-Poly1305 first. In asyncssh, AES-GCM
  runs on OpenSSL's AES-NI code and is several times faster than ChaCha20-Poly1305, so
  the jump server offers AES-GCM only: every OpenSSH since 6.2 and PuTTY since 0.76 has
  it. Strict key exchange (the Terrapin fix, ``kex-strict-*-v00@openssh.com``) is always
  negotiated by asyncssh >= 2.14.2; nothing to configure.
* :class:`SshTargets`: the SSH targets indexed by id, name and host:port, loaded once and
  dropped when the bus says targets changed, so opening a channel never waits on the store.
* :class:`SessionWatch`: the periodic check for a long-lived connection (idle timeout,
  policy changes that are not terminal for the whole session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import asyncssh

from ..audit import AuditEntry
from ..auth.decide import Deny, explain
from ..auth.origin import IPAddress
from ..bus import Bus, Change, ChangeKind
from ..errors import DomumError
from ..model import Protocol, Target
from ..store.base import Store
from .sessions import LiveSession, SessionManager

__all__ = [
    "CLIENT_ENCRYPTION",
    "CLIENT_KEX",
    "CLIENT_MAC",
    "SERVER_ENCRYPTION",
    "SERVER_KEX",
    "SERVER_MAC",
    "SessionWatch",
    "SshTargets",
    "audit",
    "parse_host_key",
]

log = logging.getLogger("domum.ssh")

# Jump server (we are the server; the client's order decides among these).
SERVER_KEX = (
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
)
SERVER_ENCRYPTION = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# Only used if a future cipher list gains a non-AEAD cipher; GCM ignores the MAC.
SERVER_MAC = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")

# Browser terminal (we are the client: our order decides). Internal hosts can be old,
# so CTR with encrypt-then-MAC SHA-2 stays as a fallback; nothing weaker.
CLIENT_KEX = (*SERVER_KEX, "diffie-hellman-group14-sha256")
CLIENT_ENCRYPTION = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
)
CLIENT_MAC = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
)


def parse_host_key(line: str | None) -> asyncssh.SSHKey | None:
    """The public key registered for a target (``ssh-ed25519 AAAA... comment``), or None."""
    if not line or not line.strip():
        return None
    try:
        return asyncssh.import_public_key(line.strip())
    except (asyncssh.KeyImportError, ValueError):
        return None


async def audit(
    store: Store,
    actor: str,
    action: str,
    subject: str,
    outcome: str,
    origin: str,
    details: dict[str, str | int],
) -> None:
    """Append an audit event; a failing store is logged, never raised into a connection."""
    try:
        await store.append_audit(
            AuditEntry(
                actor=actor, action=action, subject=subject, outcome=outcome, origin=origin, details=details
            )
        )
    except DomumError as exc:
        log.warning("ssh.audit_failed action=%s detail=%s", action, exc.detail)


@dataclass(frozen=True, slots=True)
class _Index:
    known: frozenset[str]  # ids of every target, any protocol
    by_id: dict[str, Target]
    by_name: dict[str, Target]
    by_address: dict[tuple[str, int], list[Target]]


class SshTargets:
    """SSH targets in memory, reloaded after the bus reports a target change."""

    def __init__(self, store: Store, bus: Bus) -> None:
        self._store = store
        self._bus = bus
        self._index: _Index | None = None
        self._generation = 0
        bus.subscribe(self._on_change)

    def close(self) -> None:
        self._bus.unsubscribe(self._on_change)

    def _on_change(self, change: Change) -> None:
        if change.kind is ChangeKind.TARGET:
            self._index = None
            self._generation += 1

    async def _get(self) -> _Index:
        index = self._index
        if index is not None:
            return index
        generation = self._generation
        every = await self._store.list_targets()
        targets = [t for t in every if t.protocol is Protocol.SSH]
        by_address: dict[tuple[str, int], list[Target]] = {}
        for t in targets:
            if t.host and t.port:
                by_address.setdefault((t.host.lower(), t.port), []).append(t)
        index = _Index(
            frozenset(t.id for t in every),
            {t.id: t for t in targets},
            {t.name.lower(): t for t in targets},
            by_address,
        )
        if generation == self._generation:  # a change during the load makes it stale
            self._index = index
        return index

    async def _fresh(self, wanted: frozenset[str] | str) -> _Index:
        """The index, reloaded once if it predates a target it should know.

        Creating a target publishes nothing on the bus, so a target granted (or named)
        after the last load is a miss here; one reload settles it.
        """
        index = await self._get()
        missing = (
            not wanted <= index.known
            if isinstance(wanted, frozenset)
            else wanted not in index.by_id and wanted.lower() not in index.by_name
        )
        if missing:
            self._index = None
            index = await self._get()
        return index

    async def get(self, id_or_name: str) -> Target | None:
        """An SSH target by id or by name (case-insensitive)."""
        index = await self._fresh(id_or_name)
        return index.by_id.get(id_or_name) or index.by_name.get(id_or_name.lower())

    async def resolve(self, host: str, port: int, granted: frozenset[str]) -> Target | None:
        """The granted target a ``direct-tcpip`` request names, or None.

        A request names a target by its registered host and port, or by the target's
        name as host (with the registered port, or 22 because that is what ``ssh``
        sends when no port is given).
        """
        index = await self._fresh(granted)
        for t in index.by_address.get((host.lower(), port), ()):
            if t.id in granted:
                return t
        named = index.by_name.get(host.lower())
        if named is not None and named.id in granted and port in (named.port, 22):
            return named
        return None


class SessionWatch:
    """Re-checks a session every ``interval`` seconds while a connection lives.

    Traffic marks the session active (``mark``); the watch turns that into one
    ``SessionManager.touch`` per tick, so the hot path only sets a flag. A terminal
    denial (idle, expired, revoked...) ends the whole session through the manager, which
    calls every attached closer; any other denial (the target left the grant) is passed
    to ``on_deny`` with the sentence to show.
    """

    def __init__(
        self,
        sessions: SessionManager,
        live: LiveSession,
        peer: IPAddress,
        target_id: str | None,
        on_deny: Callable[[str], None],
        on_tick: Callable[[], None] | None = None,
        interval: float | None = None,
    ) -> None:
        self._sessions = sessions
        self._live = live
        self._peer = peer
        self._target_id = target_id
        self._on_deny = on_deny
        self._on_tick = on_tick
        idle = max(1, live.grant.idle_timeout_seconds)
        self.interval = interval if interval is not None else min(30.0, max(1.0, idle / 4))
        self.active = False
        self._task: asyncio.Task[None] | None = None

    def mark(self) -> None:
        """The user sent something: activity for the session's idle timer, now."""
        self.active = True
        self._live.active()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def check_now(self) -> bool:
        """One check; returns False (after acting) when the connection must end."""
        if self._on_tick is not None:
            self._on_tick()  # may mark() from counters it flushes
        if self.active:
            self.active = False
            self._sessions.touch(self._live)
        if self._live.ended:
            return False
        decision = self._sessions.check(self._live, self._peer, self._target_id, activity=False)
        if isinstance(decision, Deny):
            if not self._live.ended:  # not terminal for the session: end this connection only
                self._on_deny(explain(decision.reason, self._live.grant))
            return False
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self.check_now():
                return
