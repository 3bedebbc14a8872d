"""What every public-listener module receives from the composition root, and shared helpers.

``PublicContext`` is handed to each ``add_*_routes`` function; ``client_of`` and
``session_of`` are the one way to learn who is asking, so the trusted-proxy rule and
the cookie lookup are the same for pages, the HTTP proxy, tunnels and terminals.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from aiohttp import web

from ..auth.origin import IPAddress, client_address, normalise_address
from ..bus import Bus
from ..clock import Clock
from ..metrics import Metrics
from ..settings import Settings
from ..store.base import Store
from .login import LoginService
from .sessions import LiveSession, SessionManager

__all__ = ["COOKIE", "CTX", "PublicContext", "client_of", "session_of"]

COOKIE = "__Host-domum"


@dataclass(slots=True)
class PublicContext:
    settings: Settings
    store: Store
    clock: Clock
    bus: Bus
    metrics: Metrics
    sessions: SessionManager
    login: LoginService
    # The SSH jump port users connect to, when it differs from ``ssh.listen`` (behind NAT,
    # or an ephemeral port in tests); the portal's ``ssh -J`` line shows it.
    ssh_port: int | None = None

    @property
    def trusted_proxies(self) -> tuple[IPv4Network | IPv6Network, ...]:
        return self.settings.public.trusted_proxies


CTX = web.AppKey("public_ctx", PublicContext)
_CLIENT = web.RequestKey("client_address", str)


def client_of(request: web.Request) -> IPAddress:
    """The client's address: the socket peer, or X-Forwarded-For behind a trusted proxy."""
    cached = request.get(_CLIENT)
    if cached is not None:
        return normalise_address(cached)
    ctx = request.app[CTX]
    peer = request.transport.get_extra_info("peername") if request.transport else None
    peer_host = str(peer[0]) if peer else "0.0.0.0"
    if ctx.trusted_proxies:
        forwarded = request.headers.getall("X-Forwarded-For", [])
        if forwarded and _names_forwarded_for(request.headers.getall("Connection", [])):
            # "Connection: X-Forwarded-For" asks hops to drop the header; one that reached
            # us anyway was not vouched for by our proxy. Fall back to the proxy itself.
            forwarded = []
        addr = client_address(peer_host, forwarded, ctx.trusted_proxies)
    else:
        addr = normalise_address(peer_host)
    request[_CLIENT] = str(addr)
    return addr


def _names_forwarded_for(connection: list[str]) -> bool:
    return any(
        token.strip().lower() == "x-forwarded-for" for value in connection for token in value.split(",")
    )


async def session_of(request: web.Request) -> LiveSession | None:
    """The live session named by the request's cookie (memory first)."""
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    return await request.app[CTX].sessions.lookup(cookie)
