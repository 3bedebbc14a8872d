"""The audit hash chain: canonical encoding, event hashing and offline verification.

Each event's hash covers the previous event's hash and the canonical JSON of the event's
envelope. Personal data (names, e-mail addresses, phone numbers) is kept *outside* the
envelope: the envelope holds only a salted commitment to it. Retention can then erase the
personal data and its salt without changing any hash, so ``audit verify`` still passes
after a purge, while anyone holding the original data can still prove it matches.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .model import AuditEvent

__all__ = [
    "GENESIS",
    "AuditEntry",
    "ChainBreak",
    "canonical_json",
    "commit_personal",
    "event_hash",
    "format_instant",
    "verify_chain",
]

GENESIS = "0" * 64


def format_instant(when: datetime) -> str:
    """Fixed-width UTC text (sorts like the instant it names)."""
    if when.tzinfo is None:
        raise ValueError("naive datetime")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no insignificant whitespace (stable across runs)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """An event to append; the store assigns ``seq``, ``at`` and the hashes."""

    actor: str
    action: str
    subject: str
    outcome: str = "ok"
    origin: str = ""
    details: dict[str, Any] | None = None
    personal: dict[str, Any] | None = None


def commit_personal(personal: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """Return (commitment, stored personal blob with its salt) for optional personal data."""
    if not personal:
        return "", None
    salt = secrets.token_hex(16)
    blob = {"salt": salt, "data": personal}
    return _commitment(blob), blob


def _commitment(blob: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(blob).encode()).hexdigest()


def envelope(
    seq: int,
    at: str,
    actor: str,
    action: str,
    subject: str,
    outcome: str,
    origin: str,
    details: dict[str, Any],
    personal_commitment: str,
) -> dict[str, Any]:
    return {
        "seq": seq,
        "at": at,
        "actor": actor,
        "action": action,
        "subject": subject,
        "outcome": outcome,
        "origin": origin,
        "details": details,
        "personal": personal_commitment,
    }


def event_hash(prev_hash: str, env: dict[str, Any]) -> str:
    """sha256(prev_hash || canonical envelope)."""
    h = hashlib.sha256()
    h.update(prev_hash.encode())
    h.update(canonical_json(env).encode())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class ChainBreak:
    seq: int
    problem: str


def verify_chain(events: Iterable[AuditEvent], head: tuple[int, str] | None = None) -> ChainBreak | None:
    """Check an ordered run of events from seq 1; return the first break or None.

    ``head`` is the (seq, hash) the store recorded for its last append: it catches the
    deletion of the newest rows, which a chain alone cannot see.
    """
    prev = GENESIS
    expected_seq = 1
    for ev in events:
        if ev.seq != expected_seq:
            return ChainBreak(expected_seq, f"event {expected_seq} is missing or out of order")
        if ev.prev_hash != prev:
            return ChainBreak(ev.seq, "previous-hash link does not match")
        env = envelope(
            ev.seq,
            format_instant(ev.at),
            ev.actor,
            ev.action,
            ev.subject,
            ev.outcome,
            ev.origin,
            ev.details,
            ev.personal_commitment,
        )
        if event_hash(prev, env) != ev.hash:
            return ChainBreak(ev.seq, "content does not match its hash")
        if ev.personal is not None and _commitment(ev.personal) != ev.personal_commitment:
            return ChainBreak(ev.seq, "personal data does not match its commitment")
        prev = ev.hash
        expected_seq += 1
    if head is not None:
        last_seq = expected_seq - 1
        if head[0] != last_seq or (last_seq > 0 and head[1] != prev):
            return ChainBreak(
                last_seq + 1 if head[0] > last_seq else head[0], "chain head does not match the newest event"
            )
    return None
