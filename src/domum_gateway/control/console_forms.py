"""HTML forms of the admin console: strict reading, translation to service bodies, field errors.

The console validates nothing the service already validates. A form is turned into the
same JSON-shaped body the control API takes, handed to :class:`AdminService`, and the
``FieldError`` paths it answers with (``policy.max_duration.value``, ``user.email``) are
mapped back onto the form's fields. The only checks made here are about the form's own
shape: size, encoding, and date/time/offset inputs that are split across several fields.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict

from ..errors import BadRequest, DomumError, FieldError, PayloadTooLarge

__all__ = [
    "GENERAL_FIELDS",
    "GROUP_FIELDS",
    "GROUP_SLOTS",
    "LIMIT_FIELDS",
    "MAX_FIELDS",
    "MAX_FORM_BYTES",
    "OFFSETS",
    "REASON_FIELDS",
    "REASON_SLOTS",
    "TARGET_FIELDS",
    "TARGET_SLOTS",
    "USER_FIELDS",
    "USER_SLOTS",
    "ErrorView",
    "Form",
    "Slot",
    "UnsupportedMediaType",
    "compose_instant",
    "default_start",
    "group_body",
    "offset_label",
    "read_form",
    "reason_body",
    "target_body",
    "tz_from_offset",
    "user_body",
    "wizard_body",
    "wizard_slots",
]

MAX_FORM_BYTES = 64 * 1024
"""The largest console form accepted (the biggest real one, a group policy, is far below)."""
MAX_FIELDS = 600

_INT = re.compile(r"^-?[0-9]{1,12}$")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_TIME = re.compile(r"^[0-9]{2}:[0-9]{2}(:[0-9]{2})?$")
_INDEX = re.compile(r"\[([0-9]+)\]$")

OFFSETS: tuple[str, ...] = (
    "-12:00", "-11:00", "-10:00", "-09:30", "-09:00", "-08:00", "-07:00", "-06:00", "-05:00",
    "-04:00", "-03:30", "-03:00", "-02:00", "-01:00", "+00:00", "+01:00", "+02:00", "+03:00",
    "+03:30", "+04:00", "+04:30", "+05:00", "+05:30", "+05:45", "+06:00", "+06:30", "+07:00",
    "+08:00", "+08:45", "+09:00", "+09:30", "+10:00", "+10:30", "+11:00", "+12:00", "+12:45",
    "+13:00", "+14:00",
)  # fmt: skip
"""UTC offsets offered by the wizard: every offset in use somewhere today."""


class UnsupportedMediaType(DomumError):
    status = 415
    type = "unsupported-media-type"
    title = "Unsupported media type"


class Form:
    """A decoded ``application/x-www-form-urlencoded`` body."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._data: MultiDict[str] = MultiDict(pairs)

    def get(self, name: str, default: str = "") -> str:
        return self._data.get(name, default)

    def getall(self, name: str) -> list[str]:
        return [v for v in self._data.getall(name, []) if v != ""]

    def has(self, name: str) -> bool:
        return name in self._data

    def values(self, names: Iterable[str]) -> dict[str, str]:
        """Single values of ``names`` (missing ones as ""), for re-rendering a form."""
        return {n: self.get(n) for n in names}


async def read_form(request: web.Request) -> Form:
    """Read a urlencoded form body, at most ``MAX_FORM_BYTES`` and ``MAX_FIELDS`` fields.

    Raises:
        PayloadTooLarge: the body is too large or has too many fields.
        UnsupportedMediaType: not a urlencoded form.
        BadRequest: the body is not valid UTF-8 / percent-encoding.
    """
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise PayloadTooLarge(f"The form is larger than {MAX_FORM_BYTES // 1024} KiB.")
    if request.body_exists and request.content_type != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("Send the form as application/x-www-form-urlencoded.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(16384):
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            raise PayloadTooLarge(f"The form is larger than {MAX_FORM_BYTES // 1024} KiB.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
        pairs = parse_qsl(
            text, keep_blank_values=True, encoding="utf-8", errors="strict", max_num_fields=MAX_FIELDS
        )
    except UnicodeDecodeError as exc:
        raise BadRequest("The form is not valid UTF-8.") from exc
    except ValueError as exc:
        raise PayloadTooLarge(f"The form has more than {MAX_FIELDS} fields.") from exc
    # Browsers send textarea line breaks as CRLF; the service refuses a bare CR.
    return Form((k, v.replace("\r\n", "\n").replace("\r", "\n")) for k, v in pairs)


# field errors ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Slot:
    """A place on a form where errors are shown, and which error paths land there."""

    name: str
    label: str
    paths: tuple[str, ...]


@dataclass
class ErrorView:
    """Field errors arranged for a page: per form slot, plus a summary at the top."""

    by_slot: dict[str, list[str]] = field(default_factory=dict)
    summary: list[tuple[str, str]] = field(default_factory=list)  # (slot or "", sentence)

    def __bool__(self) -> bool:
        return bool(self.summary)

    @classmethod
    def build(cls, errors: Iterable[FieldError], slots: Sequence[Slot]) -> ErrorView:
        view = cls()
        for err in errors:
            slot = _slot_for(err.field, slots)
            label = slot.label if slot else _humanise(err.field)
            text = _sentence(label, err.message, err.field)
            name = slot.name if slot else ""
            view.by_slot.setdefault(name, []).append(text)
            view.summary.append((name, text))
        return view


def _slot_for(path: str, slots: Sequence[Slot]) -> Slot | None:
    for slot in slots:
        for prefix in slot.paths:
            if path == prefix or path.startswith((prefix + ".", prefix + "[")):
                return slot
    return None


def _humanise(path: str) -> str:
    head = path.split("[", 1)[0].replace(".", " ").replace("_", " ").strip()
    return head[:1].upper() + head[1:] if head else "The form"


_PREDICATE = ("must ", "is ", "are ", "needs ", "should ", "may ")


def _sentence(label: str, message: str, path: str) -> str:
    msg = message.strip()
    if msg == "must not be empty":
        msg = "is required"
    if msg == "unknown field":
        msg = "is not a field this form sends"
    m = _INDEX.search(path)
    where = f" (entry {int(m.group(1)) + 1})" if m else ""
    if msg.startswith(_PREDICATE):
        return f"{label}{where} {msg}."
    return f"{label}{where}: {msg[:1].upper()}{msg[1:]}."


# number helpers --------------------------------------------------------------
def _int_or_raw(value: str) -> Any:
    """An integer when the text is one, else the text itself so the service names the error."""
    text = value.strip()
    return int(text) if _INT.match(text) else text


def _opt(value: str) -> str | None:
    text = value.strip()
    return text or None


def _lines(value: str) -> list[str]:
    return [p.strip() for p in re.split(r"[\n,]", value) if p.strip()]


def _words(value: str) -> list[str]:
    return [p for p in re.split(r"[\s,;]+", value) if p]


# catalogue bodies ------------------------------------------------------------
GROUP_SLOTS = (
    Slot("name", "Name", ("name",)),
    Slot("kind", "Kind", ("kind",)),
    Slot("targets", "Targets", ("policy.targets",)),
    Slot("allow_cidrs", "Allowed networks", ("policy.origins.allow_cidrs",)),
    Slot("deny_cidrs", "Denied networks", ("policy.origins.deny_cidrs",)),
    Slot("countries", "Countries", ("policy.origins.countries",)),
    Slot("max_duration", "Maximum duration", ("policy.max_duration",)),
    Slot("idle_timeout", "Idle timeout", ("policy.idle_timeout",)),
    Slot("max_sessions", "Maximum sessions", ("policy.max_sessions",)),
    Slot("channels", "Channels", ("policy.channels",)),
)
GROUP_FIELDS = (
    "name",
    "kind",
    "allow_cidrs",
    "deny_cidrs",
    "countries",
    "max_duration.value",
    "max_duration.unit",
    "idle_timeout.value",
    "idle_timeout.unit",
    "max_sessions",
)


def group_body(form: Form) -> dict[str, Any]:
    """The ``create_group``/``update_group`` body for the group form."""
    return {
        "name": form.get("name"),
        "kind": form.get("kind"),
        "policy": {
            "targets": form.getall("targets"),
            "origins": {
                "allow_cidrs": _lines(form.get("allow_cidrs")),
                "deny_cidrs": _lines(form.get("deny_cidrs")),
                "countries": _words(form.get("countries")),
            },
            "max_duration": {
                "value": _int_or_raw(form.get("max_duration.value")),
                "unit": form.get("max_duration.unit"),
            },
            "idle_timeout": {
                "value": _int_or_raw(form.get("idle_timeout.value")),
                "unit": form.get("idle_timeout.unit"),
            },
            "max_sessions": _int_or_raw(form.get("max_sessions")),
            "channels": form.getall("channels"),
        },
    }


USER_SLOTS = (
    Slot("group_id", "Group", ("group_id",)),
    Slot("name", "Name", ("name",)),
    Slot("email", "E-mail", ("email",)),
    Slot("phone", "Phone", ("phone",)),
    Slot("channel", "Channel", ("channel",)),
)
USER_FIELDS = ("group_id", "name", "email", "phone", "channel")


def user_body(form: Form, *, create: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": form.get("name"),
        "email": _opt(form.get("email")),
        "phone": _opt(form.get("phone")),
        "channel": _opt(form.get("channel")),
    }
    if create:
        body["group_id"] = form.get("group_id")
    return body


REASON_SLOTS = (Slot("label", "Label", ("label",)),)
REASON_FIELDS = ("label",)


def reason_body(form: Form) -> dict[str, Any]:
    return {"label": form.get("label")}


TARGET_SLOTS = (
    Slot("name", "Name", ("name",)),
    Slot("protocol", "Protocol", ("protocol",)),
    Slot("url", "URL", ("url",)),
    Slot("host", "Host", ("host",)),
    Slot("port", "Port", ("port",)),
    Slot("ssh_host_key", "SSH host key", ("ssh_host_key",)),
    Slot("tls_verify", "Verify TLS", ("tls_verify",)),
)
TARGET_FIELDS = ("name", "protocol", "url", "host", "port", "ssh_host_key", "tls_verify")


def target_body(form: Form) -> dict[str, Any]:
    port = form.get("port").strip()
    return {
        "name": form.get("name"),
        "protocol": form.get("protocol"),
        "url": _opt(form.get("url")),
        "host": _opt(form.get("host")),
        "port": _int_or_raw(port) if port else None,
        "ssh_host_key": _opt(form.get("ssh_host_key")),
        "tls_verify": form.get("tls_verify") == "1",
    }


# the request wizard ----------------------------------------------------------
GENERAL_FIELDS = (
    "group_id",
    "user_id",
    "user.name",
    "user.email",
    "user.phone",
    "user.channel",
    "justification",
    "reason_id",
    "governance_code",
)
LIMIT_FIELDS = (
    "start_date",
    "start_time",
    "tz",
    "mode",
    "duration.value",
    "duration.unit",
    "end_date",
    "end_time",
)

_GENERAL_SLOTS = (
    Slot("group_id", "Group", ("group_id",)),
    Slot("user_id", "User", ("user_id",)),
    Slot("user.name", "Third-party name", ("user.name",)),
    Slot("user.email", "Third-party e-mail", ("user.email",)),
    Slot("user.phone", "Third-party phone", ("user.phone",)),
    Slot("user.channel", "Link channel", ("user.channel",)),
    Slot("justification", "Justification", ("justification",)),
    Slot("reason_id", "Reason", ("reason_id",)),
    Slot("governance_code", "Governance code", ("governance_code",)),
)
_LIMIT_SLOTS = (
    Slot("tz", "UTC offset", ("tz",)),
    Slot("start", "Start", ("start",)),
    Slot("duration.unit", "Unit", ("duration.unit",)),
    Slot("duration.value", "Duration", ("duration",)),
    Slot("end", "End", ("end",)),
)


def wizard_slots(kind: str) -> tuple[tuple[Slot, ...], tuple[Slot, ...]]:
    """(general-step slots, limit-step slots); third-party inline user errors go by field."""
    general = list(_GENERAL_SLOTS)
    user_label = "Third party" if kind == "third_party" else "User"
    general.append(Slot("user" if kind == "third_party" else "user_id", user_label, ("user",)))
    return tuple(general), _LIMIT_SLOTS


def tz_from_offset(offset: str) -> timezone | None:
    """``+05:30`` -> a fixed-offset timezone; None unless it is one of ``OFFSETS``."""
    if offset not in OFFSETS:
        return None
    sign = -1 if offset[0] == "-" else 1
    hours, minutes = int(offset[1:3]), int(offset[4:6])
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def offset_label(offset: str) -> str:
    return "UTC" if offset == "+00:00" else f"UTC{offset}"


def compose_instant(date: str, time: str, offset: str, name: str) -> tuple[str | None, FieldError | None]:
    """ISO 8601 text with offset from the date, time and offset inputs of a form.

    Only the shape is checked here; the service parses and judges the instant itself.
    """
    date, time = date.strip(), time.strip()
    if not date or not time:
        return None, FieldError(name, "needs a date and a time")
    if not _DATE.match(date) or not _TIME.match(time):
        return None, FieldError(name, "needs the date as YYYY-MM-DD and the time as HH:MM")
    if len(time) == 5:
        time += ":00"
    return f"{date}T{time}{offset}", None


def wizard_body(
    state: Mapping[str, str], kind: str, *, with_window: bool
) -> tuple[dict[str, Any], list[FieldError]]:
    """The ``review``/``create_request`` body from the wizard's state, and form-shape errors."""
    body: dict[str, Any] = {
        "group_id": state.get("group_id", ""),
        "justification": state.get("justification", ""),
        "reason_id": state.get("reason_id", ""),
    }
    governance = state.get("governance_code", "").strip()
    if governance:
        body["governance_code"] = governance
    if kind == "third_party":
        body["user"] = {
            "name": state.get("user.name", ""),
            "email": _opt(state.get("user.email", "")),
            "phone": _opt(state.get("user.phone", "")),
            "channel": _opt(state.get("user.channel", "")),
        }
    else:
        body["user_id"] = state.get("user_id", "")
    errors: list[FieldError] = []
    if not with_window:
        return body, errors
    offset = state.get("tz", "+00:00")
    if tz_from_offset(offset) is None:
        errors.append(FieldError("tz", "must be one of the offsets in the list"))
        offset = "+00:00"
    start, err = compose_instant(state.get("start_date", ""), state.get("start_time", ""), offset, "start")
    if err:
        errors.append(err)
    body["start"] = start
    if state.get("mode") == "custom":
        end, err = compose_instant(state.get("end_date", ""), state.get("end_time", ""), offset, "end")
        if err:
            errors.append(err)
        body["end"] = end
    else:
        body["duration"] = {
            "value": _int_or_raw(state.get("duration.value", "")),
            "unit": state.get("duration.unit", ""),
        }
    return body, errors


def default_start(now: datetime) -> datetime:
    """The next quarter hour after ``now`` (UTC): a sensible first value for the wizard."""
    base = now.astimezone(UTC).replace(second=0, microsecond=0)
    return base + timedelta(minutes=15 - base.minute % 15)
