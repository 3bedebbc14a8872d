"""JSON endpoints for the ``domum-gateway connect`` client, on the public listener.

The same login as the web pages and the SSH jump server (``LoginService``: one link
lookup, one send limit, one atomic token redemption, one kind of session); only the
encoding differs. A successful verify creates a normal session and answers with a
tunnel ticket mapped to it (``tunnel_tickets``) instead of a cookie.

    POST /cli/v1/token   {"link"}            -> 202 {"channel", "sent_to", "expires_in"}
    POST /cli/v1/verify  {"link", "token"}   -> 200 {"ticket", "expires_at", "session_id",
                                                      "access_ends_at", "idle_timeout_seconds",
                                                      "targets": [{"name", "protocol", "port", "tunnel"}]}
    POST /cli/v1/renew   (Bearer ticket)     -> 200 {"ticket", "expires_at"}
    POST /cli/v1/logout  (Bearer ticket)     -> 204 (the session ends, its tunnels close)
    POST /cli/v1/wait    (Bearer ticket)     -> 200 {"state": "live"} after at most ``WAIT_SECONDS``,
                                                or 401 with the reason as soon as the session ends
                                                (the client learns of a revoke with no tunnel open)

Errors are ``application/problem+json`` with a ``detail`` written for the person at the
terminal (the same sentences the pages show). Bodies must be ``application/json`` (a
cross-site page cannot send that without a preflight nobody answers), small, and hold
exactly the fields above.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime

from aiohttp import web

from ..auth.decide import Deny, explain
from ..auth.origin import IPAddress
from ..auth.secrets import mask_email, mask_phone
from ..errors import DomumError, TooManyRequests
from ..model import Channel
from .context import client_of
from .login import OTP_TTL
from .sessions import LiveSession
from .tunnel import SHUTTING_DOWN, TUNNEL_PROTOCOLS, TunnelService
from .tunnel_tickets import TooManyTickets

__all__ = ["add_cli_routes"]

log = logging.getLogger("domum.cli_api")

_MAX_BODY = 8 * 1024
WAIT_SECONDS = 50.0


class _BadInput(DomumError):
    status = 400
    type = "bad-request"
    title = "Bad request"


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _problem(exc: DomumError) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    if isinstance(exc, TooManyRequests):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="domum"'
    body = {
        "type": f"https://domum.dev/problems/{exc.type}",
        "title": exc.title,
        "status": exc.status,
        "detail": exc.detail,
    }
    return web.json_response(
        body, status=exc.status, content_type="application/problem+json", headers=headers
    )


class _Unauthorized(DomumError):
    status = 401
    type = "unauthorized"
    title = "Authentication required"


class _Unavailable(DomumError):
    status = 503
    type = "unavailable"
    title = "Service unavailable"


_TICKET_GONE = "Your sign-in has ended. Run `domum-gateway connect` again to sign in."


class _CliApi:
    def __init__(self, service: TunnelService) -> None:
        self.service = service
        self.ctx = service.ctx

    async def _body(self, request: web.Request, fields: tuple[str, ...]) -> dict[str, str]:
        if request.content_type != "application/json":
            raise _BadInput("Send a JSON body (Content-Type: application/json).")
        if request.content_length is not None and request.content_length > _MAX_BODY:
            raise _BadInput("The request body is too large.")
        raw = await request.content.read(_MAX_BODY + 1)
        if len(raw) > _MAX_BODY:
            raise _BadInput("The request body is too large.")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise _BadInput("The request body is not valid JSON.") from None
        if not isinstance(data, dict) or set(data) != set(fields):
            raise _BadInput(f"Expected exactly the fields: {', '.join(fields)}.")
        if not all(isinstance(data[f], str) for f in fields):
            raise _BadInput("Every field must be a string.")
        return {f: data[f] for f in fields}

    def _guard(self, request: web.Request) -> IPAddress:
        peer = client_of(request)
        origin = request.headers.get("Origin")
        if origin is not None and not self.service.origin_allowed(request, origin):
            raise _BadInput("Requests from other sites are refused.")
        self.ctx.login.limit_client(str(peer))
        return peer

    async def _ticket_session(self, request: web.Request) -> tuple[str, LiveSession]:
        scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
        ticket = value.strip()
        if scheme.lower() != "bearer" or not ticket:
            raise _Unauthorized("Send the tunnel ticket: Authorization: Bearer <ticket>.")
        live = await self.service.tickets.lookup(ticket)
        if live is None:
            raise _Unauthorized(_TICKET_GONE)
        return ticket, live

    async def token(self, request: web.Request) -> web.Response:
        try:
            peer = self._guard(request)
            body = await self._body(request, ("link",))
            info = await self.ctx.login.resolve_link(body["link"])
            await self.ctx.login.send_token(info, peer, str(peer))
        except DomumError as exc:
            return _problem(exc)
        assert info is not None  # send_token refuses an unknown link
        user = info.user
        if user.channel is Channel.SMS:
            sent_to = mask_phone(user.phone or "")
        else:
            sent_to = mask_email(user.email or "")
        return web.json_response(
            {"channel": user.channel.value, "sent_to": sent_to, "expires_in": int(OTP_TTL.total_seconds())},
            status=202,
            headers={"Cache-Control": "no-store"},
        )

    async def verify(self, request: web.Request) -> web.Response:
        try:
            peer = self._guard(request)
            body = await self._body(request, ("link", "token"))
            info = await self.ctx.login.resolve_link(body["link"])
            _cookie, live = await self.ctx.login.verify(info, body["token"], peer, str(peer))
            try:
                ticket, expires = await self.service.tickets.issue(live)
            except TooManyTickets:
                raise TooManyRequests("The gateway is busy. Try again in a minute.", 60) from None
            targets = []
            for tid in sorted(live.grant.targets):
                target = await self.service.targets.get(tid)
                if target is None:
                    continue
                targets.append(
                    {
                        "name": target.name,
                        "protocol": target.protocol.value,
                        "port": target.port,
                        "tunnel": target.protocol in TUNNEL_PROTOCOLS,
                    }
                )
        except DomumError as exc:
            return _problem(exc)
        return web.json_response(
            {
                "ticket": ticket,
                "expires_at": _iso(expires),
                "session_id": live.id,
                "access_ends_at": _iso(live.grant.end),
                "idle_timeout_seconds": live.grant.idle_timeout_seconds,
                "targets": targets,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def renew(self, request: web.Request) -> web.Response:
        try:
            peer = self._guard(request)
            _old, live = await self._ticket_session(request)
            decision = self.ctx.sessions.check(live, peer, None, activity=False)
            if isinstance(decision, Deny):
                raise _Unauthorized(explain(decision.reason, live.grant))
            try:
                ticket, expires = await self.service.tickets.issue(live)
            except TooManyTickets:
                raise TooManyRequests("The gateway is busy. Try again in a minute.", 60) from None
        except DomumError as exc:
            return _problem(exc)
        return web.json_response(
            {"ticket": ticket, "expires_at": _iso(expires)}, headers={"Cache-Control": "no-store"}
        )

    async def wait(self, request: web.Request) -> web.Response:
        try:
            self._guard(request)
            _ticket, live = await self._ticket_session(request)
        except DomumError as exc:
            return _problem(exc)
        ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_end(reason: str) -> None:
            if not ended.done():
                ended.set_result(reason)

        detach = self.ctx.sessions.attach(live, on_end)
        self.service.waiters.add(on_end)
        try:
            reason = await asyncio.wait_for(asyncio.shield(ended), WAIT_SECONDS)
        except TimeoutError:
            return web.json_response({"state": "live"}, headers={"Cache-Control": "no-store"})
        finally:
            detach()
            self.service.waiters.discard(on_end)
        if reason == SHUTTING_DOWN:
            return _problem(_Unavailable("The gateway is shutting down. Run `domum-gateway connect` again."))
        return _problem(_Unauthorized(f"Your access has ended: {reason}."))

    async def logout(self, request: web.Request) -> web.Response:
        try:
            peer = self._guard(request)
            _ticket, live = await self._ticket_session(request)
            await self.service.tickets.drop_session(live.id)
            await self.ctx.sessions.end(live, "signed out", f"user:{live.user_id}", str(peer))
        except DomumError as exc:
            return _problem(exc)
        return web.Response(status=204, headers={"Cache-Control": "no-store"})


def add_cli_routes(app: web.Application, service: TunnelService) -> None:
    """Register the ``/cli/v1`` endpoints (called by ``add_tunnel_routes``)."""
    api = _CliApi(service)
    app.router.add_post("/cli/v1/token", api.token)
    app.router.add_post("/cli/v1/verify", api.verify)
    app.router.add_post("/cli/v1/renew", api.renew)
    app.router.add_post("/cli/v1/logout", api.logout)
    app.router.add_post("/cli/v1/wait", api.wait)
