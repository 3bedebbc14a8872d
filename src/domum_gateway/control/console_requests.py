"""Console pages for access requests: the request wizard, the list and each row's actions.

The wizard is the seed's three tabs (General, Access limitation, Review) as three steps of
one form. Its state travels in hidden fields, so nothing is kept on the server between
steps and nothing typed is lost when a step is refused. Each step asks
``AdminService.review`` (the API's dry run) and shows the errors that belong to it; Save
calls ``AdminService.create_request``.
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from ..auth.grant import build_grant, judge
from ..auth.origin import IPAddress, normalise_address
from ..auth.windows import describe_duration, parse_instant
from ..errors import Conflict, DeliveryError, FieldError, NotFound, ValidationError
from ..model import AccessRequest, Duration, DurationUnit, GroupKind, RequestStatus, Role
from ..store.base import AuditFilter, RequestFilter
from .console_forms import (
    GENERAL_FIELDS,
    LIMIT_FIELDS,
    OFFSETS,
    ErrorView,
    Slot,
    default_start,
    offset_label,
    tz_from_offset,
    wizard_body,
    wizard_slots,
)
from .console_web import CONSOLE, FORM, VIEWER, Handler, format_dt, redirect, render, safe_next
from .service import Review, masked_destination

__all__ = ["REQUEST_ROUTES"]

STATE_FIELDS = (*GENERAL_FIELDS, *LIMIT_FIELDS, "tz_auto", "draft")
_LIMIT_PATHS = ("start", "duration", "end", "tz")
_STEPS = ("general", "limit", "review")
_KINDS = (GroupKind.INTERNAL.value, GroupKind.THIRD_PARTY.value)
_PAGE = 50


def _is_limit_error(err: FieldError) -> bool:
    return any(err.field == p or err.field.startswith((p + ".", p + "[")) for p in _LIMIT_PATHS)


# the wizard ------------------------------------------------------------------
def _defaults(now: datetime) -> dict[str, str]:
    start = default_start(now)
    end = start + timedelta(hours=1)
    values = dict.fromkeys(STATE_FIELDS, "")
    values.update(
        {
            "tz": "+00:00",
            "tz_auto": "1",
            "mode": "duration",
            "duration.value": "1",
            "duration.unit": DurationUnit.HOURS.value,
            "start_date": f"{start:%Y-%m-%d}",
            "start_time": f"{start:%H:%M}",
            "end_date": f"{end:%Y-%m-%d}",
            "end_time": f"{end:%H:%M}",
        }
    )
    return values


def _kind(raw: str) -> str:
    return raw if raw in _KINDS else GroupKind.INTERNAL.value


async def _wizard(
    request: web.Request,
    kind: str,
    step: str,
    state: dict[str, str],
    errors: list[FieldError] | None = None,
    review: Review | None = None,
) -> web.Response:
    ctx = request.app[CONSOLE]
    general_slots, limit_slots = wizard_slots(kind)
    view = ErrorView.build(errors or [], general_slots if step == "general" else limit_slots)
    groups = [g for g in await ctx.store.list_groups() if g.kind.value == kind]
    group_ids = {g.id for g in groups}
    users = [
        u
        for u in await ctx.store.list_users()
        if u.group_id in group_ids and not u.ephemeral and u.purged_at is None
    ]
    reasons = await ctx.store.list_reasons()
    shown = {"general": GENERAL_FIELDS, "limit": (*LIMIT_FIELDS, "tz_auto"), "review": ()}[step]
    hidden = [f for f in STATE_FIELDS if f not in shown]
    summary: dict[str, Any] | None = None
    if review is not None:
        summary = _review_summary(review, state, reasons={r.id: r.label for r in reasons})
    return render(
        request,
        "wizard.html",
        status=422 if view else 200,
        nav="new-" + kind,
        kind=kind,
        step=step,
        steps=_STEPS,
        values=state,
        hidden=hidden,
        errors=view,
        groups=groups,
        users=users,
        reasons=reasons,
        offsets=[(o, offset_label(o)) for o in OFFSETS],
        units=[u.value for u in DurationUnit],
        summary=summary,
    )


def _review_summary(review: Review, state: dict[str, str], reasons: dict[str, str]) -> dict[str, Any]:
    req, user = review.request, review.user
    tz = tz_from_offset(state.get("tz", "+00:00")) or UTC
    if state.get("mode") == "custom":
        length = "Custom window of " + _span(req.end - req.start)
    else:
        try:
            value = int(state.get("duration.value", "0"))
            length = _describe_length(value, state.get("duration.unit", ""))
        except ValueError:
            length = ""
    destination = user.email if user.channel.value == "email" else user.phone
    return {
        "group": review.group.name,
        "user": user.name,
        "third_party": review.new_user,
        "channel": "e-mail" if user.channel.value == "email" else "SMS",
        "destination": destination or "",
        "justification": req.justification,
        "reason": reasons.get(req.reason_id, req.reason_id),
        "governance_code": req.governance_code or "",
        "start_local": format_dt(req.start, tz),
        "end_local": format_dt(req.end, tz),
        "start_utc": format_dt(req.start),
        "end_utc": format_dt(req.end),
        "same_zone": tz.utcoffset(None) == timedelta(0),
        "length": length,
        "targets": [(t.name, t.protocol.value) for t in review.targets],
    }


def _span(delta: timedelta) -> str:
    """``2 days 3 hours 15 minutes`` (custom windows sit on the quarter hour)."""
    minutes = int(delta.total_seconds() // 60)
    parts = []
    for size, unit in ((1440, "day"), (60, "hour"), (1, "minute")):
        count, minutes = divmod(minutes, size)
        if count:
            parts.append(f"{count} {unit}" + ("s" if count != 1 else ""))
    return " ".join(parts) or "0 minutes"


def _describe_length(value: int, unit: str) -> str:
    try:
        return describe_duration(Duration(value, DurationUnit(unit)))
    except ValueError:
        return ""


async def new_request(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    kind = _kind(request.query.get("kind", ""))
    state = _defaults(ctx.clock.now())
    state["group_id"] = request.query.get("group_id", "")[:64]
    # Names this wizard run, so pressing Save twice (or re-posting) saves one request.
    state["draft"] = secrets.token_urlsafe(16)
    return await _wizard(request, kind, "general", state)


async def wizard_step(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    form = request[FORM]
    kind = _kind(form.get("kind"))
    defaults = _defaults(ctx.clock.now())
    state = {f: form.get(f) if form.has(f) else defaults[f] for f in STATE_FIELDS}
    step = form.get("step") if form.get("step") in _STEPS else "general"
    action = form.get("action")
    actor = request[VIEWER].actor(request)
    if action == "back":
        return await _wizard(request, kind, _STEPS[max(0, _STEPS.index(step) - 1)], state)
    if action in ("edit-general", "edit-limit"):
        return await _wizard(request, kind, action[5:], state)
    if step == "general":
        body, _ = wizard_body(state, kind, with_window=False)
        try:
            await ctx.service.review(body, actor)
        except ValidationError as exc:
            general = [e for e in exc.errors if not _is_limit_error(e)]
            if general:
                return await _wizard(request, kind, "general", state, general)
        return await _wizard(request, kind, "limit", state)
    body, local = wizard_body(state, kind, with_window=True)
    save = step == "review" and action == "save"
    try:
        if local:
            # The window's own fields are malformed: still ask the service about the rest.
            await ctx.service.review(body, actor)
            return await _refused(request, kind, state, local)
        if save:
            session = request[VIEWER].session
            draft = state["draft"][:64]
            if draft and draft in session.saved_drafts:
                session.flash("This request was already saved; here it is.")
                return redirect(f"/admin/requests/{session.saved_drafts[draft]}")
            saved = await ctx.service.create_request(body, actor)
            if draft:
                session.remember_draft(draft, saved.request.id)
            session.flash(
                f"Access request for {saved.user.name} saved. Forward the URL access when you are ready."
            )
            return redirect(f"/admin/requests/{saved.request.id}")
        review = await ctx.service.review(body, actor)
    except ValidationError as exc:
        return await _refused(request, kind, state, _merge(local, exc.errors))
    return await _wizard(request, kind, "review", state, review=review)


def _merge(local: list[FieldError], service: list[FieldError]) -> list[FieldError]:
    """Form-shape errors win over the service's for the same field (they say it better)."""
    mine = {e.field for e in local}
    return [*local, *(e for e in service if e.field not in mine)]


async def _refused(
    request: web.Request, kind: str, state: dict[str, str], errors: list[FieldError]
) -> web.Response:
    general = [e for e in errors if not _is_limit_error(e)]
    if general:
        return await _wizard(request, kind, "general", state, general)
    return await _wizard(request, kind, "limit", state, errors)


# the list --------------------------------------------------------------------
async def list_requests(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    q = request.query
    errors: list[FieldError] = []
    status: RequestStatus | None = None
    if q.get("status"):
        try:
            status = RequestStatus(q["status"])
        except ValueError:
            errors.append(FieldError("status", "must be one of " + ", ".join(s.value for s in RequestStatus)))
    group_id = q.get("group_id", "")[:64] or None
    user_id = q.get("user_id", "")[:64] or None
    cursor = q.get("cursor", "")[:500] or None
    groups = await ctx.store.list_groups()
    users = await ctx.store.list_users()
    items: list[AccessRequest] = []
    next_cursor = None
    if not errors:
        page = await ctx.store.list_requests(
            RequestFilter(status=status, user_id=user_id, group_id=group_id, limit=_PAGE, cursor=cursor)
        )
        items, next_cursor = page.items, page.next_cursor
    now = ctx.clock.now()
    return render(
        request,
        "requests.html",
        status=422 if errors else 200,
        nav="requests",
        rows=[_row(r, now) for r in items],
        groups=groups,
        users=[u for u in users if u.purged_at is None],
        group_names={g.id: g.name for g in groups},
        user_names={u.id: u.name for u in users},
        statuses=[s.value for s in RequestStatus],
        filters={"status": q.get("status", ""), "group_id": group_id or "", "user_id": user_id or ""},
        filter_errors=ErrorView.build(errors, ()),
        next_cursor=next_cursor,
    )


def _row(r: AccessRequest, now: datetime) -> dict[str, Any]:
    live = r.status in (RequestStatus.SAVED, RequestStatus.FORWARDED)
    return {
        "req": r,
        "can_forward": live and r.end > now,
        "can_revoke": live,
    }


async def _get_request(request: web.Request) -> AccessRequest:
    req = await request.app[CONSOLE].store.get_request(request.match_info["id"])
    if req is None:
        raise NotFound("There is no such access request.")
    return req


async def show_request(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    req = await _get_request(request)
    group = await ctx.store.get_group(req.group_id)
    user = await ctx.store.get_user(req.user_id)
    reason = await ctx.store.get_reason(req.reason_id)
    targets = []
    if group is not None:
        targets = [t for t in [await ctx.store.get_target(tid) for tid in group.policy.targets] if t]
    events = await ctx.store.list_audit(AuditFilter(request_id=req.id, limit=200))
    sessions = await ctx.store.list_sessions(req.id)
    return render(
        request,
        "request.html",
        nav="requests",
        row=_row(req, ctx.clock.now()),
        req=req,
        group=group,
        user=user,
        reason=reason,
        targets=targets,
        events=events.items,
        sessions=sessions,
    )


# actions ---------------------------------------------------------------------
async def confirm_forward(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    req = await _get_request(request)
    user = await ctx.store.get_user(req.user_id)
    if user is None or user.purged_at is not None:
        raise Conflict("The request's user no longer exists.")
    channel = "e-mail" if user.channel.value == "email" else "SMS"
    return render(
        request,
        "confirm.html",
        nav="requests",
        title="Forward URL Access",
        question=(
            f"Send {user.name} a new personal link by {channel} to {masked_destination(user)}?"
            + (
                " The link sent earlier for this request stops working."
                if req.status is RequestStatus.FORWARDED
                else ""
            )
        ),
        action=f"/admin/requests/{req.id}/forward",
        yes="Yes",
        no=safe_next(request.query.get("back")),
        back=safe_next(request.query.get("back")),
        danger=False,
    )


async def forward(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    session = request[VIEWER].session
    back = safe_next(request[FORM].get("back"))
    try:
        fwd = await ctx.service.forward(request.match_info["id"], request[VIEWER].actor(request))
    except (Conflict, DeliveryError, NotFound) as exc:
        session.flash(f"The link was not sent: {exc.detail}", "error")
        return redirect(back)
    how = "e-mail" if fwd.channel.value == "email" else "SMS"
    session.flash(f"Personal link sent by {how} to {fwd.sent_to}.")
    return redirect(back)


async def confirm_revoke(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    req = await _get_request(request)
    user = await ctx.store.get_user(req.user_id)
    name = user.name if user else req.user_id
    return render(
        request,
        "confirm.html",
        nav="requests",
        title="Revoke access",
        question=(
            f"Revoke the access of {name} ({format_dt(req.start)} to {format_dt(req.end)})? "
            "Its link stops working and every open session ends at once."
        ),
        action=f"/admin/requests/{req.id}/revoke",
        yes="Yes, revoke",
        no=safe_next(request.query.get("back")),
        back=safe_next(request.query.get("back")),
        danger=True,
    )


async def revoke(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    session = request[VIEWER].session
    back = safe_next(request[FORM].get("back"))
    try:
        await ctx.service.revoke(request.match_info["id"], request[VIEWER].actor(request))
    except (Conflict, NotFound) as exc:
        session.flash(f"The access was not revoked: {exc.detail}", "error")
        return redirect(back)
    session.flash("Access revoked; its sessions were ended.")
    return redirect(back)


async def explain(request: web.Request) -> web.Response:
    """Why would this request be allowed or refused (same inputs as POST /api/v1/explain)."""
    ctx = request.app[CONSOLE]
    req = await _get_request(request)
    group = await ctx.store.get_group(req.group_id)
    if group is None:
        raise NotFound("The request's group no longer exists.")
    q = request.query
    values = {
        "target_id": q.get("target_id", "")[:64],
        "address": q.get("address", "")[:64].strip(),
        "at": q.get("at", "")[:64].strip(),
    }
    errors: list[FieldError] = []
    at = ctx.clock.now()
    if values["at"]:
        try:
            at = parse_instant(values["at"], "at")
        except ValidationError as exc:
            errors.extend(exc.errors)
    peer: IPAddress | None = None
    if values["address"]:
        try:
            peer = normalise_address(values["address"])
        except ValueError:
            errors.append(FieldError("address", "must be an IPv4 or IPv6 address"))
    target_id: str | None = None
    targets = [t for t in [await ctx.store.get_target(tid) for tid in group.policy.targets] if t]
    if values["target_id"]:
        target = await ctx.store.get_target(values["target_id"])
        if target is None:
            errors.append(FieldError("target_id", "is not a registered target"))
        else:
            target_id = target.id
    result: dict[str, Any] | None = None
    if not errors:
        result = judge(build_grant(req, group.policy), at, peer, target_id)
        result["at"] = format_dt(at)
    slots = (
        Slot("target_id", "Target", ("target_id",)),
        Slot("address", "Address", ("address",)),
        Slot("at", "Time", ("at",)),
    )
    return render(
        request,
        "explain.html",
        status=422 if errors else 200,
        nav="requests",
        req=req,
        targets=targets,
        values=values,
        errors=ErrorView.build(errors, slots),
        result=result,
    )


async def evidence(request: web.Request) -> web.Response:
    """The signed evidence bundle (the same document as the API's), as a download."""
    ctx = request.app[CONSOLE]
    req = await _get_request(request)
    bundle = await ctx.evidence.build(req.id)
    await ctx.store.append_audit(
        request[VIEWER]
        .actor(request)
        .entry("request.evidence_exported", req.id, details={"request_id": req.id})
    )
    body = json.dumps(bundle, ensure_ascii=False, indent=2)
    return web.Response(
        text=body,
        content_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="evidence-{req.id}.json"'},
    )


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat().replace("+00:00", "Z")


REQUEST_ROUTES: list[tuple[str, str, Handler, Role]] = [
    ("GET", "/admin/requests", list_requests, Role.AUDITOR),
    ("GET", "/admin/requests/new", new_request, Role.ADMIN),
    ("POST", "/admin/requests/new", wizard_step, Role.ADMIN),
    ("GET", "/admin/requests/{id}", show_request, Role.AUDITOR),
    ("GET", "/admin/requests/{id}/forward", confirm_forward, Role.ADMIN),
    ("POST", "/admin/requests/{id}/forward", forward, Role.ADMIN),
    ("GET", "/admin/requests/{id}/revoke", confirm_revoke, Role.ADMIN),
    ("POST", "/admin/requests/{id}/revoke", revoke, Role.ADMIN),
    ("GET", "/admin/requests/{id}/explain", explain, Role.AUDITOR),
    ("GET", "/admin/requests/{id}/evidence.json", evidence, Role.AUDITOR),
]
"""(method, path, handler, least role) of every access-request page."""
