"""Resolve a stored access request and its group's policy into the enforcement view."""

from __future__ import annotations

from ..model import AccessRequest, Grant, GroupPolicy
from .windows import duration_seconds_upper

__all__ = ["build_grant"]


def build_grant(request: AccessRequest, policy: GroupPolicy) -> Grant:
    """The grant a request gives under its group's current policy (pure)."""
    return Grant(
        request_id=request.id,
        user_id=request.user_id,
        group_id=request.group_id,
        status=request.status,
        start=request.start,
        end=request.end,
        targets=frozenset(policy.targets),
        origins=policy.origins,
        idle_timeout_seconds=duration_seconds_upper(policy.idle_timeout),
        max_sessions=policy.max_sessions,
    )
