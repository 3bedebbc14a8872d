"""The one access decision: may this grant be used, now, from here, for this target?

Every enforcement point (portal, HTTP proxy, SSH terminal, SSH jump server, TCP tunnel)
gathers facts, calls :func:`decide` and acts on the value it returns. Keeping the policy
in one pure function (no clock, no I/O, no logging: the caller passes ``now`` and the
facts) means the rules are tested exhaustively in one place and cannot drift between
protocols.

Decisions are values from a closed set (``Allow``, ``Deny(reason)``, ``Challenge(kind)``).
The ``DenyReason`` travels into the audit event, the ``domum_denied_total{reason}`` metric
label and, through :func:`explain`, the sentence the user reads, so the three agree.

Anything unexpected while deciding (a naive datetime, an unparsable stored rule) yields
``Deny(DenyReason.UNKNOWN)``: the function fails closed and never raises.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import TYPE_CHECKING, Literal, TypeAlias

from domum_gateway.model import Grant, RequestStatus

if TYPE_CHECKING:
    from domum_gateway.auth.origin import CompiledOrigins, IPAddress

__all__ = [
    "ALLOW",
    "Allow",
    "Challenge",
    "Decision",
    "Deny",
    "DenyReason",
    "SessionFacts",
    "decide",
    "explain",
]


class DenyReason(enum.StrEnum):
    """Why access was refused. Closed set: values are metric labels and audit outcomes."""

    NOT_YET_OPEN = "not_yet_open"
    EXPIRED = "expired"
    REVOKED = "revoked"
    NOT_FORWARDED = "not_forwarded"
    ORIGIN_DENIED = "origin_denied"
    COUNTRY_DENIED = "country_denied"
    TARGET_NOT_GRANTED = "target_not_granted"
    SESSION_IDLE = "session_idle"
    SESSION_ENDED = "session_ended"
    ADDRESS_CHANGED = "address_changed"
    TOO_MANY_SESSIONS = "too_many_sessions"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Allow:
    """Go ahead."""

    @property
    def allowed(self) -> Literal[True]:
        return True


@dataclass(frozen=True, slots=True)
class Deny:
    """Refuse, for ``reason``; show the user ``explain(reason, ...)``."""

    reason: DenyReason

    @property
    def allowed(self) -> Literal[False]:
        return False


@dataclass(frozen=True, slots=True)
class Challenge:
    """Not yet: the caller must first obtain proof of ``kind`` (e.g. ``"otp"``)."""

    kind: str

    @property
    def allowed(self) -> Literal[False]:
        return False


Decision: TypeAlias = Allow | Deny | Challenge

ALLOW = Allow()
"""The one ``Allow`` value; the hot path returns it without allocating."""

_DENY = {reason: Deny(reason) for reason in DenyReason}


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What ``decide`` needs to know about an existing session.

    ``address`` is the normalised address the session was bound to at login.
    """

    address: str
    last_seen: datetime
    ended: bool


def decide(
    grant: Grant,
    now: datetime,
    peer: IPAddress,
    target: str | None = None,
    session: SessionFacts | None = None,
    country: str | None = None,
    origins: CompiledOrigins | None = None,
    *,
    open_sessions: int | None = None,
) -> Decision:
    """Decide whether ``grant`` may be used at ``now`` from ``peer`` (for ``target``).

    Checks, first failure wins: status (revoked, expired, not yet forwarded); the window
    ``[start, end)``; origin rules (deny wins, then allow list, then countries); the
    session (ended, bound to another address, idle for ``idle_timeout_seconds`` or more);
    with no session and ``open_sessions`` given, the grant's session limit; finally the
    target, when one is named.

    Args:
        grant: the grant as cached for enforcement.
        now: the current time (aware).
        peer: the client's address, already normalised (``origin.client_address``).
        target: the target id being reached, or None for grant-level checks (login,
            portal).
        session: facts about the current session, or None at login.
        country: the client's ISO 3166-1 alpha-2 country, or None when unknown.
        origins: the grant's rules precompiled; the hot path passes them. When None they
            are compiled (and memoised) from ``grant.origins``.
        open_sessions: at login, how many live sessions the grant already has.

    Returns:
        ``ALLOW`` or a ``Deny``; never raises (an unexpected error is
        ``Deny(DenyReason.UNKNOWN)``).
    """
    try:
        reason = _first_denial(grant, now, peer, target, session, country, origins, open_sessions)
    except Exception:
        return _DENY[DenyReason.UNKNOWN]
    return ALLOW if reason is None else _DENY[reason]


def _first_denial(
    grant: Grant,
    now: datetime,
    peer: IPAddress,
    target: str | None,
    session: SessionFacts | None,
    country: str | None,
    origins: CompiledOrigins | None,
    open_sessions: int | None,
) -> DenyReason | None:
    status = grant.status  # compared with == so a plain "revoked" string also matches
    if status == RequestStatus.REVOKED:
        return DenyReason.REVOKED
    if status == RequestStatus.EXPIRED:
        return DenyReason.EXPIRED
    if status != RequestStatus.FORWARDED:
        return DenyReason.NOT_FORWARDED
    if now < grant.start:
        return DenyReason.NOT_YET_OPEN
    if now >= grant.end:
        return DenyReason.EXPIRED
    if origins is None:
        # Imported here because origin.py imports DenyReason from this module.
        from domum_gateway.auth.origin import compile_origins

        origins = compile_origins(grant.origins)
    denied = origins.check(peer, country)
    if denied is not None:
        return denied
    if session is not None:
        if session.ended:
            return DenyReason.SESSION_ENDED
        if not _same_address(session.address, peer):
            return DenyReason.ADDRESS_CHANGED
        if now - session.last_seen >= timedelta(seconds=grant.idle_timeout_seconds):
            return DenyReason.SESSION_IDLE
    elif open_sessions is not None and open_sessions >= grant.max_sessions:
        return DenyReason.TOO_MANY_SESSIONS
    if target is not None and target not in grant.targets:
        return DenyReason.TARGET_NOT_GRANTED
    return None


def _same_address(bound: str, peer: IPAddress) -> bool:
    if bound == str(peer):
        return True
    # A differently spelled but equal address (``::FFFF:1.2.3.4``) is still the same.
    from domum_gateway.auth.origin import normalise_address

    try:
        return normalise_address(bound) == peer
    except ValueError:
        return False


def explain(reason: DenyReason, grant: Grant | None = None, tz: tzinfo = UTC) -> str:
    """A sentence the user can act on, with times shown in ``tz`` (UTC by default).

    It never says more than the person holding the grant may know: no rule contents,
    no other users, nothing about links that do not exist.
    """
    match reason:
        case DenyReason.NOT_YET_OPEN:
            if grant is None:
                return "This access is not open yet. Try again when its window starts."
            return f"This access opens at {_at(grant.start, tz)}. Try again then."
        case DenyReason.EXPIRED:
            if grant is None:
                return "This access has ended. Ask your administrator for a new one."
            return f"This access ended at {_at(grant.end, tz)}. Ask your administrator for a new one."
        case DenyReason.REVOKED:
            return "This access was withdrawn. Ask your administrator if you still need it."
        case DenyReason.NOT_FORWARDED:
            return "This access is not active yet. Ask your administrator to send you your personal link."
        case DenyReason.ORIGIN_DENIED:
            return (
                "Your address is not allowed to use this access. "
                "Connect from an approved network, or ask your administrator."
            )
        case DenyReason.COUNTRY_DENIED:
            return (
                "This access cannot be used from your current location. "
                "Connect from an approved country, or ask your administrator."
            )
        case DenyReason.TARGET_NOT_GRANTED:
            return "This access does not include that resource. Ask your administrator if you need it."
        case DenyReason.SESSION_IDLE:
            idle = "a while" if grant is None else _seconds(grant.idle_timeout_seconds)
            return (
                f"You were signed out after {idle} without activity. "
                "Open your personal link to sign in again."
            )
        case DenyReason.SESSION_ENDED:
            return "Your session has ended. Open your personal link to sign in again."
        case DenyReason.ADDRESS_CHANGED:
            return (
                "Your network address changed, so you were signed out to protect your access. "
                "Open your personal link to sign in again."
            )
        case DenyReason.TOO_MANY_SESSIONS:
            limit = "" if grant is None else f" ({grant.max_sessions})"
            return (
                f"You already have the most sessions this access allows{limit}. "
                "Sign out of another one, or wait for it to time out, then try again."
            )
        case _:
            return (
                "Access could not be checked, so it was refused. Try again in a moment; "
                "if this keeps happening, tell your administrator."
            )


def _at(instant: datetime, tz: tzinfo) -> str:
    try:
        local = instant.astimezone(tz)
    except (OverflowError, ValueError):
        local = instant  # at the edge of the calendar: show it as stored (UTC)
    return f"{local:%Y-%m-%d %H:%M} {local.tzname() or 'UTC'}"


def _seconds(total: int) -> str:
    for size, unit in ((86_400, "day"), (3600, "hour"), (60, "minute")):
        if total >= size and total % size == 0:
            count = total // size
            return f"{count} {unit}" if count == 1 else f"{count} {unit}s"
    return "1 second" if total == 1 else f"{total} seconds"
