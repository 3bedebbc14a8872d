"""Access-window arithmetic: instants, durations and the window an access request asks for.

The window is the first thing every enforcement point checks, and calendar months,
UTC offsets and the 15-minute grid are easy to get subtly wrong. Keeping the rules here,
pure (no clock, no I/O), lets the tests cover them exhaustively and lets the API, the
scheduler and ``decide`` agree on one meaning of "start", "end" and "one month".

Conventions:
- Instants from the outside must carry an explicit UTC offset; a naive time is refused
  rather than guessed, because a guess silently shifts a window by hours.
- Calendar months are counted in the wall time of the offset the caller gave (an admin in
  +02:00 asking for one month from 31 January 09:00 gets 28/29 February 09:00 +02:00).
- Minutes, hours and days are exact elapsed time.
- Windows are half-open, ``[start, end)``, and are returned in UTC.
"""

from __future__ import annotations

import calendar
from collections.abc import Callable, Mapping
from datetime import MAXYEAR, MINYEAR, UTC, datetime, timedelta
from typing import TypeVar

from domum_gateway.errors import FieldError, ValidationError
from domum_gateway.model import Duration, DurationUnit

__all__ = [
    "GRID_MINUTES",
    "MAX_DURATION_VALUE",
    "add_duration",
    "compute_window",
    "describe_duration",
    "duration_seconds_upper",
    "is_on_grid",
    "parse_duration",
    "parse_instant",
]

GRID_MINUTES = 15
"""Custom windows start and end on quarter hours, so schedules stay readable."""

MAX_DURATION_VALUE = 100_000
"""Upper bound for ``Duration.value``; the group policy caps real windows far below it."""

_T = TypeVar("_T")
_MAX_INSTANT_CHARS = 64
_INSTANT_HINT = "must be an ISO 8601 date and time with a UTC offset, e.g. 2026-05-01T09:00:00+02:00"
_OFFSET_HINT = "must include a UTC offset, e.g. 2026-05-01T09:00:00+02:00"
_GRID_HINT = "must be on the 15-minute grid (e.g. 09:00, 09:15, 09:30, 09:45, seconds 0)"
_UNITS = {u.value: u for u in DurationUnit}
_UNITS_HINT = "must be one of " + ", ".join(u.value for u in DurationUnit)
_EXACT_SECONDS = {
    DurationUnit.MINUTES: 60,
    DurationUnit.HOURS: 3600,
    DurationUnit.DAYS: 86_400,
}
_MONTH_UPPER_SECONDS = 31 * 86_400
_DURATION_KEYS = frozenset({"value", "unit"})


def parse_instant(value: object, field: str) -> datetime:
    """Parse an ISO 8601 date-time that carries a UTC offset (``+02:00`` or ``Z``).

    Args:
        value: the raw JSON value (a string), or an already aware ``datetime``.
        field: the field name reported in the ``ValidationError``.

    Returns:
        An aware datetime that keeps the offset it was given in, so calendar arithmetic
        can happen in the caller's wall time.

    Raises:
        ValidationError: not a string, not ISO 8601, no offset, an offset that is not
            whole minutes, or an instant that cannot be expressed in UTC.
    """
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        text = value.strip()
        # isascii: fromisoformat is ASCII-only today, but refusing early keeps it so.
        if not text or len(text) > _MAX_INSTANT_CHARS or not text.isascii():
            raise ValidationError.one(field, _INSTANT_HINT)
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as exc:
            raise ValidationError.one(field, _INSTANT_HINT) from exc
    else:
        raise ValidationError.one(field, _INSTANT_HINT)
    offset = parsed.utcoffset()
    if offset is None:
        raise ValidationError.one(field, _OFFSET_HINT)
    if offset % timedelta(minutes=1):
        raise ValidationError.one(field, "must use a UTC offset in whole minutes, e.g. +05:30")
    try:
        parsed.astimezone(UTC)
    except OverflowError as exc:
        raise ValidationError.one(field, "is out of range") from exc
    return parsed


def parse_duration(raw: object, field: str) -> Duration:
    """Parse ``{"value": int, "unit": "minutes|hours|days|months"}`` (requests and policies).

    Unknown keys are refused, like everywhere else in the API. ``value`` must be a real
    integer (``true`` is not 1) between 1 and ``MAX_DURATION_VALUE``.

    Raises:
        ValidationError: with one entry per bad sub-field (``duration.value`` ...).
    """
    if isinstance(raw, Duration):
        raw = raw.to_json()
    if not isinstance(raw, Mapping):
        raise ValidationError.one(field, 'must be an object like {"value": 2, "unit": "hours"}')
    errors = [
        FieldError(f"{field}.{key}", "is not a known field")
        for key in sorted(str(k) for k in raw if k not in _DURATION_KEYS)
    ]
    value = raw.get("value")
    good_value: int | None = None
    if "value" not in raw:
        errors.append(FieldError(f"{field}.value", "is required"))
    elif not isinstance(value, int) or isinstance(value, bool):
        errors.append(FieldError(f"{field}.value", "must be a whole number"))
    elif not 1 <= value <= MAX_DURATION_VALUE:
        errors.append(FieldError(f"{field}.value", f"must be between 1 and {MAX_DURATION_VALUE}"))
    else:
        good_value = value
    unit = raw.get("unit")
    good_unit: DurationUnit | None = None
    if "unit" not in raw:
        errors.append(FieldError(f"{field}.unit", "is required"))
    elif not isinstance(unit, str) or unit not in _UNITS:
        errors.append(FieldError(f"{field}.unit", _UNITS_HINT))
    else:
        good_unit = _UNITS[unit]
    if errors or good_value is None or good_unit is None:
        raise ValidationError(errors)
    return Duration(good_value, good_unit)


def add_duration(start: datetime, duration: Duration) -> datetime:
    """Return ``start`` moved forward by ``duration``, in ``start``'s own timezone.

    Months are calendar months in ``start``'s wall time, the day clamped to the target
    month's last day (31 January + 1 month = 28 or 29 February). Other units are exact
    elapsed time.

    Raises:
        ValueError: ``start`` is naive (a programming error: parse it first).
        OverflowError: the result is outside what ``datetime`` can represent.
    """
    if start.utcoffset() is None:
        raise ValueError("start must be timezone-aware")
    if duration.unit is DurationUnit.MONTHS:
        return _add_months(start, duration.value)
    delta = timedelta(seconds=duration.value * _EXACT_SECONDS[duration.unit])
    # Through UTC so that a zone with DST changes still gets exact elapsed time.
    return (start.astimezone(UTC) + delta).astimezone(start.tzinfo)


def _add_months(start: datetime, months: int) -> datetime:
    index = start.month - 1 + months
    year = start.year + index // 12
    if not MINYEAR <= year <= MAXYEAR:
        raise OverflowError("date value out of range")
    month = index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day)


def is_on_grid(instant: datetime) -> bool:
    """Whether ``instant`` sits on a quarter hour, read in the offset it carries."""
    return instant.minute % GRID_MINUTES == 0 and instant.second == 0 and instant.microsecond == 0


def compute_window(
    start_raw: object,
    duration_raw: object | None,
    end_raw: object | None,
    max_duration: Duration,
) -> tuple[datetime, datetime]:
    """Validate a requested access window and return ``(start, end)`` in UTC.

    Exactly one of ``duration_raw`` and ``end_raw`` must be given. A custom ``end``
    requires both instants on the 15-minute grid; a duration window may start at any
    moment. The window may not be longer than ``add_duration(start, max_duration)``.

    Args:
        start_raw: the request's ``start`` (ISO 8601 with offset).
        duration_raw: the request's ``duration`` object, or None.
        end_raw: the request's ``end`` (ISO 8601 with offset), or None.
        max_duration: the group policy's cap.

    Raises:
        ValidationError: naming every bad field (``start``, ``end``, ``duration``,
            ``duration.value`` ...).
    """
    errors: list[FieldError] = []
    start = _collect(errors, lambda: parse_instant(start_raw, "start"))
    end: datetime | None = None
    length_field = "duration"
    if duration_raw is None and end_raw is None:
        errors.append(FieldError("duration", "give either duration or end"))
    elif duration_raw is not None and end_raw is not None:
        errors.append(FieldError("end", "give either duration or end, not both"))
    elif duration_raw is not None:
        duration = _collect(errors, lambda: parse_duration(duration_raw, "duration"))
        if start is not None and duration is not None:
            try:
                end = add_duration(start, duration)
                end.astimezone(UTC)
            except OverflowError:
                errors.append(FieldError("duration", "is too long"))
                end = None
    else:
        length_field = "end"
        end = _collect(errors, lambda: parse_instant(end_raw, "end"))
        if start is not None and not is_on_grid(start):
            errors.append(FieldError("start", _GRID_HINT))
        if end is not None and not is_on_grid(end):
            errors.append(FieldError("end", _GRID_HINT))
        if start is not None and end is not None and end <= start:
            errors.append(FieldError("end", "must be after start"))
    if errors or start is None or end is None:
        raise ValidationError(errors)  # every path that leaves a None also added an error
    if not _within(start, end, max_duration):
        raise ValidationError.one(
            length_field,
            f"must not exceed the group's maximum of {describe_duration(max_duration)}",
        )
    return start.astimezone(UTC), end.astimezone(UTC)


def _within(start: datetime, end: datetime, max_duration: Duration) -> bool:
    try:
        limit = add_duration(start, max_duration)
        limit.astimezone(UTC)
    except OverflowError:
        return True  # the cap lies beyond any representable instant
    return end <= limit


def _collect(errors: list[FieldError], parse: Callable[[], _T]) -> _T | None:
    try:
        return parse()
    except ValidationError as exc:
        errors.extend(exc.errors)
        return None


def describe_duration(duration: Duration) -> str:
    """Words for a duration, e.g. ``1 month`` or ``30 days``, for messages to people."""
    unit = duration.unit.value
    return f"{duration.value} {unit[:-1] if duration.value == 1 else unit}"


def duration_seconds_upper(duration: Duration) -> int:
    """An upper bound in seconds (a month counts as 31 days), for timeouts and caches."""
    if duration.unit is DurationUnit.MONTHS:
        return duration.value * _MONTH_UPPER_SECONDS
    return duration.value * _EXACT_SECONDS[duration.unit]
