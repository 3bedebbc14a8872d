"""Row <-> model conversions and cursor encoding shared by every Store implementation.

Both stores keep timestamps as fixed-width UTC text and JSON as text, so one mapper per
entity serves ``sqlite3.Row`` and ``asyncpg.Record`` alike (both index by column name).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any, Protocol

from ..audit import format_instant
from ..model import (
    AccessRequest,
    ApiToken,
    AuditEvent,
    Channel,
    Duration,
    DurationUnit,
    Group,
    GroupKind,
    GroupPolicy,
    OriginRules,
    Reason,
    RemoteUser,
    RequestStatus,
    Role,
    Session,
    Target,
)
from ..model import Protocol as TargetProtocol
from .base import ConnectionRecord, ConsoleSessionRecord, SecretKind, SessionSecret

__all__ = [
    "connection",
    "console_session",
    "decode_cursor",
    "dt",
    "dt_req",
    "encode_cursor",
    "event",
    "group",
    "policy_from_json",
    "reason",
    "request",
    "session",
    "session_secret",
    "target",
    "token",
    "ts",
    "user",
]


class Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


def ts(when: datetime | None) -> str | None:
    return None if when is None else format_instant(when)


def dt(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def dt_req(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def policy_from_json(raw: dict[str, Any]) -> GroupPolicy:
    """Rebuild a stored policy (already validated when it was written)."""
    origins = raw.get("origins", {})
    return GroupPolicy(
        targets=tuple(raw.get("targets", ())),
        origins=OriginRules(
            allow_cidrs=tuple(origins.get("allow_cidrs", ())),
            deny_cidrs=tuple(origins.get("deny_cidrs", ())),
            countries=tuple(origins.get("countries", ())),
        ),
        max_duration=Duration(int(raw["max_duration"]["value"]), DurationUnit(raw["max_duration"]["unit"])),
        idle_timeout=Duration(int(raw["idle_timeout"]["value"]), DurationUnit(raw["idle_timeout"]["unit"])),
        max_sessions=int(raw.get("max_sessions", 3)),
        channels=tuple(Channel(c) for c in raw.get("channels", ("email", "sms"))),
    )


def encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, n: int) -> list[str] | None:
    try:
        pad = "=" * (-len(cursor) % 4)
        parts = json.loads(base64.urlsafe_b64decode(cursor + pad))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(parts, list) or len(parts) != n or not all(isinstance(p, str) for p in parts):
        return None
    return parts


def token(r: Row) -> ApiToken:
    return ApiToken(
        name=r["name"],
        role=Role(r["role"]),
        created_at=dt_req(r["created_at"]),
        revoked_at=dt(r["revoked_at"]),
    )


def group(r: Row) -> Group:
    return Group(
        id=r["id"],
        name=r["name"],
        kind=GroupKind(r["kind"]),
        policy=policy_from_json(json.loads(r["policy"])),
        created_at=dt_req(r["created_at"]),
    )


def user(r: Row) -> RemoteUser:
    return RemoteUser(
        id=r["id"],
        group_id=r["group_id"],
        name=r["name"],
        email=r["email"],
        phone=r["phone"],
        channel=Channel(r["channel"]),
        created_at=dt_req(r["created_at"]),
        ephemeral=bool(r["ephemeral"]),
        purged_at=dt(r["purged_at"]),
    )


def reason(r: Row) -> Reason:
    return Reason(id=r["id"], label=r["label"], created_at=dt_req(r["created_at"]))


def target(r: Row) -> Target:
    return Target(
        id=r["id"],
        name=r["name"],
        protocol=TargetProtocol(r["protocol"]),
        url=r["url"],
        host=r["host"],
        port=r["port"],
        ssh_host_key=r["ssh_host_key"],
        tls_verify=bool(r["tls_verify"]),
        created_at=dt_req(r["created_at"]),
    )


def request(r: Row) -> AccessRequest:
    return AccessRequest(
        id=r["id"],
        group_id=r["group_id"],
        user_id=r["user_id"],
        justification=r["justification"],
        reason_id=r["reason_id"],
        governance_code=r["governance_code"],
        start=dt_req(r["start_at"]),
        end=dt_req(r["end_at"]),
        status=RequestStatus(r["status"]),
        created_at=dt_req(r["created_at"]),
        created_by=r["created_by"],
        forwarded_at=dt(r["forwarded_at"]),
        forwarded_by=r["forwarded_by"],
        revoked_at=dt(r["revoked_at"]),
        revoked_by=r["revoked_by"],
    )


def session(r: Row) -> Session:
    return Session(
        id=r["id"],
        request_id=r["request_id"],
        address=r["address"],
        created_at=dt_req(r["created_at"]),
        last_seen=dt_req(r["last_seen"]),
        ended_at=dt(r["ended_at"]),
        end_reason=r["end_reason"],
    )


def event(r: Row) -> AuditEvent:
    return AuditEvent(
        seq=int(r["seq"]),
        at=dt_req(r["at"]),
        actor=r["actor"],
        action=r["action"],
        subject=r["subject"],
        outcome=r["outcome"],
        origin=r["origin"],
        details=json.loads(r["details"]),
        personal_commitment=r["personal_commitment"],
        prev_hash=r["prev_hash"],
        hash=r["hash"],
        personal=json.loads(r["personal"]) if r["personal"] else None,
    )


def session_secret(r: Row) -> SessionSecret:
    """A ``session_secrets`` row joined with its session's ``session_hash``."""
    return SessionSecret(
        kind=SecretKind(r["kind"]),
        session_id=r["session_id"],
        session_hash=r["session_hash"],
        target_id=r["target_id"],
        detail=r["detail"],
        expires_at=dt_req(r["expires_at"]),
    )


def console_session(r: Row) -> ConsoleSessionRecord:
    state = json.loads(r["state"])
    return ConsoleSessionRecord(
        sid_hash=r["sid_hash"],
        token_hash=r["token_hash"],
        token_name=r["token_name"],
        role=Role(r["role"]),
        created_at=dt_req(r["created_at"]),
        last_seen=dt_req(r["last_seen"]),
        idle_until=dt_req(r["idle_until"]),
        expires_at=dt_req(r["expires_at"]),
        state=state if isinstance(state, dict) else {},
    )


def connection(r: Row) -> ConnectionRecord:
    return ConnectionRecord(
        id=r["id"],
        session_id=r["session_id"],
        request_id=r["request_id"],
        user_id=r["user_id"],
        protocol=r["protocol"],
        target=r["target"],
        origin=r["origin"],
        since=dt_req(r["since"]),
        bytes_in=int(r["bytes_in"]),
        bytes_out=int(r["bytes_out"]),
        replica=r["replica"],
        updated_at=dt_req(r["updated_at"]),
    )
