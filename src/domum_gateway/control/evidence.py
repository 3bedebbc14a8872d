"""Evidence bundles: one signed JSON document telling the whole story of an access request.

The bundle carries the request, its timeline (every event about it: creation, forwarding,
tokens, logins, refusals, sessions, tunnels, revocation) and the contiguous audit-chain
segment covering that timeline, so anyone can re-check offline that no event in between
was altered, dropped or reordered. The document is signed with the gateway's Ed25519 key
(the SSH host key made by ``init``); ``domum-gateway evidence verify FILE --key KEY.pub``
checks signature and chain without the gateway or its database.

Personal data inside the chain segment is left out (only its commitment travels), so a
bundle can be handed to a third party without disclosing other users' details.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..audit import GENESIS, canonical_json, envelope, event_hash, format_instant
from ..clock import Clock
from ..errors import ConfigError, Conflict, NotFound, StoreError
from ..model import AuditEvent
from ..store.base import AuditFilter, Store
from .views import request_json, session_json

__all__ = [
    "FORMAT",
    "EvidenceBuilder",
    "EvidenceProblem",
    "build_bundle",
    "load_signing_key",
    "load_verify_key",
    "verify_bundle",
]

FORMAT = "domum-evidence/1"
MAX_SEGMENT = 200_000


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The gateway's Ed25519 key (OpenSSH or PEM private key file)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the signing key ({exc.strerror}); run `domum-gateway init`"
        ) from exc
    try:
        key = (
            serialization.load_ssh_private_key(data, password=None)
            if b"OPENSSH PRIVATE KEY" in data
            else serialization.load_pem_private_key(data, password=None)
        )
    except ValueError as exc:
        raise ConfigError(f"{path}: not a readable private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: the evidence signing key must be Ed25519")
    return key


def load_verify_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from an OpenSSH line (``ssh-ed25519 AAAA...``) or PEM."""
    raw = text.strip().encode()
    try:
        key = (
            serialization.load_ssh_public_key(raw)
            if raw.startswith(b"ssh-")
            else serialization.load_pem_public_key(raw)
        )
    except ValueError as exc:
        raise ValueError("not a readable public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the key is not Ed25519")
    return key


def _public_line(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def fingerprint(public_line: str) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key line."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _segment_event(ev: AuditEvent) -> dict[str, Any]:
    return {
        "seq": ev.seq,
        "at": format_instant(ev.at),
        "actor": ev.actor,
        "action": ev.action,
        "subject": ev.subject,
        "outcome": ev.outcome,
        "origin": ev.origin,
        "details": ev.details,
        "personal": ev.personal_commitment,
        "prev_hash": ev.prev_hash,
        "hash": ev.hash,
    }


def build_bundle(
    *,
    request: dict[str, Any],
    people: dict[str, Any],
    sessions: list[dict[str, Any]],
    timeline_seqs: Sequence[int],
    segment: Sequence[AuditEvent],
    generated_at: datetime,
    gateway: str,
    key: Ed25519PrivateKey,
) -> dict[str, Any]:
    """Assemble and sign a bundle. ``segment`` is the contiguous chain run covering the timeline."""
    body: dict[str, Any] = {
        "format": FORMAT,
        "generated_at": format_instant(generated_at),
        "gateway": gateway,
        "request": request,
        "people": people,
        "sessions": sessions,
        "timeline": [s for s in timeline_seqs],
        "chain": {
            "from_seq": segment[0].seq if segment else None,
            "to_seq": segment[-1].seq if segment else None,
            "events": [_segment_event(e) for e in segment],
        },
    }
    public = _public_line(key)
    signature = key.sign(canonical_json(body).encode())
    body["signature"] = {
        "alg": "ed25519",
        "public_key": public,
        "fingerprint": fingerprint(public),
        "value": base64.b64encode(signature).decode(),
    }
    return body


@dataclass(frozen=True, slots=True)
class EvidenceProblem:
    where: str
    problem: str


def verify_bundle(bundle: Any, trusted_key: Ed25519PublicKey | None) -> EvidenceProblem | None:
    """Check a bundle offline: format, signature, chain links and hashes, timeline coverage.

    With ``trusted_key`` the signature must be by that key; without it, by the key the bundle
    names (which proves integrity, not origin: callers should say so).
    """
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        return EvidenceProblem("format", f"not a {FORMAT} document")
    sig = bundle.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != "ed25519":
        return EvidenceProblem("signature", "missing or not Ed25519")
    body = {k: v for k, v in bundle.items() if k != "signature"}
    try:
        key = trusted_key or load_verify_key(str(sig.get("public_key", "")))
        key.verify(base64.b64decode(str(sig.get("value", ""))), canonical_json(body).encode())
    except (ValueError, InvalidSignature):
        return EvidenceProblem("signature", "does not match the document (altered, or signed by another key)")
    chain = body.get("chain")
    if not isinstance(chain, dict) or not isinstance(chain.get("events"), list):
        return EvidenceProblem("chain", "missing")
    prev: str | None = None
    seqs: set[int] = set()
    expected_seq: int | None = None
    for raw in chain["events"]:
        try:
            seq = int(raw["seq"])
            env = envelope(
                seq,
                raw["at"],
                raw["actor"],
                raw["action"],
                raw["subject"],
                raw["outcome"],
                raw["origin"],
                raw["details"],
                raw["personal"],
            )
            link, digest = str(raw["prev_hash"]), str(raw["hash"])
        except (KeyError, TypeError, ValueError):
            return EvidenceProblem("chain", "an event is malformed")
        if expected_seq is not None and seq != expected_seq:
            return EvidenceProblem(f"event {expected_seq}", "missing or out of order")
        if prev is not None and link != prev:
            return EvidenceProblem(f"event {seq}", "previous-hash link does not match")
        if seq == 1 and link != GENESIS:
            return EvidenceProblem("event 1", "does not start the chain")
        if event_hash(link, env) != digest:
            return EvidenceProblem(f"event {seq}", "content does not match its hash")
        prev, expected_seq = digest, seq + 1
        seqs.add(seq)
    timeline = body.get("timeline")
    if not isinstance(timeline, list) or any(not isinstance(s, int) or s not in seqs for s in timeline):
        return EvidenceProblem("timeline", "names events outside the chain segment")
    return None


class EvidenceBuilder:
    """Assembles and signs bundles from the store (used by the API and the admin console)."""

    def __init__(self, store: Store, clock: Clock, gateway: str, key_path: Path | None) -> None:
        self._store = store
        self._clock = clock
        self._gateway = gateway
        self._key_path = key_path
        self._key: Ed25519PrivateKey | None = None

    def _signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            if self._key_path is None:
                raise StoreError("No evidence signing key is configured.")
            try:
                self._key = load_signing_key(self._key_path)
            except ConfigError as exc:
                raise StoreError("The evidence signing key is unavailable; see the gateway log.") from exc
        return self._key

    async def build(self, request_id: str) -> dict[str, Any]:
        """The signed bundle of one access request (NotFound when there is none)."""
        store = self._store
        req = await store.get_request(request_id)
        if req is None:
            raise NotFound(f"No access request {request_id!r}.")
        user = await store.get_user(req.user_id)
        group = await store.get_group(req.group_id)
        reason = await store.get_reason(req.reason_id)
        timeline: list[AuditEvent] = []
        cursor: str | None = None
        while True:
            page = await store.list_audit(AuditFilter(request_id=req.id, limit=1000, cursor=cursor))
            timeline += page.items
            cursor = page.next_cursor
            if not cursor or len(timeline) > MAX_SEGMENT:
                break
        segment: list[AuditEvent] = []
        if timeline:
            first, last = timeline[0].seq, timeline[-1].seq
            if last - first > MAX_SEGMENT:
                raise Conflict(
                    "The request's history is too long for one bundle; export the audit log instead."
                )
            cursor = _seq_cursor(first - 1)
            while cursor:
                page = await store.list_audit(AuditFilter(limit=1000, cursor=cursor))
                segment += [e for e in page.items if e.seq <= last]
                cursor = page.next_cursor if page.items and page.items[-1].seq < last else None
        sessions = await store.list_sessions(req.id, live=False)
        purged = bool(user and user.purged_at)
        people = {
            "user": {
                "id": req.user_id,
                "name": user.name if user and not purged else None,
                "email": user.email if user and not purged else None,
                "channel": user.channel.value if user else None,
                "purged": purged,
            },
            "group": {"id": req.group_id, "name": group.name if group else None},
            "reason": {"id": req.reason_id, "label": reason.label if reason else None},
        }
        return build_bundle(
            request=request_json(req),
            people=people,
            sessions=[session_json(s) for s in sessions],
            timeline_seqs=[e.seq for e in timeline],
            segment=segment,
            generated_at=self._clock.now(),
            gateway=self._gateway,
            key=self._signing_key(),
        )


def _seq_cursor(after: int) -> str:
    """The audit-list cursor meaning "events after seq ``after``" (see the stores)."""
    import json

    return base64.urlsafe_b64encode(json.dumps([str(after)]).encode()).decode().rstrip("=")
