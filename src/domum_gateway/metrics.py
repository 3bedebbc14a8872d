"""Prometheus metrics, one registry per gateway instance (so tests can build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


class Metrics:
    """Every ``domum_`` metric from DESIGN.md. Labels never carry secrets or user data."""

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
        self.proxy_duration = Histogram(
            "domum_proxy_request_duration_seconds",
            "Proxied HTTP request duration",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.denied = Counter("domum_denied_total", "Refused access decisions", ["reason"], registry=r)
        self.api_requests = Counter(
            "domum_api_requests_total", "Control API requests", ["method", "status"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
