"""The window and origin parsers on arbitrary input: they answer or refuse, never crash.

Everything a client or an administrator can send reaches these functions: text of any
shape, JSON of any type. Each must either return a value that keeps its documented
promises or raise its one documented error (``ValidationError`` / ``ValueError``) naming
the field; any other exception would be a 500 on the API or a crash in a decision.
"""

from __future__ import annotations

import ipaddress
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

from domum_gateway.auth.origin import (
    IPAddress,
    client_address,
    normalise_address,
    parse_cidrs,
    parse_countries,
    parse_network,
)
from domum_gateway.auth.windows import (
    MAX_DURATION_VALUE,
    add_duration,
    compute_window,
    is_on_grid,
    parse_duration,
    parse_instant,
)
from domum_gateway.errors import ValidationError
from domum_gateway.model import Duration, DurationUnit

from .profiles import FUZZ

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
offsets = st.integers(min_value=-1439, max_value=1439).map(lambda m: timezone(timedelta(minutes=m)))
aware = st.datetimes(min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=offsets)
# Text that looks like an instant, to get past the first checks more often than random text.
instant_like = st.builds(
    lambda d, sep, tail: d.isoformat(sep=sep) + tail,
    st.datetimes(timezones=st.none() | offsets),
    st.sampled_from(["T", " ", "t"]),
    st.sampled_from(["", "Z", "z", "+00:00", "-00:30", "+24:00", "+05:30:15", " ", "\x00"]),
)
# On the 15-minute grid in their own offset, so custom windows get past the grid check.
quarter_hours = aware.map(lambda d: d.replace(minute=d.minute - d.minute % 15, second=0, microsecond=0))
durations = st.builds(
    Duration, st.integers(min_value=1, max_value=MAX_DURATION_VALUE), st.sampled_from(list(DurationUnit))
)


def _fields(exc: ValidationError) -> list[str]:
    assert exc.errors, "a ValidationError must name at least one field"
    return [e.field for e in exc.errors]


# windows ---------------------------------------------------------------------


@FUZZ
@given(st.one_of(st.text(max_size=80), instant_like, json_values))
def test_parse_instant_answers_aware_or_refuses(raw: Any) -> None:
    try:
        parsed = parse_instant(raw, "start")
    except ValidationError as exc:
        assert _fields(exc) == ["start"]
        return
    offset = parsed.utcoffset()
    assert offset is not None and offset % timedelta(minutes=1) == timedelta(0)
    parsed.astimezone(UTC)  # representable in UTC
    assert isinstance(raw, str) and raw.strip()


@FUZZ
@given(aware)
def test_parse_instant_round_trips_with_its_offset(instant: datetime) -> None:
    parsed = parse_instant(instant.isoformat(), "start")
    assert parsed == instant and parsed.utcoffset() == instant.utcoffset()


@FUZZ
@given(json_values | st.fixed_dictionaries({"value": json_values, "unit": json_values}))
def test_parse_duration_answers_in_range_or_names_the_fields(raw: Any) -> None:
    try:
        duration = parse_duration(raw, "duration")
    except ValidationError as exc:
        assert all(f == "duration" or f.startswith("duration.") for f in _fields(exc))
        return
    assert 1 <= duration.value <= MAX_DURATION_VALUE
    assert raw == duration.to_json()


window_args = {
    "start": st.one_of(
        quarter_hours.map(datetime.isoformat), aware.map(datetime.isoformat), instant_like, json_values
    ),
    "length": st.one_of(
        durations.map(Duration.to_json),
        quarter_hours.map(datetime.isoformat),
        st.none(),
        json_values,
        aware.map(datetime.isoformat),
        instant_like,
    ),
    "use_end": st.booleans(),
    "cap": durations,
}


def test_window_arguments_reach_both_kinds_of_window() -> None:
    """Guard against a vacuous property: valid duration and custom windows are generated."""
    quick = settings(database=None, max_examples=5_000, phases=[Phase.generate])
    for use_end in (False, True):
        find(
            st.fixed_dictionaries({**window_args, "use_end": st.just(use_end)}),
            lambda a: _window(**a) is not None,
            settings=quick,
        )


def _window(start: Any, length: Any, use_end: bool, cap: Duration) -> tuple[datetime, datetime] | None:
    duration_raw, end_raw = (None, length) if use_end else (length, None)
    try:
        window: tuple[datetime, datetime] = compute_window(start, duration_raw, end_raw, cap)
    except ValidationError:
        return None
    return window


@FUZZ
@given(**window_args)
def test_compute_window_is_ordered_capped_and_on_grid_or_refused(
    start: Any, length: Any, use_end: bool, cap: Duration
) -> None:
    duration_raw, end_raw = (None, length) if use_end else (length, None)
    try:
        got_start, got_end = compute_window(start, duration_raw, end_raw, cap)
    except ValidationError as exc:
        assert set(_fields(exc)) <= {"start", "end", "duration", "duration.value", "duration.unit"} | {
            f for f in _fields(exc) if f.startswith("duration.")
        }
        return
    assert got_start.utcoffset() == timedelta(0) and got_end.utcoffset() == timedelta(0)
    assert got_start < got_end
    given_start = parse_instant(start, "start")
    try:
        limit = add_duration(given_start, cap)
        limit.astimezone(UTC)
    except OverflowError:
        limit = None
    if limit is not None:
        assert got_end <= limit
    if end_raw is not None:
        assert is_on_grid(given_start) and is_on_grid(parse_instant(end_raw, "end"))


# origins ---------------------------------------------------------------------

address_like = st.one_of(
    st.text(max_size=70),
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.ip_addresses(v=6).map(lambda a: f"{a}%eth0"),
    st.lists(st.integers(min_value=0, max_value=999).map(lambda n: f"{n:03d}"), min_size=4, max_size=4).map(
        ".".join
    ),
)


@FUZZ
@given(address_like)
def test_normalise_address_answers_canonical_or_refuses(raw: str) -> None:
    try:
        address = normalise_address(raw)
    except ValueError:
        return
    # Canonical: the answer parses back to itself, and a mapped IPv4 is never left as IPv6.
    assert normalise_address(str(address)) == address
    assert not (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None)
    # No octal ambiguity got through (010.0.0.1 is refused, not read as 10.0.0.1 or 8.0.0.1).
    tail = raw.strip().strip("[]").partition("%")[0].rsplit(":", 1)[-1]
    assert not any(len(o) > 1 and o[0] == "0" for o in tail.split(".")) or "." not in tail


@FUZZ
@given(
    st.one_of(
        st.text(max_size=100),
        address_like.map(lambda a: a + "/24"),
        st.from_regex(r"\A[0-9a-f:.]{1,40}/[0-9]{1,4}\Z"),
    )
)
def test_parse_network_answers_canonical_or_refuses(raw: str) -> None:
    try:
        network = parse_network(raw)
    except ValueError:
        return
    assert parse_network(str(network)) == network
    assert isinstance(network, ipaddress.IPv4Network | ipaddress.IPv6Network)


@FUZZ
@given(st.ip_addresses(), st.data())
def test_a_network_contains_the_address_it_was_written_from(address: IPAddress, data: st.DataObject) -> None:
    # An IPv4-mapped address is an IPv4 client: only networks inside ::ffff:0:0/96 (which
    # parse to IPv4 networks) speak about it; a wider IPv6 rule such as ::/0 does not.
    mapped = isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
    prefix = data.draw(st.integers(min_value=96 if mapped else 0, max_value=address.max_prefixlen))
    network = parse_network(f"{address}/{prefix}")
    assert normalise_address(str(address)) in network
    if isinstance(address, ipaddress.IPv4Address):
        # Written as an IPv4-mapped IPv6 network, it still catches the plain IPv4 address.
        assert address in parse_network(f"::ffff:{address}/{96 + prefix}")


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=30), json_values, st.ip_addresses().map(str)), max_size=6))
def test_parse_cidrs_and_countries_name_each_bad_item(values: list[Any]) -> None:
    for parse, field in ((parse_cidrs, "origins.allow_cidrs"), (parse_countries, "origins.countries")):
        try:
            out = parse(values, field)
        except ValidationError as exc:
            for name in _fields(exc):
                assert name.startswith(f"{field}[") and name.endswith("]")
                assert 0 <= int(name[len(field) + 1 : -1]) < len(values)
            continue
        assert len(out) == len(set(out)) <= len(values)
        json.dumps(out)  # storable as is


@FUZZ
@given(
    peer=address_like,
    header=st.lists(st.text(max_size=60) | st.lists(address_like, max_size=4).map(", ".join), max_size=4),
    trusted=st.lists(
        st.ip_addresses().flatmap(lambda a: st.integers(0, a.max_prefixlen).map(lambda p: f"{a}/{p}")),
        max_size=3,
    ),
)
def test_client_address_is_the_peer_or_a_hop_from_the_header(
    peer: str, header: list[str], trusted: list[str]
) -> None:
    networks = [parse_network(t) for t in trusted]
    try:
        got = client_address(peer, header, networks)
    except ValueError:
        # Only a peer that is not an address may be refused.
        try:
            normalise_address(peer)
        except ValueError:
            return
        raise
    direct = normalise_address(peer)
    if not any(direct in n for n in networks):
        assert got == direct  # an untrusted peer's header is ignored entirely
        return
    hops: set[IPAddress] = {direct}
    for value in header:
        for hop in value.split(","):
            text = hop.strip()
            for candidate in (
                text,
                text.strip("[]"),
                text.rpartition(":")[0],
                text.rpartition("]")[0].strip("["),
            ):
                try:
                    hops.add(normalise_address(candidate))
                except ValueError:
                    pass
    assert got in hops
