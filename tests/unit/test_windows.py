"""Access-window arithmetic: instants with offsets, calendar months, the 15-minute grid."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domum_gateway.auth.windows import (
    MAX_DURATION_VALUE,
    add_duration,
    compute_window,
    describe_duration,
    duration_seconds_upper,
    is_on_grid,
    parse_duration,
    parse_instant,
)
from domum_gateway.errors import ValidationError
from domum_gateway.model import Duration, DurationUnit

PLUS_0530 = timezone(timedelta(hours=5, minutes=30))
MINUS_0800 = timezone(timedelta(hours=-8))
THIRTY_DAYS = Duration(30, DurationUnit.DAYS)
ONE_MONTH = Duration(1, DurationUnit.MONTHS)

offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
aware = st.datetimes(
    min_value=datetime(1990, 1, 1),
    max_value=datetime(2200, 12, 31),
    timezones=offsets,
)
durations = st.builds(
    Duration,
    st.integers(min_value=1, max_value=2000),
    st.sampled_from(list(DurationUnit)),
)


def fields(exc: pytest.ExceptionInfo[ValidationError]) -> dict[str, str]:
    return {e.field: e.message for e in exc.value.errors}


# parse_instant


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2026-05-01T09:00:00+02:00", datetime(2026, 5, 1, 9, tzinfo=timezone(timedelta(hours=2)))),
        ("2026-05-01T09:00:00Z", datetime(2026, 5, 1, 9, tzinfo=UTC)),
        ("2026-05-01T09:00+05:30", datetime(2026, 5, 1, 9, tzinfo=PLUS_0530)),
        (" 2026-05-01T09:00:00-08:00 ", datetime(2026, 5, 1, 9, tzinfo=MINUS_0800)),
        ("2026-05-01T09:00:00.250+00:00", datetime(2026, 5, 1, 9, 0, 0, 250000, tzinfo=UTC)),
    ],
)
def test_parse_instant_keeps_the_given_offset(raw: str, expected: datetime) -> None:
    parsed = parse_instant(raw, "start")
    assert parsed == expected
    assert parsed.utcoffset() == expected.utcoffset()


def test_parse_instant_accepts_aware_datetime() -> None:
    value = datetime(2026, 5, 1, 9, tzinfo=PLUS_0530)
    assert parse_instant(value, "start") is value


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("2026-05-01T09:00:00", "must include a UTC offset"),
        ("2026-05-01", "must include a UTC offset"),
        (datetime(2026, 5, 1, 9), "must include a UTC offset"),
        ("2026-05-01T09:00:00+02:00:30", "whole minutes"),
        ("yesterday", "ISO 8601"),
        ("", "ISO 8601"),
        ("2026-13-01T09:00:00Z", "ISO 8601"),
        ("\uff12026-05-01T09:00:00Z", "ISO 8601"),
        ("x" * 100, "ISO 8601"),
        (1746090000, "ISO 8601"),
        (None, "ISO 8601"),
        (True, "ISO 8601"),
        (["2026-05-01T09:00:00Z"], "ISO 8601"),
        ("9999-12-31T23:00:00-05:00", "out of range"),
        ("0001-01-01T00:00:00+01:00", "out of range"),
    ],
)
def test_parse_instant_errors_name_the_field(raw: object, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        parse_instant(raw, "end")
    assert list(fields(exc)) == ["end"]
    assert message in fields(exc)["end"]


def test_naive_instant_message_shows_an_example() -> None:
    with pytest.raises(ValidationError) as exc:
        parse_instant("2026-05-01T09:00:00", "start")
    assert fields(exc) == {"start": "must include a UTC offset, e.g. 2026-05-01T09:00:00+02:00"}


# parse_duration


@pytest.mark.parametrize("unit", list(DurationUnit))
def test_parse_duration_accepts_every_unit(unit: DurationUnit) -> None:
    assert parse_duration({"value": 3, "unit": unit.value}, "d") == Duration(3, unit)


def test_parse_duration_accepts_bounds_and_duration_values() -> None:
    assert parse_duration({"value": 1, "unit": "days"}, "d").value == 1
    top = parse_duration({"value": MAX_DURATION_VALUE, "unit": "minutes"}, "d")
    assert top.value == MAX_DURATION_VALUE
    assert parse_duration(ONE_MONTH, "d") == ONE_MONTH


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("2 hours", {"policy.max": "must be an object"}),
        (None, {"policy.max": "must be an object"}),
        ([2, "hours"], {"policy.max": "must be an object"}),
        ({"unit": "hours"}, {"policy.max.value": "is required"}),
        ({"value": 2}, {"policy.max.unit": "is required"}),
        ({}, {"policy.max.value": "is required", "policy.max.unit": "is required"}),
        ({"value": True, "unit": "hours"}, {"policy.max.value": "whole number"}),
        ({"value": 2.0, "unit": "hours"}, {"policy.max.value": "whole number"}),
        ({"value": "2", "unit": "hours"}, {"policy.max.value": "whole number"}),
        ({"value": 0, "unit": "hours"}, {"policy.max.value": "between 1 and 100000"}),
        ({"value": -1, "unit": "hours"}, {"policy.max.value": "between 1 and 100000"}),
        ({"value": 100001, "unit": "hours"}, {"policy.max.value": "between 1 and 100000"}),
        ({"value": 2, "unit": "weeks"}, {"policy.max.unit": "minutes, hours, days, months"}),
        ({"value": 2, "unit": "Hours"}, {"policy.max.unit": "must be one of"}),
        ({"value": 2, "unit": 1}, {"policy.max.unit": "must be one of"}),
        (
            {"value": 2, "unit": "hours", "extra": 1},
            {"policy.max.extra": "is not a known field"},
        ),
    ],
)
def test_parse_duration_errors(raw: object, expected: dict[str, str]) -> None:
    with pytest.raises(ValidationError) as exc:
        parse_duration(raw, "policy.max")
    got = fields(exc)
    assert set(got) == set(expected)
    for field, message in expected.items():
        assert message in got[field]


# add_duration


@pytest.mark.parametrize(
    ("start", "duration", "end"),
    [
        (datetime(2026, 1, 31, 9, tzinfo=UTC), ONE_MONTH, datetime(2026, 2, 28, 9, tzinfo=UTC)),
        (datetime(2028, 1, 31, 9, tzinfo=UTC), ONE_MONTH, datetime(2028, 2, 29, 9, tzinfo=UTC)),
        (
            datetime(2028, 2, 29, 9, tzinfo=UTC),
            Duration(12, DurationUnit.MONTHS),
            datetime(2029, 2, 28, 9, tzinfo=UTC),
        ),
        (
            datetime(2026, 3, 31, tzinfo=UTC),
            ONE_MONTH,
            datetime(2026, 4, 30, tzinfo=UTC),
        ),
        (
            datetime(2026, 12, 15, tzinfo=UTC),
            Duration(2, DurationUnit.MONTHS),
            datetime(2027, 2, 15, tzinfo=UTC),
        ),
        (
            datetime(2026, 5, 1, 23, 50, tzinfo=UTC),
            Duration(15, DurationUnit.MINUTES),
            datetime(2026, 5, 2, 0, 5, tzinfo=UTC),
        ),
        (
            datetime(2026, 5, 1, 9, tzinfo=UTC),
            Duration(36, DurationUnit.HOURS),
            datetime(2026, 5, 2, 21, tzinfo=UTC),
        ),
        (
            datetime(2028, 2, 28, 9, tzinfo=UTC),
            Duration(2, DurationUnit.DAYS),
            datetime(2028, 3, 1, 9, tzinfo=UTC),
        ),
    ],
)
def test_add_duration_table(start: datetime, duration: Duration, end: datetime) -> None:
    assert add_duration(start, duration) == end


def test_months_are_counted_in_the_given_offset() -> None:
    # 31 Jan 01:00 +05:30 is 30 Jan 19:30 UTC. In the caller's offset the month ends
    # on 28 Feb 01:00 +05:30 (clamped); counted in UTC it would be 28 Feb 19:30 UTC.
    start = datetime(2026, 1, 31, 1, 0, tzinfo=PLUS_0530)
    end = add_duration(start, ONE_MONTH)
    assert end == datetime(2026, 2, 28, 1, 0, tzinfo=PLUS_0530)
    assert end.utcoffset() == timedelta(hours=5, minutes=30)
    assert end.astimezone(UTC) == datetime(2026, 2, 27, 19, 30, tzinfo=UTC)


def test_month_end_clamp_in_negative_offset() -> None:
    start = datetime(2026, 1, 31, 22, 0, tzinfo=MINUS_0800)  # 1 Feb 06:00 UTC
    assert add_duration(start, ONE_MONTH) == datetime(2026, 2, 28, 22, 0, tzinfo=MINUS_0800)


def test_hours_are_elapsed_time_across_dst() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    start = datetime(2026, 3, 28, 12, 0, tzinfo=berlin)  # day before spring forward
    end = add_duration(start, Duration(24, DurationUnit.HOURS))
    assert (end.day, end.hour) == (29, 13)  # the wall clock jumped an hour
    assert end.astimezone(UTC) - start.astimezone(UTC) == timedelta(hours=24)


def test_add_duration_refuses_naive_and_overflow() -> None:
    with pytest.raises(ValueError, match="aware"):
        add_duration(datetime(2026, 1, 1), ONE_MONTH)
    with pytest.raises(OverflowError):
        add_duration(datetime(9999, 6, 1, tzinfo=UTC), Duration(12, DurationUnit.MONTHS))
    with pytest.raises(OverflowError):
        add_duration(datetime(9999, 6, 1, tzinfo=UTC), Duration(1000, DurationUnit.DAYS))


@given(start=aware, duration=durations)
def test_add_duration_moves_forward_and_keeps_offset(start: datetime, duration: Duration) -> None:
    end = add_duration(start, duration)
    assert end > start
    assert end.utcoffset() == start.utcoffset()
    assert end - start <= timedelta(seconds=duration_seconds_upper(duration))


@given(start=aware)
def test_one_month_clamps_to_last_day(start: datetime) -> None:
    end = add_duration(start, ONE_MONTH)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    assert (end.year, end.month) == (year, month)
    assert end.day == min(start.day, calendar.monthrange(year, month)[1])
    assert end.time() == start.time()


@given(start=aware, months=st.integers(min_value=1, max_value=240))
def test_months_compose_when_no_clamp(start: datetime, months: int) -> None:
    if start.day <= 28:
        stepped = start
        for _ in range(months):
            stepped = add_duration(stepped, ONE_MONTH)
        assert stepped == add_duration(start, Duration(months, DurationUnit.MONTHS))


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [
        (Duration(5, DurationUnit.MINUTES), 300),
        (Duration(2, DurationUnit.HOURS), 7200),
        (Duration(1, DurationUnit.DAYS), 86400),
        (Duration(2, DurationUnit.MONTHS), 2 * 31 * 86400),
    ],
)
def test_duration_seconds_upper(duration: Duration, seconds: int) -> None:
    assert duration_seconds_upper(duration) == seconds


@pytest.mark.parametrize(
    ("duration", "words"),
    [
        (Duration(1, DurationUnit.MONTHS), "1 month"),
        (Duration(30, DurationUnit.DAYS), "30 days"),
        (Duration(1, DurationUnit.HOURS), "1 hour"),
        (Duration(90, DurationUnit.MINUTES), "90 minutes"),
    ],
)
def test_describe_duration(duration: Duration, words: str) -> None:
    assert describe_duration(duration) == words


# compute_window


def test_duration_window_returns_utc() -> None:
    start, end = compute_window("2026-05-01T09:07:13+02:00", {"value": 2, "unit": "hours"}, None, THIRTY_DAYS)
    assert start == datetime(2026, 5, 1, 7, 7, 13, tzinfo=UTC)
    assert end == datetime(2026, 5, 1, 9, 7, 13, tzinfo=UTC)
    assert start.tzinfo is UTC and end.tzinfo is UTC


def test_duration_window_month_clamp_in_offset() -> None:
    start, end = compute_window("2028-01-31T09:00:00+05:30", {"value": 1, "unit": "months"}, None, ONE_MONTH)
    assert end == datetime(2028, 2, 29, 9, 0, tzinfo=PLUS_0530)
    assert start == datetime(2028, 1, 31, 3, 30, tzinfo=UTC)


def test_custom_window_on_grid() -> None:
    start, end = compute_window("2026-05-01T09:15:00-08:00", None, "2026-05-03T17:45:00Z", THIRTY_DAYS)
    assert start == datetime(2026, 5, 1, 17, 15, tzinfo=UTC)
    assert end == datetime(2026, 5, 3, 17, 45, tzinfo=UTC)


def test_custom_window_grid_is_read_in_the_given_offset() -> None:
    # 09:00 +05:45 is 03:15 UTC: on the grid either way, but 09:10 +05:45 (03:25 UTC)
    # is off the grid locally while 09:15 +05:45 (03:30 UTC) is on it.
    nepal = "+05:45"
    compute_window(f"2026-05-01T09:15:00{nepal}", None, f"2026-05-01T10:00:00{nepal}", ONE_MONTH)
    with pytest.raises(ValidationError) as exc:
        compute_window(f"2026-05-01T09:10:00{nepal}", None, f"2026-05-01T10:00:00{nepal}", ONE_MONTH)
    assert "15-minute grid" in fields(exc)["start"]


def test_exactly_the_maximum_is_allowed() -> None:
    start, end = compute_window("2026-01-31T00:00:00Z", None, "2026-02-28T00:00:00Z", ONE_MONTH)
    assert end - start == timedelta(days=28)
    compute_window("2026-05-01T00:00:00Z", {"value": 30, "unit": "days"}, None, THIRTY_DAYS)


@pytest.mark.parametrize(
    ("start", "duration", "end", "expected"),
    [
        (None, {"value": 1, "unit": "hours"}, None, {"start": "ISO 8601"}),
        ("2026-05-01T09:00:00", {"value": 1, "unit": "hours"}, None, {"start": "UTC offset"}),
        ("2026-05-01T09:00:00Z", None, None, {"duration": "either duration or end"}),
        (
            "2026-05-01T09:00:00Z",
            {"value": 1, "unit": "hours"},
            "2026-05-01T10:00:00Z",
            {"end": "not both"},
        ),
        (
            "2026-05-01T09:00:00Z",
            {"value": 0, "unit": "hours"},
            None,
            {"duration.value": "between"},
        ),
        (
            "2026-05-01T09:00:00Z",
            {"value": True, "unit": "hours"},
            None,
            {"duration.value": "whole"},
        ),
        ("2026-05-01T09:00:00Z", {"value": 1, "unit": "weeks"}, None, {"duration.unit": "one of"}),
        ("2026-05-01T09:00:00Z", "1h", None, {"duration": "must be an object"}),
        (
            "2026-05-01T09:00:00Z",
            {"value": 31, "unit": "days"},
            None,
            {"duration": "must not exceed the group's maximum of 30 days"},
        ),
        (
            "2026-05-01T09:00:00Z",
            {"value": 2, "unit": "months"},
            None,
            {"duration": "maximum of 30 days"},
        ),
        ("2026-05-01T09:00:00Z", None, "2026-05-01T10:00:00", {"end": "UTC offset"}),
        ("2026-05-01T09:00:00Z", None, 42, {"end": "ISO 8601"}),
        ("2026-05-01T09:05:00Z", None, "2026-05-01T10:00:00Z", {"start": "15-minute grid"}),
        ("2026-05-01T09:00:30Z", None, "2026-05-01T10:00:00Z", {"start": "15-minute grid"}),
        (
            "2026-05-01T09:00:00.001Z",
            None,
            "2026-05-01T10:00:00Z",
            {"start": "15-minute grid"},
        ),
        ("2026-05-01T09:00:00Z", None, "2026-05-01T10:01:00Z", {"end": "15-minute grid"}),
        ("2026-05-01T09:00:00Z", None, "2026-05-01T09:00:00Z", {"end": "after start"}),
        ("2026-05-01T09:00:00Z", None, "2026-05-01T08:45:00Z", {"end": "after start"}),
        # Same wall time, earlier instant: 09:00 +02:00 is 07:00 UTC.
        ("2026-05-01T09:00:00Z", None, "2026-05-01T09:00:00+02:00", {"end": "after start"}),
        (
            "2026-05-01T09:00:00Z",
            None,
            "2026-05-31T09:15:00Z",
            {"end": "must not exceed the group's maximum of 30 days"},
        ),
        (
            "2026-05-01T09:05:00Z",
            None,
            "2026-05-01T10:01:00Z",
            {"start": "15-minute grid", "end": "15-minute grid"},
        ),
        (
            "garbage",
            {"value": 0, "unit": "hours"},
            None,
            {"start": "ISO 8601", "duration.value": "between"},
        ),
        (
            "9000-01-01T00:00:00Z",
            {"value": 100000, "unit": "months"},
            None,
            {"duration": "too long"},
        ),
    ],
)
def test_compute_window_errors(
    start: object, duration: object, end: object, expected: dict[str, str]
) -> None:
    with pytest.raises(ValidationError) as exc:
        compute_window(start, duration, end, THIRTY_DAYS)
    got = fields(exc)
    assert set(got) == set(expected), got
    for field, message in expected.items():
        assert message in got[field]


def test_cap_beyond_the_calendar_means_no_cap() -> None:
    huge = Duration(MAX_DURATION_VALUE, DurationUnit.MONTHS)
    start, end = compute_window("9000-01-01T00:00:00Z", {"value": 5, "unit": "days"}, None, huge)
    assert end - start == timedelta(days=5)


@given(start=aware, duration=durations)
def test_duration_window_is_ordered_utc_and_capped(start: datetime, duration: Duration) -> None:
    cap = Duration(2000, DurationUnit.MONTHS)
    got_start, got_end = compute_window(start.isoformat(), duration.to_json(), None, cap)
    assert got_end > got_start
    assert got_start == start
    assert got_start.utcoffset() == timedelta(0) and got_end.utcoffset() == timedelta(0)
    assert got_end == add_duration(start, duration)


quarter_hours = st.builds(
    lambda day, quarter, tz: datetime(2026, 1, 1, tzinfo=tz) + timedelta(days=day, minutes=15 * quarter),
    st.integers(min_value=0, max_value=3650),
    st.integers(min_value=0, max_value=95),
    offsets.filter(lambda tz: tz.utcoffset(None) % timedelta(minutes=15) == timedelta(0)),
)


@given(start=quarter_hours, length=st.integers(min_value=1, max_value=30 * 96))
def test_custom_window_on_grid_is_accepted(start: datetime, length: int) -> None:
    end = start + timedelta(minutes=15 * length)
    assert is_on_grid(start) and is_on_grid(end)
    got = compute_window(start.isoformat(), None, end.isoformat(), THIRTY_DAYS)
    assert got == (start, end)


@given(start=aware, end=aware)
def test_compute_window_either_returns_ordered_or_raises(start: datetime, end: datetime) -> None:
    args: list[Any] = [start.isoformat(), None, end.isoformat(), ONE_MONTH]
    try:
        got_start, got_end = compute_window(*args)
    except ValidationError as exc:
        assert exc.errors
        assert {e.field for e in exc.errors} <= {"start", "end"}
    else:
        assert got_start < got_end
