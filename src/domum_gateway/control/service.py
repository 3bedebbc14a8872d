"""The administrator's workflow: catalogue (groups, users, reasons, targets) and access requests.

Both the JSON API and the admin console call these functions, so validation, audit and
cache invalidation happen the same way whichever door a change comes through. Inputs are
plain decoded JSON objects; outputs are model objects (``views`` turns them into JSON).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncssh

from ..audit import AuditEntry
from ..auth.origin import parse_cidrs
from ..auth.secrets import hash_secret, mask_email, mask_phone, new_id, new_link
from ..auth.windows import compute_window, parse_duration
from ..bus import Bus, Change, ChangeKind
from ..clock import Clock
from ..errors import Conflict, DeliveryError, NotFound, ValidationError
from ..model import (
    AccessRequest,
    Channel,
    Duration,
    DurationUnit,
    Group,
    GroupKind,
    GroupPolicy,
    Protocol,
    Reason,
    RemoteUser,
    RequestStatus,
    Target,
)
from ..store.base import Store
from .fields import Reader
from .notifier import Notifier, render_link_message

__all__ = ["Actor", "AdminService", "Forwarded", "Review"]

log = logging.getLogger("domum.control")

_COUNTRY_LEN = 2


class Actor:
    """Who makes a change, as written in the audit trail (never a secret)."""

    def __init__(self, name: str, origin: str = "") -> None:
        self.name = name
        self.origin = origin

    def entry(
        self,
        action: str,
        subject: str,
        outcome: str = "ok",
        details: dict[str, Any] | None = None,
        personal: dict[str, Any] | None = None,
    ) -> AuditEntry:
        return AuditEntry(
            actor=self.name,
            action=action,
            subject=subject,
            outcome=outcome,
            origin=self.origin,
            details=details,
            personal=personal,
        )


class Review:
    """A normalised request as it would be saved (the dry run's answer)."""

    def __init__(
        self,
        request: AccessRequest,
        user: RemoteUser,
        new_user: bool,
        group: Group,
        targets: list[Target],
    ) -> None:
        self.request = request
        self.user = user
        self.new_user = new_user
        self.group = group
        self.targets = targets


class Forwarded:
    def __init__(self, request: AccessRequest, sent_to: str, channel: Channel) -> None:
        self.request = request
        self.sent_to = sent_to
        self.channel = channel


def masked_destination(user: RemoteUser) -> str:
    if user.channel is Channel.EMAIL:
        return mask_email(user.email or "")
    return mask_phone(user.phone or "")


class AdminService:
    def __init__(
        self,
        store: Store,
        notifier: Notifier,
        clock: Clock,
        bus: Bus,
        public_base_url: str,
        on_link_sent: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.clock = clock
        self.bus = bus
        self.base_url = public_base_url.rstrip("/")
        self._on_link_sent = on_link_sent

    # groups ------------------------------------------------------------------
    async def _parse_policy(self, r: Reader | None, base: GroupPolicy | None = None) -> GroupPolicy:
        policy = base or GroupPolicy()
        if r is None:
            return policy
        r.only(("targets", "origins", "max_duration", "idle_timeout", "max_sessions", "channels"))
        targets = r.string_list("targets")
        if targets is not None:
            resolved: list[str] = []
            for i, ref in enumerate(targets):
                t = await self.store.get_target(ref)
                if t is None:
                    r.fail(f"targets[{i}]", f"no target {ref!r} is registered")
                else:
                    resolved.append(t.id)
            policy = replace(policy, targets=tuple(dict.fromkeys(resolved)))
        o = r.child("origins")
        if o is not None:
            o.only(("allow_cidrs", "deny_cidrs", "countries"))
            origins = policy.origins
            for key in ("allow_cidrs", "deny_cidrs"):
                values = o.string_list(key)
                if values is not None:
                    try:
                        parsed = parse_cidrs(values, f"{o.prefix}.{key}")
                    except ValidationError as exc:
                        o.errors.extend(exc.errors)
                    else:
                        origins = replace(origins, **{key: parsed})
            countries = o.string_list("countries")
            if countries is not None:
                bad = [c for c in countries if len(c) != _COUNTRY_LEN or not c.isascii() or not c.isalpha()]
                if bad:
                    o.fail("countries", "must be ISO 3166 alpha-2 codes like CH or DE")
                else:
                    origins = replace(origins, countries=tuple(c.upper() for c in countries))
            policy = replace(policy, origins=origins)
        if r.has("max_duration"):
            try:
                policy = replace(
                    policy, max_duration=parse_duration(r.raw("max_duration"), r.field("max_duration"))
                )
            except ValidationError as exc:
                r.errors.extend(exc.errors)
        if r.has("idle_timeout"):
            try:
                policy = replace(
                    policy, idle_timeout=parse_duration(r.raw("idle_timeout"), r.field("idle_timeout"))
                )
            except ValidationError as exc:
                r.errors.extend(exc.errors)
        ms = r.integer("max_sessions", required=False, lo=1, hi=1000)
        if ms is not None:
            policy = replace(policy, max_sessions=ms)
        channels = r.string_list("channels")
        if channels is not None:
            allowed = {c.value for c in Channel}
            if not channels or any(c not in allowed for c in channels):
                r.fail("channels", "must be a non-empty list of email, sms")
            else:
                policy = replace(policy, channels=tuple(Channel(c) for c in dict.fromkeys(channels)))
        return policy

    async def create_group(self, body: dict[str, Any], actor: Actor) -> Group:
        r = Reader(body)
        r.only(("name", "kind", "policy"))
        name = r.string("name", max_len=100)
        kind = r.choice("kind", [k.value for k in GroupKind], required=False, default="internal")
        policy = await self._parse_policy(r.child("policy"))
        r.check()
        assert name is not None and kind is not None
        group = Group(new_id("grp"), name, GroupKind(kind), policy, self.clock.now())
        await self.store.create_group(group, actor.entry("group.created", group.id, details={"name": name}))
        return group

    async def update_group(self, group_id: str, body: dict[str, Any], actor: Actor) -> Group:
        group = await self._group(group_id)
        r = Reader(body)
        r.only(("name", "kind", "policy"))
        name = r.string("name", required=False, max_len=100) or group.name
        kind = r.choice("kind", [k.value for k in GroupKind], required=False) or group.kind.value
        policy = await self._parse_policy(r.child("policy"), group.policy)
        r.check()
        updated = replace(group, name=name, kind=GroupKind(kind), policy=policy)
        await self.store.update_group(updated, actor.entry("group.updated", group.id, details={"name": name}))
        self.bus.publish(Change(ChangeKind.GROUP, group.id, "policy changed"))
        return updated

    async def delete_group(self, group_id: str, actor: Actor) -> None:
        if not await self.store.delete_group(group_id, actor.entry("group.deleted", group_id)):
            raise NotFound(f"No group {group_id!r}.")
        self.bus.publish(Change(ChangeKind.GROUP, group_id, "group deleted"))

    async def _group(self, group_id: str) -> Group:
        group = await self.store.get_group(group_id)
        if group is None:
            raise NotFound(f"No group {group_id!r}.")
        return group

    # users -------------------------------------------------------------------
    def _read_person(self, r: Reader, *, need_group: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if need_group:
            out["group_id"] = r.string("group_id", max_len=64)
        out["name"] = r.string("name", max_len=200)
        out["email"] = r.email("email")
        out["phone"] = r.phone("phone")
        default_channel = "email" if out["email"] or not out["phone"] else "sms"
        out["channel"] = r.choice(
            "channel", [c.value for c in Channel], required=False, default=default_channel
        )
        if out["channel"] == "email" and not out["email"] and not r.has("email"):
            r.fail("email", "is required when the channel is email")
        if out["channel"] == "sms" and not out["phone"] and not r.has("phone"):
            r.fail("phone", "is required when the channel is sms")
        return out

    async def create_user(self, body: dict[str, Any], actor: Actor) -> RemoteUser:
        r = Reader(body)
        r.only(("group_id", "name", "email", "phone", "channel"))
        p = self._read_person(r, need_group=True)
        if p["group_id"] is not None:
            group = await self.store.get_group(p["group_id"])
            if group is None:
                r.fail("group_id", f"no group {p['group_id']!r} exists")
            elif p["channel"] is not None and Channel(p["channel"]) not in group.policy.channels:
                r.fail("channel", "the group's policy does not allow this channel")
        r.check()
        user = RemoteUser(
            id=new_id("usr"),
            group_id=p["group_id"],
            name=p["name"],
            email=p["email"],
            phone=p["phone"],
            channel=Channel(p["channel"]),
            created_at=self.clock.now(),
        )
        await self.store.create_user(
            user,
            actor.entry(
                "user.created",
                user.id,
                details={"group_id": user.group_id},
                personal={"name": user.name, "email": user.email, "phone": user.phone},
            ),
        )
        return user

    async def update_user(self, user_id: str, body: dict[str, Any], actor: Actor) -> RemoteUser:
        user = await self.store.get_user(user_id)
        if user is None:
            raise NotFound(f"No user {user_id!r}.")
        r = Reader(body)
        r.only(("name", "email", "phone", "channel"))
        name = r.string("name", required=False, max_len=200) or user.name
        email = r.email("email") if r.has("email") else user.email
        phone = r.phone("phone") if r.has("phone") else user.phone
        channel = r.choice("channel", [c.value for c in Channel], required=False) or user.channel.value
        if channel == "email" and not email:
            r.fail("email", "is required when the channel is email")
        if channel == "sms" and not phone:
            r.fail("phone", "is required when the channel is sms")
        r.check()
        updated = replace(user, name=name, email=email, phone=phone, channel=Channel(channel))
        await self.store.update_user(
            updated,
            actor.entry("user.updated", user.id, personal={"name": name, "email": email, "phone": phone}),
        )
        self.bus.publish(Change(ChangeKind.USER, user.id, "user changed"))
        return updated

    async def delete_user(self, user_id: str, actor: Actor) -> None:
        if not await self.store.delete_user(user_id, actor.entry("user.deleted", user_id)):
            raise NotFound(f"No user {user_id!r}.")

    # reasons -----------------------------------------------------------------
    async def create_reason(self, body: dict[str, Any], actor: Actor) -> Reason:
        r = Reader(body)
        r.only(("label",))
        label = r.string("label", max_len=200)
        r.check()
        assert label is not None
        reason = Reason(new_id("rsn"), label, self.clock.now())
        await self.store.create_reason(
            reason, actor.entry("reason.created", reason.id, details={"label": label})
        )
        return reason

    async def delete_reason(self, reason_id: str, actor: Actor) -> None:
        if not await self.store.delete_reason(reason_id, actor.entry("reason.deleted", reason_id)):
            raise NotFound(f"No reason {reason_id!r}.")

    # targets -----------------------------------------------------------------
    def _read_target(self, r: Reader, base: Target | None) -> dict[str, Any]:
        fields = ("name", "protocol", "url", "host", "port", "ssh_host_key", "tls_verify")
        r.only(fields)
        out: dict[str, Any] = {}
        out["name"] = r.slug("name", required=base is None) or (base.name if base else None)
        proto = r.choice("protocol", [p.value for p in Protocol], required=base is None)
        out["protocol"] = proto or (base.protocol.value if base else None)
        out["url"] = (
            r.string("url", required=False, max_len=2000) if r.has("url") else (base.url if base else None)
        )
        out["host"] = (
            r.string("host", required=False, max_len=253) if r.has("host") else (base.host if base else None)
        )
        out["port"] = (
            r.integer("port", required=False, lo=1, hi=65535)
            if r.has("port")
            else (base.port if base else None)
        )
        out["ssh_host_key"] = (
            r.string("ssh_host_key", required=False, max_len=4000)
            if r.has("ssh_host_key")
            else (base.ssh_host_key if base else None)
        )
        out["tls_verify"] = r.boolean("tls_verify", default=base.tls_verify if base else True)
        protocol = out["protocol"]
        if protocol == Protocol.HTTP.value:
            url = out["url"]
            if not url:
                r.fail("url", "is required for http targets")
            else:
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https") or not parts.hostname:
                    r.fail("url", "must be an http:// or https:// URL with a host")
                elif parts.username or parts.password:
                    r.fail("url", "must not carry credentials")
                elif parts.query or parts.fragment:
                    r.fail("url", "must not have a query or fragment")
            out["host"] = out["port"] = None
        elif protocol in (Protocol.SSH.value, Protocol.RDP.value, Protocol.TCP.value):
            if not out["host"]:
                r.fail("host", f"is required for {protocol} targets")
            elif not _valid_host(out["host"]):
                r.fail("host", "must be a host name or an IP address")
            if out["port"] is None:
                out["port"] = {"ssh": 22, "rdp": 3389}.get(protocol)
                if out["port"] is None:
                    r.fail("port", "is required for tcp targets")
            out["url"] = None
            if protocol == Protocol.SSH.value and out["ssh_host_key"]:
                if not _valid_ssh_key(out["ssh_host_key"]):
                    r.fail("ssh_host_key", "must be an OpenSSH public key line like 'ssh-ed25519 AAAA...'")
        if protocol != Protocol.SSH.value:
            out["ssh_host_key"] = None
        return out

    async def create_target(self, body: dict[str, Any], actor: Actor) -> Target:
        r = Reader(body)
        t = self._read_target(r, None)
        r.check()
        target = Target(
            id=new_id("tgt"),
            name=t["name"],
            protocol=Protocol(t["protocol"]),
            url=t["url"],
            host=t["host"],
            port=t["port"],
            ssh_host_key=t["ssh_host_key"],
            tls_verify=t["tls_verify"],
            created_at=self.clock.now(),
        )
        await self.store.create_target(
            target,
            actor.entry(
                "target.created",
                target.id,
                details={
                    "name": target.name,
                    "protocol": target.protocol.value,
                    "tls_verify": target.tls_verify,
                },
            ),
        )
        return target

    async def update_target(self, target_id: str, body: dict[str, Any], actor: Actor) -> Target:
        base = await self.store.get_target(target_id)
        if base is None:
            raise NotFound(f"No target {target_id!r}.")
        r = Reader(body)
        t = self._read_target(r, base)
        r.check()
        updated = replace(
            base,
            name=t["name"],
            protocol=Protocol(t["protocol"]),
            url=t["url"],
            host=t["host"],
            port=t["port"],
            ssh_host_key=t["ssh_host_key"],
            tls_verify=t["tls_verify"],
        )
        await self.store.update_target(
            updated, actor.entry("target.updated", base.id, details={"name": updated.name})
        )
        self.bus.publish(Change(ChangeKind.TARGET, base.id, "target changed"))
        return updated

    async def delete_target(self, target_id: str, actor: Actor) -> None:
        base = await self.store.get_target(target_id)
        if base is None or not await self.store.delete_target(
            base.id, actor.entry("target.deleted", base.id)
        ):
            raise NotFound(f"No target {target_id!r}.")
        self.bus.publish(Change(ChangeKind.TARGET, base.id, "target removed"))

    # access requests ---------------------------------------------------------
    async def review(self, body: dict[str, Any], actor: Actor) -> Review:
        """Validate and normalise a request without saving it (``dry_run``)."""
        r = Reader(body)
        r.only(
            (
                "group_id",
                "user_id",
                "user",
                "justification",
                "reason_id",
                "governance_code",
                "start",
                "duration",
                "end",
            )
        )
        group_id = r.string("group_id", max_len=64)
        justification = r.string("justification", max_len=2000)
        reason_id = r.string("reason_id", max_len=64)
        governance = r.string("governance_code", required=False, max_len=100)
        group = await self.store.get_group(group_id) if group_id else None
        if group_id and group is None:
            r.fail("group_id", f"no group {group_id!r} exists")
        if reason_id and await self.store.get_reason(reason_id) is None:
            r.fail("reason_id", f"no reason {reason_id!r} is registered")
        user: RemoteUser | None = None
        new_user = False
        # ``"user": null`` is "no inline user", like null everywhere else in a body.
        u = r.child("user")
        if u is not None and r.raw("user_id") is not None:
            r.fail("user", "give either user_id or an inline user, not both")
        elif u is not None:
            u.only(("name", "email", "phone", "channel"))
            p = self._read_person(u, need_group=False)
            if group is not None and group.kind is not GroupKind.THIRD_PARTY:
                r.fail("user", "inline users are only for groups of kind third_party")
            if not u.errors and group is not None and p["name"]:
                user = RemoteUser(
                    id=new_id("usr"),
                    group_id=group.id,
                    name=p["name"],
                    email=p["email"],
                    phone=p["phone"],
                    channel=Channel(p["channel"]),
                    created_at=self.clock.now(),
                    ephemeral=True,
                )
                new_user = True
        else:
            user_id = r.string("user_id", max_len=64)
            if user_id:
                user = await self.store.get_user(user_id)
                if user is None or user.purged_at is not None:
                    r.fail("user_id", f"no user {user_id!r} exists")
                    user = None
                elif group is not None and user.group_id != group.id:
                    r.fail("user_id", "the user does not belong to this group")
        if user is not None and group is not None and user.channel not in group.policy.channels:
            r.fail("user_id", f"the group's policy does not allow the {user.channel.value} channel")
        max_duration = group.policy.max_duration if group else Duration(100000, DurationUnit.MONTHS)
        window: tuple[datetime, datetime] | None = None
        try:
            window = compute_window(r.raw("start"), r.raw("duration"), r.raw("end"), max_duration)
        except ValidationError as exc:
            r.errors.extend(exc.errors)
        if window is not None and window[1] <= self.clock.now():
            r.fail("end" if r.has("end") else "duration", "the window has already ended")
        r.check()
        assert group is not None and user is not None and window is not None
        assert justification is not None and reason_id is not None
        request = AccessRequest(
            id=new_id("req"),
            group_id=group.id,
            user_id=user.id,
            justification=justification,
            reason_id=reason_id,
            governance_code=governance,
            start=window[0],
            end=window[1],
            status=RequestStatus.SAVED,
            created_at=self.clock.now(),
            created_by=actor.name,
        )
        targets = [t for t in [await self.store.get_target(tid) for tid in group.policy.targets] if t]
        return Review(request, user, new_user, group, targets)

    async def create_request(self, body: dict[str, Any], actor: Actor) -> Review:
        review = await self.review(body, actor)
        req = review.request
        personal = None
        if review.new_user:
            u = review.user
            personal = {"name": u.name, "email": u.email, "phone": u.phone}
        await self.store.create_request(
            req,
            review.user if review.new_user else None,
            actor.entry(
                "request.saved",
                req.id,
                details={
                    "request_id": req.id,
                    "group_id": req.group_id,
                    "user_id": req.user_id,
                    "reason_id": req.reason_id,
                    "start": req.start.isoformat(),
                    "end": req.end.isoformat(),
                    "governance_code": req.governance_code,
                },
                personal=personal,
            ),
        )
        return review

    async def get_request(self, request_id: str) -> AccessRequest:
        req = await self.store.get_request(request_id)
        if req is None:
            raise NotFound(f"No access request {request_id!r}.")
        return req

    async def forward(self, request_id: str, actor: Actor) -> Forwarded:
        """Make a fresh personal link and send it on the user's channel."""
        req = await self.get_request(request_id)
        if req.status not in (RequestStatus.SAVED, RequestStatus.FORWARDED):
            raise Conflict(
                f"The request is {req.status.value}; only saved or forwarded requests can be forwarded."
            )
        if req.end <= self.clock.now():
            raise Conflict("The request's window has ended; create a new request.")
        user = await self.store.get_user(req.user_id)
        if user is None or user.purged_at is not None:
            raise Conflict("The request's user no longer exists.")
        to = user.email if user.channel is Channel.EMAIL else user.phone
        if not to:
            raise Conflict(f"The user has no {user.channel.value} destination.")
        link = new_link()
        url = f"{self.base_url}/a/{link}"
        message = render_link_message(
            user.channel.value,
            to,
            user_name=user.name,
            link_url=url,
            justification=req.justification,
            start=req.start,
            end=req.end,
        )
        sent_to = masked_destination(user)
        try:
            await self.notifier.send(message)
        except DeliveryError as exc:
            await self.store.append_audit(
                actor.entry(
                    "request.forward_failed",
                    req.id,
                    outcome="error",
                    details={"request_id": req.id, "channel": user.channel.value, "error": exc.detail},
                )
            )
            if self._on_link_sent:
                self._on_link_sent(user.channel.value, "error")
            raise
        updated = await self.store.mark_forwarded(
            req.id,
            hash_secret(link),
            self.clock.now(),
            actor.name,
            actor.entry(
                "request.forwarded",
                req.id,
                details={"request_id": req.id, "channel": user.channel.value, "sent_to": sent_to},
            ),
        )
        if self._on_link_sent:
            self._on_link_sent(user.channel.value, "ok")
        if updated is None:  # revoked while the message was on its way
            raise Conflict("The request was revoked while the link was being sent; the link does not work.")
        self.bus.publish(Change(ChangeKind.REQUEST, req.id, "link replaced"))
        return Forwarded(updated, sent_to, user.channel)

    async def revoke(self, request_id: str, actor: Actor) -> AccessRequest:
        req = await self.get_request(request_id)
        if req.status in (RequestStatus.REVOKED, RequestStatus.EXPIRED):
            raise Conflict(f"The request is already {req.status.value}.")
        updated = await self.store.revoke_request(
            req.id,
            self.clock.now(),
            actor.name,
            actor.entry("request.revoked", req.id, details={"request_id": req.id}),
        )
        if updated is None:
            raise Conflict("The request can no longer be revoked.")
        self.bus.publish(Change(ChangeKind.REQUEST, req.id, "access revoked"))
        return updated

    async def terminate_session(self, session_id: str, actor: Actor) -> bool:
        """End a live session for every replica (its connections are cut); False if none."""
        ended = await self.store.end_session(
            session_id, "terminated", self.clock.now(), actor.entry("session.terminated", session_id)
        )
        if ended:
            self.bus.publish(Change(ChangeKind.SESSION, session_id, "terminated by an administrator"))
        return ended

    async def expire_due(self) -> list[str]:
        ids = await self.store.expire_requests(self.clock.now())
        for rid in ids:
            self.bus.publish(Change(ChangeKind.REQUEST, rid, "access window ended"))
        return ids

    def link_ttl(self, req: AccessRequest) -> timedelta:
        return req.end - self.clock.now()


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(
        0 < len(label) <= 63
        and label.replace("-", "").isalnum()
        and label.isascii()
        and not label.startswith("-")
        and not label.endswith("-")
        for label in labels
    )


def _valid_ssh_key(line: str) -> bool:
    try:
        asyncssh.import_public_key(line.strip())
    except (asyncssh.KeyImportError, ValueError):
        return False
    return True
