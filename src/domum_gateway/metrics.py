"""Prometheus metrics, one registry per gateway instance (so tests can build many)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CUTOFF_BUCKETS", "CUTOFF_CAUSES", "Metrics"]

log = logging.getLogger("domum.metrics")

CUTOFF_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Cut-off latency buckets: 1 ms to 5 s (the contract is "within one second")."""

CUTOFF_CAUSES = ("revoke", "window_end", "logout", "idle", "terminate", "address_change")
"""Causes shown (at zero) before the first cut; others (``origin``, ``policy``, ``shutdown``,
``unconfirmed``) appear when they happen."""

Refresher = Callable[[], Awaitable[None]]


class Metrics:
    """The ``domum_`` metrics shared across modules. Labels never carry secrets or user data.

    ``domum_proxy_request_duration_seconds`` is rendered by the HTTP proxy's own collector
    (labelled by target and status class, counted without locks on the hot path).

    ``domum_grants_active`` is the store's truth, not a local count: a refresher (registered
    by the scheduler) recounts it before each scrape, so every replica sharing one database
    reports the same figure. ``domum_cutoff_seconds`` has one observation per connection
    cut: from the decision (bus event, window-end timer, API call, failed check) until
    the connection's owner reports it closed.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.logins = Counter("domum_logins_total", "Remote-user login attempts", ["outcome"], registry=r)
        self.tokens_sent = Counter(
            "domum_tokens_sent_total", "One-time tokens sent", ["channel", "outcome"], registry=r
        )
        self.links_sent = Counter(
            "domum_links_sent_total", "Personal links forwarded", ["channel", "outcome"], registry=r
        )
        self.sessions_active = Gauge(
            "domum_sessions_active", "Live sessions and tunnels", ["protocol"], registry=r
        )
        self.tunnel_bytes = Counter(
            "domum_tunnel_bytes_total", "Bytes carried", ["protocol", "direction"], registry=r
        )
        self.denied = Counter("domum_denied_total", "Refused access decisions", ["reason"], registry=r)
        self.api_requests = Counter(
            "domum_api_requests_total", "Control API requests", ["method", "status"], registry=r
        )
        self.grants_active = Gauge(
            "domum_grants_active",
            "Forwarded access requests whose window is open now (counted in the store at scrape time)",
            registry=r,
        )
        self.cutoff = Histogram(
            "domum_cutoff_seconds",
            "Time from the decision to cut a connection until it is closed",
            ["cause"],
            buckets=CUTOFF_BUCKETS,
            registry=r,
        )
        for cause in CUTOFF_CAUSES:
            self.cutoff.labels(cause)
        self._refreshers: list[Refresher] = []

    def add_refresher(self, fn: Refresher) -> None:
        """Run ``fn`` before each scrape (to recount values whose truth lives elsewhere)."""
        self._refreshers.append(fn)

    async def refresh(self) -> None:
        """Run the refreshers; one that fails leaves its last value and is logged."""
        for fn in self._refreshers:
            try:
                await fn()
            except Exception:
                log.exception("metrics.refresh_failed")

    def render(self) -> bytes:
        return generate_latest(self.registry)
