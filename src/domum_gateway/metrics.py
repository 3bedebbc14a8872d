"""Prometheus metrics, one registry per gateway instance (so tests can build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """The ``domum_`` metrics shared across modules. Labels never carry secrets or user data.

    ``domum_proxy_request_duration_seconds`` is rendered by the HTTP proxy's own collector
    (labelled by target and status class, counted without locks on the hot path).
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
