"""JSON shapes of model objects for the control API (one place, so the OpenAPI matches)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..model import AccessRequest, ApiToken, AuditEvent, Group, Reason, RemoteUser, Session, Target

__all__ = [
    "event_json",
    "group_json",
    "iso",
    "reason_json",
    "request_json",
    "session_json",
    "target_json",
    "token_json",
    "user_json",
]


def iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat().replace("+00:00", "Z")


def group_json(g: Group) -> dict[str, Any]:
    return {
        "id": g.id,
        "name": g.name,
        "kind": g.kind.value,
        "policy": g.policy.to_json(),
        "created_at": iso(g.created_at),
    }


def user_json(u: RemoteUser) -> dict[str, Any]:
    return {
        "id": u.id,
        "group_id": u.group_id,
        "name": u.name,
        "email": u.email,
        "phone": u.phone,
        "channel": u.channel.value,
        "third_party": u.ephemeral,
        "created_at": iso(u.created_at),
        "purged_at": iso(u.purged_at),
    }


def reason_json(r: Reason) -> dict[str, Any]:
    return {"id": r.id, "label": r.label, "created_at": iso(r.created_at)}


def target_json(t: Target) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "protocol": t.protocol.value,
        "url": t.url,
        "host": t.host,
        "port": t.port,
        "ssh_host_key": t.ssh_host_key,
        "tls_verify": t.tls_verify,
        "created_at": iso(t.created_at),
    }


def request_json(r: AccessRequest) -> dict[str, Any]:
    return {
        "id": r.id,
        "status": r.status.value,
        "group_id": r.group_id,
        "user_id": r.user_id,
        "justification": r.justification,
        "reason_id": r.reason_id,
        "governance_code": r.governance_code,
        "start": iso(r.start),
        "end": iso(r.end),
        "created_at": iso(r.created_at),
        "created_by": r.created_by,
        "forwarded_at": iso(r.forwarded_at),
        "forwarded_by": r.forwarded_by,
        "revoked_at": iso(r.revoked_at),
        "revoked_by": r.revoked_by,
    }


def session_json(s: Session) -> dict[str, Any]:
    return {
        "id": s.id,
        "request_id": s.request_id,
        "origin": s.address,
        "since": iso(s.created_at),
        "last_seen": iso(s.last_seen),
        "ended_at": iso(s.ended_at),
        "end_reason": s.end_reason,
    }


def token_json(t: ApiToken) -> dict[str, Any]:
    return {
        "name": t.name,
        "role": t.role.value,
        "created_at": iso(t.created_at),
        "revoked_at": iso(t.revoked_at),
    }


def event_json(e: AuditEvent) -> dict[str, Any]:
    return {
        "seq": e.seq,
        "at": iso(e.at),
        "actor": e.actor,
        "type": e.action,
        "subject": e.subject,
        "outcome": e.outcome,
        "origin": e.origin,
        "details": e.details,
        "personal": e.personal["data"] if e.personal else None,
        "hash": e.hash,
        "prev_hash": e.prev_hash,
    }
