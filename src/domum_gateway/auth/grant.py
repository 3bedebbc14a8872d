"""Resolve a stored access request and its group's policy into the enforcement view."""

from __future__ import annotations

from datetime import datetime
from ipaddress import ip_network

from ..model import AccessRequest, Grant, GroupPolicy
from .decide import ALLOW, Deny, DenyReason, decide, explain
from .origin import IPAddress, normalise_address
from .windows import duration_seconds_upper

__all__ = ["build_grant", "judge"]


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


def judge(grant: Grant, at: datetime, peer: IPAddress | None, target_id: str | None) -> dict[str, object]:
    """Explain a decision for an administrator (pure): allowed, reason and a sentence.

    With no ``peer`` the origin rules are judged as satisfied (an address the rules allow
    stands in), so the answer is about everything else: window, status, target.
    """
    stand_in = peer
    if stand_in is None:
        stand_in = (
            ip_network(grant.origins.allow_cidrs[0]).network_address
            if grant.origins.allow_cidrs
            else normalise_address("0.0.0.0")
        )
    decision = decide(grant, at, stand_in, target_id)
    if peer is None and isinstance(decision, Deny) and decision.reason is DenyReason.COUNTRY_DENIED:
        decision = ALLOW
    if isinstance(decision, Deny):
        return {"allowed": False, "reason": decision.reason.value, "message": explain(decision.reason, grant)}
    return {"allowed": True, "reason": None, "message": "Access would be allowed."}
