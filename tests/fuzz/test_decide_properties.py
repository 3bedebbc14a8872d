"""Invariants of ``decide()`` over random grants, rules, times, peers, sessions and targets.

The unit tests pin each reason with a table; these check the promises that must hold for
every input: deny wins, nothing is allowed outside the window, for a target the grant
does not name, from a denied address or country, or on an ended/idle/moved session; and
tightening any rule never turns a refusal into an access.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from domum_gateway.auth.decide import Allow, Deny, DenyReason, SessionFacts, decide
from domum_gateway.auth.origin import IPAddress, compile_origins, normalise_address, parse_network
from domum_gateway.model import Grant, OriginRules, RequestStatus

from .profiles import FUZZ

BASE = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
TARGETS = ("web01", "db01", "rdp01", "ssh01", "tcp01")
COUNTRIES = ("DE", "CH", "FR", "US")

offsets = st.integers(min_value=-10 * 86_400, max_value=10 * 86_400).map(lambda s: timedelta(seconds=s))
instants = offsets.map(lambda d: BASE + d)
peers = st.ip_addresses().map(lambda a: normalise_address(str(a)))


@st.composite
def networks_near(draw: st.DrawFn, peer: IPAddress) -> str:
    """A network that often contains ``peer`` (built from it), sometimes an unrelated one."""
    base: IPAddress = draw(st.one_of(st.just(peer), peers))
    prefix = draw(st.integers(min_value=0, max_value=base.max_prefixlen))
    return str(parse_network(f"{base}/{prefix}"))


@st.composite
def situations(draw: st.DrawFn) -> dict[str, Any]:
    """Random facts, biased so that a good share of them is allowed (see the ``find`` test)."""
    peer = draw(peers)
    start = draw(instants)
    end = start + draw(st.one_of(offsets.map(abs), offsets))
    now = draw(st.one_of(st.builds(lambda f: start + (end - start) * f, st.floats(0, 1)), instants))
    targets = frozenset(draw(st.lists(st.sampled_from(TARGETS), max_size=3)))
    countries = tuple(draw(st.lists(st.sampled_from(COUNTRIES), max_size=2, unique=True)))
    grant = Grant(
        request_id="req_1",
        user_id="usr_1",
        group_id="grp_1",
        status=draw(st.one_of(st.just(RequestStatus.FORWARDED), st.sampled_from(list(RequestStatus)))),
        start=start,
        end=end,
        targets=targets,
        origins=OriginRules(
            allow_cidrs=tuple(draw(st.lists(networks_near(peer), max_size=3))),
            deny_cidrs=tuple(draw(st.just([]) | st.lists(networks_near(peer), max_size=3))),
            countries=countries,
        ),
        idle_timeout_seconds=draw(st.integers(min_value=1, max_value=86_400)),
        max_sessions=draw(st.integers(min_value=1, max_value=5)),
    )
    session = None
    if draw(st.booleans()):
        address = str(peer) if draw(st.booleans()) else str(draw(peers))
        seen = draw(st.one_of(st.integers(0, 86_400).map(lambda s: now - timedelta(seconds=s)), instants))
        session = SessionFacts(address=address, last_seen=seen, ended=draw(st.booleans()))
    return {
        "grant": grant,
        "now": now,
        "peer": peer,
        "target": draw(st.none() | st.sampled_from(sorted(targets) or TARGETS) | st.sampled_from(TARGETS)),
        "session": session,
        "country": draw(st.none() | st.sampled_from(countries or COUNTRIES) | st.sampled_from(COUNTRIES)),
        "open_sessions": draw(st.none() | st.integers(min_value=0, max_value=6)),
    }


def _denied_for(reason: DenyReason) -> Callable[[dict[str, Any]], bool]:
    return lambda s: _decide(s) == Deny(reason)


def test_the_situations_reach_both_answers() -> None:
    """Guard against vacuous properties: the generator produces allows and every deny reason
    the properties speak about."""
    # Deterministic (the same examples every run) and free of health checks: whether a rare
    # reason is reached must not depend on a random seed or on how busy the machine is.
    settings_ = settings(
        database=None,
        max_examples=5_000,
        phases=[Phase.generate],
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    find(situations(), lambda s: _decide(s).allowed, settings=settings_)
    for reason in (
        DenyReason.ORIGIN_DENIED,
        DenyReason.COUNTRY_DENIED,
        DenyReason.TARGET_NOT_GRANTED,
        DenyReason.SESSION_IDLE,
        DenyReason.ADDRESS_CHANGED,
        DenyReason.TOO_MANY_SESSIONS,
    ):
        find(situations(), _denied_for(reason), settings=settings_)


def _decide(s: dict[str, Any], **changes: Any) -> Allow | Deny:
    args = {**s, **changes}
    decision = decide(
        args["grant"],
        args["now"],
        args["peer"],
        args["target"],
        args["session"],
        args["country"],
        open_sessions=args["open_sessions"],
    )
    assert isinstance(decision, Allow | Deny)
    return decision


def _in(peer: IPAddress, cidrs: tuple[str, ...]) -> bool:
    return any(peer in parse_network(c) for c in cidrs)


@FUZZ
@given(situations())
def test_every_allow_satisfies_every_rule(s: dict[str, Any]) -> None:
    decision = _decide(s)
    if not decision.allowed:
        return
    g: Grant = s["grant"]
    peer: IPAddress = s["peer"]
    assert g.status is RequestStatus.FORWARDED
    assert g.start <= s["now"] < g.end  # no allow outside the window
    assert not _in(peer, g.origins.deny_cidrs)  # deny wins
    assert not g.origins.allow_cidrs or _in(peer, g.origins.allow_cidrs)
    assert not g.origins.countries or s["country"] in g.origins.countries
    assert s["target"] is None or s["target"] in g.targets  # no allow for an ungranted target
    session: SessionFacts | None = s["session"]
    if session is not None:
        assert not session.ended
        assert normalise_address(session.address) == peer
        assert s["now"] - session.last_seen < timedelta(seconds=g.idle_timeout_seconds)
    elif s["open_sessions"] is not None:
        assert s["open_sessions"] < g.max_sessions


@FUZZ
@given(situations())
def test_deny_wins_over_any_allow_rule(s: dict[str, Any]) -> None:
    g: Grant = s["grant"]
    peer: IPAddress = s["peer"]
    # However broad the allow list, a deny entry covering the peer refuses it.
    host = f"{peer}/{peer.max_prefixlen}"
    origins = OriginRules(
        allow_cidrs=(*g.origins.allow_cidrs, host, "0.0.0.0/0", "::/0"),
        deny_cidrs=(*g.origins.deny_cidrs, host),
        countries=g.origins.countries,
    )
    decision = _decide(s, grant=dataclasses.replace(g, origins=origins))
    assert not decision.allowed
    if g.status is RequestStatus.FORWARDED and g.start <= s["now"] < g.end:
        assert decision == Deny(DenyReason.ORIGIN_DENIED)


@FUZZ
@given(situations(), st.ip_addresses(v=4))
def test_mapped_ipv6_spelling_gets_the_same_decision(s: dict[str, Any], v4: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{v4}")
    assert normalise_address(str(mapped)) == v4
    assert _decide(s, peer=v4) == _decide(s, peer=normalise_address(str(mapped)))


@FUZZ
@given(situations(), st.data())
def test_tightening_never_turns_a_refusal_into_access(s: dict[str, Any], data: st.DataObject) -> None:
    if _decide(s).allowed:
        return
    g: Grant = s["grant"]
    tighter = [
        dataclasses.replace(
            g,
            origins=dataclasses.replace(
                g.origins, deny_cidrs=(*g.origins.deny_cidrs, data.draw(networks_near(s["peer"])))
            ),
        ),
        dataclasses.replace(g, targets=g.targets - {data.draw(st.sampled_from(TARGETS))}),
        dataclasses.replace(g, end=g.end - data.draw(offsets.filter(lambda d: d >= timedelta(0)))),
        dataclasses.replace(g, start=g.start + data.draw(offsets.filter(lambda d: d >= timedelta(0)))),
        dataclasses.replace(g, idle_timeout_seconds=max(1, g.idle_timeout_seconds // 2)),
        dataclasses.replace(g, max_sessions=max(1, g.max_sessions - 1)),
    ]
    for grant in tighter:
        assert not _decide(s, grant=grant).allowed, grant
    if s["session"] is not None:
        assert not _decide(s, session=dataclasses.replace(s["session"], ended=True)).allowed


@FUZZ
@given(situations())
def test_precompiled_rules_decide_like_stored_rules(s: dict[str, Any]) -> None:
    g: Grant = s["grant"]
    compiled = compile_origins(g.origins)
    again = decide(
        g,
        s["now"],
        s["peer"],
        s["target"],
        s["session"],
        s["country"],
        compiled,
        open_sessions=s["open_sessions"],
    )
    assert again == _decide(s)


@FUZZ
@given(situations(), st.text(max_size=40))
def test_a_stored_rule_that_does_not_parse_refuses(s: dict[str, Any], junk: str) -> None:
    try:
        parse_network(junk)
    except ValueError:
        pass
    else:
        return  # it is a network after all
    g: Grant = s["grant"]
    broken = dataclasses.replace(g, origins=dataclasses.replace(g.origins, deny_cidrs=(junk,)))
    assert not _decide(s, grant=broken).allowed
