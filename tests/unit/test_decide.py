"""The one access decision: every deny reason, the window edges, fail-closed behaviour."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domum_gateway.auth.decide import (
    ALLOW,
    Allow,
    Challenge,
    Deny,
    DenyReason,
    SessionFacts,
    decide,
    explain,
)
from domum_gateway.auth.origin import CompiledOrigins, normalise_address
from domum_gateway.model import Grant, OriginRules, RequestStatus

START = datetime(2026, 5, 1, 14, 0, tzinfo=UTC)
END = datetime(2026, 5, 8, 14, 0, tzinfo=UTC)
INSIDE = START + timedelta(hours=1)
PEER = IPv4Address("203.0.113.7")
IDLE = 900
SECOND = timedelta(seconds=1)


def grant(**changes: Any) -> Grant:
    base = Grant(
        request_id="req_1",
        user_id="usr_1",
        group_id="grp_1",
        status=RequestStatus.FORWARDED,
        start=START,
        end=END,
        targets=frozenset({"web01", "db01"}),
        origins=OriginRules(),
        idle_timeout_seconds=IDLE,
        max_sessions=3,
    )
    return dataclasses.replace(base, **changes)


def live(**changes: Any) -> SessionFacts:
    base = SessionFacts(address=str(PEER), last_seen=INSIDE - timedelta(minutes=1), ended=False)
    return dataclasses.replace(base, **changes)


CASES: list[tuple[dict[str, Any], DenyReason | None]] = [
    # Status comes first, whatever the time.
    ({"grant": grant(status=RequestStatus.REVOKED)}, DenyReason.REVOKED),
    ({"grant": grant(status=RequestStatus.EXPIRED)}, DenyReason.EXPIRED),
    ({"grant": grant(status=RequestStatus.SAVED)}, DenyReason.NOT_FORWARDED),
    (
        {"grant": grant(status=RequestStatus.REVOKED), "now": START - SECOND},
        DenyReason.REVOKED,
    ),
    ({"grant": grant(status="revoked")}, DenyReason.REVOKED),
    ({"grant": grant(status="bogus")}, DenyReason.NOT_FORWARDED),
    # The window is [start, end).
    ({"now": START - SECOND}, DenyReason.NOT_YET_OPEN),
    ({"now": START - timedelta(microseconds=1)}, DenyReason.NOT_YET_OPEN),
    ({"now": START}, None),
    ({"now": END - SECOND}, None),
    ({"now": END - timedelta(microseconds=1)}, None),
    ({"now": END}, DenyReason.EXPIRED),
    ({"now": END + timedelta(days=400)}, DenyReason.EXPIRED),
    # The same instant written with another offset.
    ({"now": START.astimezone(timezone(timedelta(hours=-8)))}, None),
    ({"now": END.astimezone(timezone(timedelta(hours=5, minutes=30)))}, DenyReason.EXPIRED),
    # Origins.
    (
        {"grant": grant(origins=OriginRules(deny_cidrs=("203.0.113.0/24",)))},
        DenyReason.ORIGIN_DENIED,
    ),
    (
        {"grant": grant(origins=OriginRules(allow_cidrs=("198.51.100.0/24",)))},
        DenyReason.ORIGIN_DENIED,
    ),
    ({"grant": grant(origins=OriginRules(allow_cidrs=("203.0.113.0/24",)))}, None),
    (
        {"grant": grant(origins=OriginRules(countries=("DE",))), "country": "FR"},
        DenyReason.COUNTRY_DENIED,
    ),
    (
        {"grant": grant(origins=OriginRules(countries=("DE",)))},
        DenyReason.COUNTRY_DENIED,
    ),
    ({"grant": grant(origins=OriginRules(countries=("DE",))), "country": "DE"}, None),
    # Precompiled origins are used instead of the grant's.
    (
        {"origins": CompiledOrigins.from_rules(OriginRules(deny_cidrs=("0.0.0.0/0",)))},
        DenyReason.ORIGIN_DENIED,
    ),
    (
        {
            "grant": grant(origins=OriginRules(deny_cidrs=("0.0.0.0/0",))),
            "origins": CompiledOrigins(),
        },
        None,
    ),
    # Sessions.
    ({"session": live()}, None),
    ({"session": live(ended=True)}, DenyReason.SESSION_ENDED),
    ({"session": live(address="198.51.100.1")}, DenyReason.ADDRESS_CHANGED),
    ({"session": live(address="::ffff:203.0.113.7")}, None),
    ({"session": live(address="garbage")}, DenyReason.ADDRESS_CHANGED),
    ({"session": live(last_seen=INSIDE - timedelta(seconds=IDLE))}, DenyReason.SESSION_IDLE),
    ({"session": live(last_seen=INSIDE - timedelta(seconds=IDLE - 1))}, None),
    ({"session": live(last_seen=INSIDE - timedelta(days=1))}, DenyReason.SESSION_IDLE),
    ({"session": live(last_seen=INSIDE + SECOND)}, None),
    (
        {"grant": grant(idle_timeout_seconds=0), "session": live(last_seen=INSIDE)},
        DenyReason.SESSION_IDLE,
    ),
    # An ended session is reported before a changed address or idleness.
    (
        {"session": live(ended=True, address="198.51.100.1", last_seen=START)},
        DenyReason.SESSION_ENDED,
    ),
    # Session limit at login.
    ({"open_sessions": 2}, None),
    ({"open_sessions": 3}, DenyReason.TOO_MANY_SESSIONS),
    ({"open_sessions": 3, "session": live()}, None),
    # Targets.
    ({"target": "web01"}, None),
    ({"target": "db02"}, DenyReason.TARGET_NOT_GRANTED),
    ({"target": ""}, DenyReason.TARGET_NOT_GRANTED),
    ({"target": "db02", "grant": grant(targets=frozenset())}, DenyReason.TARGET_NOT_GRANTED),
    # Order: window before origin before session before target.
    (
        {
            "now": END,
            "grant": grant(origins=OriginRules(deny_cidrs=("0.0.0.0/0",))),
            "target": "nope",
        },
        DenyReason.EXPIRED,
    ),
    (
        {
            "grant": grant(origins=OriginRules(deny_cidrs=("0.0.0.0/0",))),
            "session": live(ended=True),
            "target": "nope",
        },
        DenyReason.ORIGIN_DENIED,
    ),
    ({"session": live(ended=True), "target": "nope"}, DenyReason.SESSION_ENDED),
    # Fail closed.
    ({"now": datetime(2026, 5, 1, 15)}, DenyReason.UNKNOWN),
    ({"grant": grant(origins=OriginRules(deny_cidrs=("bad",)))}, DenyReason.UNKNOWN),
    ({"session": live(last_seen=datetime(2026, 5, 1, 15))}, DenyReason.UNKNOWN),
]


@pytest.mark.parametrize(("kwargs", "expected"), CASES)
def test_decide_table(kwargs: dict[str, Any], expected: DenyReason | None) -> None:
    args: dict[str, Any] = {"grant": grant(), "now": INSIDE, "peer": PEER, **kwargs}
    decision = decide(**args)
    if expected is None:
        assert decision is ALLOW
        assert decision.allowed
    else:
        assert decision == Deny(expected)
        assert not decision.allowed


def test_every_reason_has_a_table_row() -> None:
    # Keeps the closed set and the table in step: a new reason needs a test row.
    assert {expected for _, expected in CASES} == {*DenyReason, None}


def test_ipv6_peer() -> None:
    peer = IPv6Address("2001:db8::5")
    session = live(address="2001:DB8:0::5")
    assert decide(grant(), INSIDE, peer, session=session) is ALLOW
    denied = grant(origins=OriginRules(allow_cidrs=("203.0.113.0/24",)))
    assert decide(denied, INSIDE, peer) == Deny(DenyReason.ORIGIN_DENIED)


def test_positional_call_as_in_the_design() -> None:
    assert decide(grant(), INSIDE, PEER, "web01") is ALLOW
    assert decide(grant(), INSIDE, PEER, "other") == Deny(DenyReason.TARGET_NOT_GRANTED)


def test_decision_values() -> None:
    assert Allow() == ALLOW
    assert Challenge("otp").kind == "otp"
    assert not Challenge("otp").allowed
    assert Deny(DenyReason.EXPIRED).reason == "expired"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Deny(DenyReason.EXPIRED).reason = DenyReason.REVOKED


def test_reasons_are_stable_metric_labels() -> None:
    assert [r.value for r in DenyReason] == [
        "not_yet_open",
        "expired",
        "revoked",
        "not_forwarded",
        "origin_denied",
        "country_denied",
        "target_not_granted",
        "session_idle",
        "session_ended",
        "address_changed",
        "too_many_sessions",
        "unknown",
    ]


aware_times = st.datetimes(timezones=st.just(UTC)) | st.datetimes(
    min_value=datetime(2, 1, 1),
    max_value=datetime(9998, 12, 31),
    timezones=st.integers(min_value=-1439, max_value=1439).map(lambda m: timezone(timedelta(minutes=m))),
)
any_times = aware_times | st.datetimes()


@given(
    now=any_times,
    start=any_times,
    end=any_times,
    last_seen=any_times,
    status=st.sampled_from(list(RequestStatus)),
    idle=st.integers(min_value=-(10**9), max_value=10**9),
    peer=st.ip_addresses(),
    target=st.none() | st.text(max_size=8),
    address=st.text(max_size=40) | st.ip_addresses().map(str),
    ended=st.booleans(),
    with_session=st.booleans(),
    country=st.none() | st.text(max_size=3),
    open_sessions=st.none() | st.integers(),
)
def test_decide_never_raises(
    now: datetime,
    start: datetime,
    end: datetime,
    last_seen: datetime,
    status: RequestStatus,
    idle: int,
    peer: IPv4Address | IPv6Address,
    target: str | None,
    address: str,
    ended: bool,
    with_session: bool,
    country: str | None,
    open_sessions: int | None,
) -> None:
    g = grant(
        status=status,
        start=start,
        end=end,
        idle_timeout_seconds=idle,
        origins=OriginRules(allow_cidrs=("0.0.0.0/0", "::/0"), countries=("DE",)),
    )
    session = SessionFacts(address, last_seen, ended) if with_session else None
    decision = decide(g, now, peer, target, session, country, open_sessions=open_sessions)
    assert isinstance(decision, Allow | Deny)
    if isinstance(decision, Allow):
        assert status is RequestStatus.FORWARDED
        assert start <= now < end
        assert country is not None and country.upper() == "DE"
        assert target is None or target in g.targets


@given(now=st.datetimes(timezones=st.just(UTC)), peer=st.ip_addresses())
def test_allowed_only_inside_the_window(now: datetime, peer: IPv4Address | IPv6Address) -> None:
    decision = decide(grant(), now, normalise_address(str(peer)))
    assert decision.allowed == (START <= now < END)


# explain


def test_explain_window_times_in_utc() -> None:
    assert explain(DenyReason.NOT_YET_OPEN, grant()) == (
        "This access opens at 2026-05-01 14:00 UTC. Try again then."
    )
    assert explain(DenyReason.EXPIRED, grant()) == (
        "This access ended at 2026-05-08 14:00 UTC. Ask your administrator for a new one."
    )


def test_explain_in_another_timezone() -> None:
    tz = timezone(timedelta(hours=2))
    assert "2026-05-01 16:00 UTC+02:00" in explain(DenyReason.NOT_YET_OPEN, grant(), tz)


def test_explain_idle_and_session_limit_use_grant_values() -> None:
    assert "15 minutes" in explain(DenyReason.SESSION_IDLE, grant())
    assert "1 hour" in explain(DenyReason.SESSION_IDLE, grant(idle_timeout_seconds=3600))
    assert "90 seconds" in explain(DenyReason.SESSION_IDLE, grant(idle_timeout_seconds=90))
    assert "(3)" in explain(DenyReason.TOO_MANY_SESSIONS, grant())


@pytest.mark.parametrize("reason", list(DenyReason))
@pytest.mark.parametrize("with_grant", [True, False])
def test_explain_every_reason(reason: DenyReason, with_grant: bool) -> None:
    text = explain(reason, grant() if with_grant else None)
    assert text.endswith(".")
    assert text[0].isupper()
    assert reason.value not in text  # words for people, not labels
    assert "req_1" not in text and "203.0.113" not in text


def test_explain_edge_of_calendar_does_not_raise() -> None:
    far = grant(end=datetime.max.replace(tzinfo=UTC))
    assert "9999-12-31 23:59" in explain(DenyReason.EXPIRED, far, timezone(timedelta(hours=5)))
