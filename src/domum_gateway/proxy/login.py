"""Personal link + one-time token login, shared by the web pages and the SSH jump server.

One code path for every door: the same link lookup, the same send limits, the same
atomic token redemption, the same session creation. Callers turn :class:`LoginRefused`
into a page, a websocket close or an SSH auth failure; its ``message`` is written for
the person at the keyboard and never says whether a link exists to someone without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

from ..audit import AuditEntry
from ..auth.decide import Deny, DenyReason, decide, explain
from ..auth.origin import IPAddress
from ..auth.secrets import hash_secret, link_code_from, new_otp, normalise_otp
from ..clock import Clock
from ..errors import DeliveryError, DomumError, TooManyRequests
from ..metrics import Metrics
from ..model import AccessRequest, Grant, RemoteUser, RequestStatus
from ..store.base import OtpResult, Store
from .geoip import CountryLookup
from .sessions import LiveSession, SessionManager, TooManySessions

__all__ = [
    "GENERIC_REFUSAL",
    "LinkInfo",
    "LoginRefused",
    "LoginService",
    "RateLimiter",
    "TokenSender",
]

log = logging.getLogger("domum.login")

OTP_TTL = timedelta(minutes=5)
MAX_TRIES = 5
MAX_SENDS_PER_HOUR = 5

GENERIC_REFUSAL = (
    "This link or token is not valid. Check that you used the latest message you received, "
    "or ask the person who arranged your access for a new link."
)

TokenSender = Callable[[RemoteUser, str], Awaitable[None]]
"""Sends a one-time token on the user's channel (raises DeliveryError)."""


class LoginRefused(DomumError):
    """A login step was refused; ``message`` is safe to show to whoever asked."""

    status = 403
    type = "login-refused"
    title = "Access refused"

    def __init__(self, detail: str, reason: str = "invalid", status: int = 403) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """A link that matched a stored request (only ever built for a real link)."""

    request: AccessRequest
    user: RemoteUser
    grant: Grant


class RateLimiter:
    """Fixed-window counter per key (per client address), in memory, bounded in size."""

    def __init__(self, limit: int, window: float, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._hits: dict[str, tuple[float, int]] = {}

    def hit(self, key: str) -> int:
        """Count one hit; return 0 if allowed, else seconds until the window resets."""
        now = time.monotonic()
        start, count = self._hits.get(key, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        count += 1
        if len(self._hits) >= self.max_keys and key not in self._hits:
            self._prune(now)
        self._hits[key] = (start, count)
        if count > self.limit:
            return max(1, int(self.window - (now - start)) + 1)
        return 0

    def _prune(self, now: float) -> None:
        for k in [k for k, (s, _) in self._hits.items() if now - s >= self.window]:
            del self._hits[k]
        if len(self._hits) >= self.max_keys:  # still full: forget the oldest half
            for k in sorted(self._hits, key=lambda k: self._hits[k][0])[: self.max_keys // 2]:
                del self._hits[k]


class LoginService:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        sessions: SessionManager,
        send_token: TokenSender,
        metrics: Metrics,
        *,
        per_ip_limit: int = 60,
        per_ip_window: float = 60.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._sessions = sessions
        self._send = send_token
        self._metrics = metrics
        self.ip_limiter = RateLimiter(per_ip_limit, per_ip_window)
        # Set by the composition root when ``geoip.database`` is configured.
        self.countries: CountryLookup | None = None

    def country_of(self, peer: IPAddress) -> str | None:
        """The client's country for origin rules (None without a GeoIP database)."""
        return self.countries.country(peer) if self.countries is not None else None

    def limit_client(self, client: str) -> None:
        """Per-client-address limit on every login endpoint (429 with Retry-After)."""
        wait = self.ip_limiter.hit(client)
        if wait:
            self._metrics.denied.labels("rate_limited").inc()
            raise TooManyRequests("Too many attempts from your address. Wait a moment and try again.", wait)

    async def resolve_link(self, raw: str) -> LinkInfo | None:
        """The request behind a personal link (full URL or code), or None."""
        code = link_code_from(raw)
        if code is None:
            return None
        request = await self._store.find_request_by_link(hash_secret(code))
        if request is None:
            return None
        user = await self._store.get_user(request.user_id)
        if user is None or user.purged_at is not None:
            return None
        loaded = await self._sessions.grant_for(request)
        if loaded is None:
            return None
        return LinkInfo(request, user, loaded[0])

    def window_refusal(
        self, info: LinkInfo | None, peer: IPAddress, country: str | None = None
    ) -> LoginRefused | None:
        """Why this link cannot be used now from ``peer`` (None when it can).

        ``country`` defaults to the GeoIP lookup of ``peer`` (when a database is set).
        """
        if info is None or info.request.status in (RequestStatus.REVOKED, RequestStatus.SAVED):
            return LoginRefused(GENERIC_REFUSAL, "invalid_link")
        if country is None and info.grant.origins.countries:
            country = self.country_of(peer)
        decision = decide(info.grant, self._clock.now(), peer, country=country)
        if isinstance(decision, Deny):
            if decision.reason in (DenyReason.REVOKED, DenyReason.NOT_FORWARDED, DenyReason.UNKNOWN):
                return LoginRefused(GENERIC_REFUSAL, "invalid_link")
            return LoginRefused(explain(decision.reason, info.grant), decision.reason.value)
        return None

    async def send_token(self, info: LinkInfo | None, peer: IPAddress, origin: str) -> None:
        """Send a fresh token (invalidating the previous one) on the user's channel."""
        refusal = self.window_refusal(info, peer)
        if refusal is not None:
            self._metrics.denied.labels(refusal.reason).inc()
            if info is not None:
                await self._audit(info, "token.refused", refusal.reason, origin)
            raise refusal
        assert info is not None
        channel = info.user.channel.value
        otp = new_otp()
        digest = hash_secret(otp)
        now = self._clock.now()
        issue = await self._store.issue_otp(info.request.id, digest, now, now + OTP_TTL, MAX_SENDS_PER_HOUR)
        if not issue.issued:
            self._metrics.tokens_sent.labels(channel, "limited").inc()
            await self._audit(info, "token.limited", "denied", origin)
            raise TooManyRequests(
                f"Too many tokens were sent for this link in the last hour. Try again in "
                f"{(issue.retry_after + 59) // 60} minute(s).",
                issue.retry_after,
            )
        try:
            await self._send(info.user, otp)
        except DeliveryError:
            await self._store.cancel_otp_send(info.request.id, digest)
            self._metrics.tokens_sent.labels(channel, "error").inc()
            await self._audit(info, "token.send_failed", "error", origin)
            raise
        self._metrics.tokens_sent.labels(channel, "ok").inc()
        await self._audit(info, "token.sent", "ok", origin, {"channel": channel})

    async def verify(
        self, info: LinkInfo | None, raw_token: str, peer: IPAddress, origin: str
    ) -> tuple[str, LiveSession]:
        """Redeem a token and open a session; return (cookie value, session)."""
        refusal = self.window_refusal(info, peer)
        if refusal is not None:
            self._metrics.logins.labels(refusal.reason).inc()
            self._metrics.denied.labels(refusal.reason).inc()
            if info is not None:
                await self._audit(info, "login.refused", refusal.reason, origin)
            raise refusal
        assert info is not None
        token = normalise_otp(raw_token)
        if token is None:
            # Malformed input is not counted as a try, but says nothing more than a wrong one.
            self._metrics.logins.labels("wrong_token").inc()
            await self._audit(info, "login.refused", "wrong_token", origin)
            raise LoginRefused(GENERIC_REFUSAL, "wrong_token")
        # Checked before the token is spent, so a user at the limit keeps the token for
        # after they log out elsewhere; ``open`` checks again atomically.
        if await self._sessions.at_capacity(info.request):
            await self._too_many_sessions(info, origin)
        result = await self._store.redeem_otp(
            info.request.id, hash_secret(token), self._clock.now(), MAX_TRIES
        )
        if result is not OtpResult.OK:
            self._metrics.logins.labels(result.value).inc()
            self._metrics.denied.labels(f"token_{result.value}").inc()
            await self._audit(info, "login.refused", result.value, origin)
            if result is OtpResult.EXPIRED:
                raise LoginRefused("This token has expired. Ask for a new one.", "token_expired")
            if result is OtpResult.EXHAUSTED:
                raise LoginRefused(
                    "This token can no longer be used (already used, or too many wrong tries). "
                    "Ask for a new one.",
                    "token_exhausted",
                )
            raise LoginRefused(GENERIC_REFUSAL, "wrong_token")
        try:
            cookie, live = await self._sessions.open(info.request, peer, origin)
        except TooManySessions:
            await self._too_many_sessions(info, origin)
        self._metrics.logins.labels("ok").inc()
        await self._audit(info, "login.succeeded", "ok", origin, {"session_id": live.id})
        return cookie, live

    async def _too_many_sessions(self, info: LinkInfo, origin: str) -> NoReturn:
        reason = DenyReason.TOO_MANY_SESSIONS
        self._metrics.logins.labels(reason.value).inc()
        self._metrics.denied.labels(reason.value).inc()
        await self._audit(info, "login.refused", reason.value, origin)
        raise TooManySessions(explain(reason, info.grant))

    async def _audit(
        self, info: LinkInfo, action: str, outcome: str, origin: str, details: dict[str, str] | None = None
    ) -> None:
        try:
            await self._store.append_audit(
                AuditEntry(
                    actor=f"user:{info.user.id}",
                    action=action,
                    subject=info.request.id,
                    outcome=outcome,
                    origin=origin,
                    details={"request_id": info.request.id, **(details or {})},
                )
            )
        except DomumError as exc:
            log.warning("login.audit_failed action=%s detail=%s", action, exc.detail)
            raise
