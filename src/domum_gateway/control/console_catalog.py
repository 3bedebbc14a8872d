"""Console pages for the catalogue: groups (with their policy), users, reasons, targets.

Each write goes through :class:`AdminService` exactly as the JSON API's would, so the
same validation, audit events and cache invalidation apply. A refused form is shown
again with everything that was typed and each error next to its field.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from aiohttp import web

from ..errors import Conflict, NotFound, ValidationError
from ..model import Channel, DurationUnit, Group, GroupKind, GroupPolicy, Protocol, Role, Target
from .console_forms import (
    GROUP_FIELDS,
    GROUP_SLOTS,
    REASON_FIELDS,
    REASON_SLOTS,
    TARGET_FIELDS,
    TARGET_SLOTS,
    USER_FIELDS,
    USER_SLOTS,
    ErrorView,
    Slot,
    group_body,
    reason_body,
    target_body,
    user_body,
)
from .console_web import CONSOLE, FORM, VIEWER, Handler, redirect, render

__all__ = ["CATALOG_ROUTES"]

T = TypeVar("T")

UNITS = [u.value for u in DurationUnit]


async def attempt(call: Awaitable[T], slots: Sequence[Slot]) -> tuple[T | None, ErrorView]:
    """Run a service call; a refusal becomes an ErrorView for the form instead of a page."""
    try:
        return await call, ErrorView()
    except ValidationError as exc:
        return None, ErrorView.build(exc.errors, slots)
    except Conflict as exc:
        view = ErrorView()
        view.summary.append(("", exc.detail[:1].upper() + exc.detail[1:]))
        return None, view


def _flash(request: web.Request, text: str, kind: str = "ok") -> None:
    request[VIEWER].session.flash(text, kind)


# groups ----------------------------------------------------------------------
def _group_values(g: Group | None) -> dict[str, Any]:
    p = g.policy if g else GroupPolicy()
    return {
        "name": g.name if g else "",
        "kind": g.kind.value if g else GroupKind.INTERNAL.value,
        "targets": list(p.targets),
        "allow_cidrs": "\n".join(p.origins.allow_cidrs),
        "deny_cidrs": "\n".join(p.origins.deny_cidrs),
        "countries": ", ".join(p.origins.countries),
        "max_duration.value": str(p.max_duration.value),
        "max_duration.unit": p.max_duration.unit.value,
        "idle_timeout.value": str(p.idle_timeout.value),
        "idle_timeout.unit": p.idle_timeout.unit.value,
        "max_sessions": str(p.max_sessions),
        "channels": [c.value for c in p.channels],
    }


async def _group_form(
    request: web.Request, group: Group | None, values: dict[str, Any], errors: ErrorView, status: int = 200
) -> web.Response:
    ctx = request.app[CONSOLE]
    return render(
        request,
        "group_form.html",
        status=status,
        nav="groups",
        group=group,
        values=values,
        errors=errors,
        targets=await ctx.store.list_targets(),
        kinds=[k.value for k in GroupKind],
        units=UNITS,
        channels=[c.value for c in Channel],
    )


def _posted_group_values(request: web.Request) -> dict[str, Any]:
    form = request[FORM]
    values: dict[str, Any] = form.values(GROUP_FIELDS)
    values["targets"] = form.getall("targets")
    values["channels"] = form.getall("channels")
    return values


async def list_groups(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    targets = {t.id: t for t in await ctx.store.list_targets()}
    return render(request, "groups.html", nav="groups", groups=await ctx.store.list_groups(), targets=targets)


async def new_group(request: web.Request) -> web.Response:
    return await _group_form(request, None, _group_values(None), ErrorView())


async def create_group(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    viewer = request[VIEWER]
    group, errors = await attempt(
        ctx.service.create_group(group_body(request[FORM]), viewer.actor(request)), GROUP_SLOTS
    )
    if group is None:
        return await _group_form(request, None, _posted_group_values(request), errors, 422)
    _flash(request, f"Group {group.name} created.")
    return redirect("/admin/groups")


async def _get_group(request: web.Request) -> Group:
    group = await request.app[CONSOLE].store.get_group(request.match_info["id"])
    if group is None:
        raise NotFound("There is no such group.")
    return group


async def edit_group(request: web.Request) -> web.Response:
    group = await _get_group(request)
    return await _group_form(request, group, _group_values(group), ErrorView())


async def update_group(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    group = await _get_group(request)
    updated, errors = await attempt(
        ctx.service.update_group(group.id, group_body(request[FORM]), request[VIEWER].actor(request)),
        GROUP_SLOTS,
    )
    if updated is None:
        return await _group_form(request, group, _posted_group_values(request), errors, 422)
    _flash(request, f"Group {updated.name} saved.")
    return redirect("/admin/groups")


# users -----------------------------------------------------------------------
async def _user_form(
    request: web.Request,
    user_id: str | None,
    values: dict[str, Any],
    errors: ErrorView,
    status: int = 200,
) -> web.Response:
    ctx = request.app[CONSOLE]
    groups = await ctx.store.list_groups()
    return render(
        request,
        "user_form.html",
        status=status,
        nav="users",
        user_id=user_id,
        values=values,
        errors=errors,
        groups=groups,
        group_names={g.id: g.name for g in groups},
        channels=[c.value for c in Channel],
    )


async def list_users(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    groups = await ctx.store.list_groups()
    group_id = request.query.get("group_id", "")[:64] or None
    users = await ctx.store.list_users(group_id)
    return render(
        request,
        "users.html",
        nav="users",
        users=users,
        groups=groups,
        group_names={g.id: g.name for g in groups},
        group_id=group_id or "",
    )


async def new_user(request: web.Request) -> web.Response:
    values = dict.fromkeys(USER_FIELDS, "")
    values["group_id"] = request.query.get("group_id", "")[:64]
    values["channel"] = Channel.EMAIL.value
    return await _user_form(request, None, values, ErrorView())


async def create_user(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    form = request[FORM]
    user, errors = await attempt(
        ctx.service.create_user(user_body(form, create=True), request[VIEWER].actor(request)), USER_SLOTS
    )
    if user is None:
        return await _user_form(request, None, form.values(USER_FIELDS), errors, 422)
    _flash(request, f"User {user.name} created.")
    return redirect("/admin/users")


async def edit_user(request: web.Request) -> web.Response:
    user = await request.app[CONSOLE].store.get_user(request.match_info["id"])
    if user is None or user.purged_at is not None:
        raise NotFound("There is no such user.")
    values = {
        "group_id": user.group_id,
        "name": user.name,
        "email": user.email or "",
        "phone": user.phone or "",
        "channel": user.channel.value,
    }
    return await _user_form(request, user.id, values, ErrorView())


async def update_user(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    user = await ctx.store.get_user(request.match_info["id"])
    if user is None or user.purged_at is not None:
        raise NotFound("There is no such user.")
    form = request[FORM]
    updated, errors = await attempt(
        ctx.service.update_user(user.id, user_body(form, create=False), request[VIEWER].actor(request)),
        USER_SLOTS,
    )
    if updated is None:
        values = form.values(USER_FIELDS)
        values["group_id"] = user.group_id
        return await _user_form(request, user.id, values, errors, 422)
    _flash(request, f"User {updated.name} saved.")
    return redirect("/admin/users")


# reasons ---------------------------------------------------------------------
async def list_reasons(request: web.Request) -> web.Response:
    reasons = await request.app[CONSOLE].store.list_reasons()
    return render(request, "reasons.html", nav="reasons", reasons=reasons)


async def new_reason(request: web.Request) -> web.Response:
    return render(request, "reason_form.html", nav="reasons", values={"label": ""}, errors=ErrorView())


async def create_reason(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    form = request[FORM]
    reason, errors = await attempt(
        ctx.service.create_reason(reason_body(form), request[VIEWER].actor(request)), REASON_SLOTS
    )
    if reason is None:
        return render(
            request,
            "reason_form.html",
            status=422,
            nav="reasons",
            values=form.values(REASON_FIELDS),
            errors=errors,
        )
    _flash(request, f"Reason {reason.label} created.")
    return redirect("/admin/reasons")


# targets ---------------------------------------------------------------------
def _target_values(t: Target | None) -> dict[str, Any]:
    if t is None:
        return {
            "name": "",
            "protocol": Protocol.HTTP.value,
            "url": "",
            "host": "",
            "port": "",
            "ssh_host_key": "",
            "tls_verify": "1",
        }
    return {
        "name": t.name,
        "protocol": t.protocol.value,
        "url": t.url or "",
        "host": t.host or "",
        "port": "" if t.port is None else str(t.port),
        "ssh_host_key": t.ssh_host_key or "",
        "tls_verify": "1" if t.tls_verify else "",
    }


async def _target_form(
    request: web.Request, target: Target | None, values: dict[str, Any], errors: ErrorView, status: int = 200
) -> web.Response:
    return render(
        request,
        "target_form.html",
        status=status,
        nav="targets",
        target=target,
        values=values,
        errors=errors,
        protocols=[p.value for p in Protocol],
    )


async def list_targets(request: web.Request) -> web.Response:
    targets = await request.app[CONSOLE].store.list_targets()
    return render(request, "targets.html", nav="targets", targets=targets)


async def new_target(request: web.Request) -> web.Response:
    return await _target_form(request, None, _target_values(None), ErrorView())


async def create_target(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    form = request[FORM]
    target, errors = await attempt(
        ctx.service.create_target(target_body(form), request[VIEWER].actor(request)), TARGET_SLOTS
    )
    if target is None:
        return await _target_form(request, None, form.values(TARGET_FIELDS), errors, 422)
    _flash(request, f"Target {target.name} created.")
    return redirect("/admin/targets")


async def _get_target(request: web.Request) -> Target:
    target = await request.app[CONSOLE].store.get_target(request.match_info["id"])
    if target is None:
        raise NotFound("There is no such target.")
    return target


async def edit_target(request: web.Request) -> web.Response:
    target = await _get_target(request)
    return await _target_form(request, target, _target_values(target), ErrorView())


async def update_target(request: web.Request) -> web.Response:
    ctx = request.app[CONSOLE]
    target = await _get_target(request)
    form = request[FORM]
    updated, errors = await attempt(
        ctx.service.update_target(target.id, target_body(form), request[VIEWER].actor(request)),
        TARGET_SLOTS,
    )
    if updated is None:
        return await _target_form(request, target, form.values(TARGET_FIELDS), errors, 422)
    _flash(request, f"Target {updated.name} saved.")
    return redirect("/admin/targets")


# deletion (one confirmation page for every kind) -----------------------------
_KINDS: dict[str, tuple[str, str]] = {
    "groups": ("group", "/admin/groups"),
    "users": ("user", "/admin/users"),
    "reasons": ("reason", "/admin/reasons"),
    "targets": ("target", "/admin/targets"),
}


async def _describe(request: web.Request, kind: str, item_id: str) -> str:
    store = request.app[CONSOLE].store
    label: str | None = None
    if kind == "groups":
        g = await store.get_group(item_id)
        label = g.name if g else None
    elif kind == "users":
        u = await store.get_user(item_id)
        label = u.name if u and u.purged_at is None else None
    elif kind == "reasons":
        r = await store.get_reason(item_id)
        label = r.label if r else None
    else:
        t = await store.get_target(item_id)
        label = t.name if t and t.id == item_id else None
    if label is None:
        raise NotFound(f"There is no such {_KINDS[kind][0]}.")
    return label


def _delete_handlers(kind: str) -> tuple[Handler, Handler]:
    noun, back = _KINDS[kind]

    async def confirm(request: web.Request) -> web.Response:
        item_id = request.match_info["id"]
        label = await _describe(request, kind, item_id)
        return render(
            request,
            "confirm.html",
            nav=kind,
            title=f"Delete {noun}",
            question=f"Delete the {noun} \u201c{label}\u201d? This cannot be undone.",
            action=f"{back}/{item_id}/delete",
            yes="Yes, delete",
            no=back,
            danger=True,
        )

    async def delete(request: web.Request) -> web.Response:
        ctx = request.app[CONSOLE]
        item_id = request.match_info["id"]
        label = await _describe(request, kind, item_id)
        actor = request[VIEWER].actor(request)
        service = ctx.service
        try:
            if kind == "groups":
                await service.delete_group(item_id, actor)
            elif kind == "users":
                await service.delete_user(item_id, actor)
            elif kind == "reasons":
                await service.delete_reason(item_id, actor)
            else:
                await service.delete_target(item_id, actor)
        except Conflict as exc:
            _flash(request, f"The {noun} \u201c{label}\u201d was not deleted: {exc.detail}.", "error")
        else:
            _flash(request, f"The {noun} \u201c{label}\u201d was deleted.")
        return redirect(back)

    return confirm, delete


def _routes() -> list[tuple[str, str, Handler, Role]]:
    routes: list[tuple[str, str, Handler, Role]] = [
        ("GET", "/admin/groups", list_groups, Role.AUDITOR),
        ("GET", "/admin/groups/new", new_group, Role.ADMIN),
        ("POST", "/admin/groups/new", create_group, Role.ADMIN),
        ("GET", "/admin/groups/{id}", edit_group, Role.ADMIN),
        ("POST", "/admin/groups/{id}", update_group, Role.ADMIN),
        ("GET", "/admin/users", list_users, Role.AUDITOR),
        ("GET", "/admin/users/new", new_user, Role.ADMIN),
        ("POST", "/admin/users/new", create_user, Role.ADMIN),
        ("GET", "/admin/users/{id}", edit_user, Role.ADMIN),
        ("POST", "/admin/users/{id}", update_user, Role.ADMIN),
        ("GET", "/admin/reasons", list_reasons, Role.AUDITOR),
        ("GET", "/admin/reasons/new", new_reason, Role.ADMIN),
        ("POST", "/admin/reasons/new", create_reason, Role.ADMIN),
        ("GET", "/admin/targets", list_targets, Role.AUDITOR),
        ("GET", "/admin/targets/new", new_target, Role.ADMIN),
        ("POST", "/admin/targets/new", create_target, Role.ADMIN),
        ("GET", "/admin/targets/{id}", edit_target, Role.ADMIN),
        ("POST", "/admin/targets/{id}", update_target, Role.ADMIN),
    ]
    for kind in _KINDS:
        confirm, delete = _delete_handlers(kind)
        routes.append(("GET", f"/admin/{kind}/{{id}}/delete", confirm, Role.ADMIN))
        routes.append(("POST", f"/admin/{kind}/{{id}}/delete", delete, Role.ADMIN))
    return routes


CATALOG_ROUTES = _routes()
"""(method, path, handler, least role) of every catalogue page."""
