"""Plain data the gateway works with. No I/O, no behaviour beyond small derived values."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "AccessRequest",
    "ApiToken",
    "AuditEvent",
    "Channel",
    "Duration",
    "DurationUnit",
    "Grant",
    "Group",
    "GroupKind",
    "GroupPolicy",
    "OriginRules",
    "Protocol",
    "Reason",
    "RemoteUser",
    "RequestStatus",
    "Role",
    "Session",
    "Target",
]


class GroupKind(enum.StrEnum):
    INTERNAL = "internal"
    THIRD_PARTY = "third_party"


class Channel(enum.StrEnum):
    EMAIL = "email"
    SMS = "sms"


class Protocol(enum.StrEnum):
    HTTP = "http"
    SSH = "ssh"
    RDP = "rdp"
    TCP = "tcp"


class RequestStatus(enum.StrEnum):
    SAVED = "saved"
    FORWARDED = "forwarded"
    REVOKED = "revoked"
    EXPIRED = "expired"


class Role(enum.StrEnum):
    ADMIN = "admin"
    AUDITOR = "auditor"


class DurationUnit(enum.StrEnum):
    MINUTES = "minutes"
    HOURS = "hours"
    DAYS = "days"
    MONTHS = "months"


@dataclass(frozen=True, slots=True)
class Duration:
    value: int
    unit: DurationUnit

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "unit": self.unit.value}


@dataclass(frozen=True, slots=True)
class OriginRules:
    """Where a grant may be used from. Deny wins over allow; empty allow means anywhere."""

    allow_cidrs: tuple[str, ...] = ()
    deny_cidrs: tuple[str, ...] = ()
    countries: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "allow_cidrs": list(self.allow_cidrs),
            "deny_cidrs": list(self.deny_cidrs),
            "countries": list(self.countries),
        }


@dataclass(frozen=True, slots=True)
class GroupPolicy:
    targets: tuple[str, ...] = ()
    origins: OriginRules = field(default_factory=OriginRules)
    max_duration: Duration = Duration(30, DurationUnit.DAYS)
    idle_timeout: Duration = Duration(15, DurationUnit.MINUTES)
    max_sessions: int = 3
    channels: tuple[Channel, ...] = (Channel.EMAIL, Channel.SMS)

    def to_json(self) -> dict[str, Any]:
        return {
            "targets": list(self.targets),
            "origins": self.origins.to_json(),
            "max_duration": self.max_duration.to_json(),
            "idle_timeout": self.idle_timeout.to_json(),
            "max_sessions": self.max_sessions,
            "channels": [c.value for c in self.channels],
        }


@dataclass(frozen=True, slots=True)
class Group:
    id: str
    name: str
    kind: GroupKind
    policy: GroupPolicy
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RemoteUser:
    id: str
    group_id: str
    name: str
    email: str | None
    phone: str | None
    channel: Channel
    created_at: datetime
    ephemeral: bool = False  # third-party JIT user that exists only for one grant
    purged_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Reason:
    id: str
    label: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Target:
    id: str
    name: str
    protocol: Protocol
    url: str | None
    host: str | None
    port: int | None
    ssh_host_key: str | None
    tls_verify: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AccessRequest:
    id: str
    group_id: str
    user_id: str
    justification: str
    reason_id: str
    governance_code: str | None
    start: datetime
    end: datetime
    status: RequestStatus
    created_at: datetime
    created_by: str
    forwarded_at: datetime | None = None
    forwarded_by: str | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """What an access request allows, resolved for enforcement (the hot-path view)."""

    request_id: str
    user_id: str
    group_id: str
    status: RequestStatus
    start: datetime
    end: datetime
    targets: frozenset[str]  # target ids
    origins: OriginRules
    idle_timeout_seconds: int
    max_sessions: int


@dataclass(frozen=True, slots=True)
class Session:
    """A remote user's logged-in session. ``id`` is public; the cookie value is only hashed."""

    id: str
    request_id: str
    address: str
    created_at: datetime
    last_seen: datetime
    ended_at: datetime | None = None
    end_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ApiToken:
    name: str
    role: Role
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    outcome: str
    origin: str
    details: dict[str, Any]
    personal_commitment: str
    prev_hash: str
    hash: str
    personal: dict[str, Any] | None = None
