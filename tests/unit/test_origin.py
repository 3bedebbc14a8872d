"""Origin rules: address normalisation, CIDR validation, deny-wins, X-Forwarded-For."""

from __future__ import annotations

import ipaddress
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domum_gateway.auth.decide import DenyReason
from domum_gateway.auth.origin import (
    CompiledOrigins,
    IPNetwork,
    client_address,
    compile_origins,
    normalise_address,
    parse_cidrs,
    parse_countries,
    parse_network,
)
from domum_gateway.errors import ValidationError
from domum_gateway.model import OriginRules

PROXIES: list[IPNetwork] = [IPv4Network("10.0.0.0/8"), IPv6Network("fd00::/8")]


# normalise_address


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("203.0.113.7", IPv4Address("203.0.113.7")),
        (" 203.0.113.7\t", IPv4Address("203.0.113.7")),
        ("0.0.0.0", IPv4Address("0.0.0.0")),
        ("::ffff:203.0.113.7", IPv4Address("203.0.113.7")),
        ("::FFFF:cb00:7107", IPv4Address("203.0.113.7")),
        ("2001:db8::1", IPv6Address("2001:db8::1")),
        ("2001:DB8:0:0::1", IPv6Address("2001:db8::1")),
        ("[2001:db8::1]", IPv6Address("2001:db8::1")),
        ("fe80::1%eth0", IPv6Address("fe80::1")),
        ("::1", IPv6Address("::1")),
    ],
)
def test_normalise_address(raw: str, expected: IPv4Address | IPv6Address) -> None:
    got = normalise_address(raw)
    assert got == expected
    assert type(got) is type(expected)
    assert "%" not in str(got)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        "010.0.0.1",
        "10.0.0.01",
        "::ffff:010.0.0.1",
        "1.2.3",
        "1.2.3.4.5",
        "256.0.0.1",
        "1.2.3.4/32",
        "1.2.3.4:80",
        "example.com",
        "unknown",
        "0x7f.0.0.1",
        "2130706433",
        "1.2.3.4%eth0",
        "fe80::1%",
        "\u0661.\u0662.\u0663.\u0664",
        "\uff11.2.3.4",
        "[1.2.3.4",
        "2001:db8::1::1",
        "a" * 200,
    ],
)
def test_normalise_address_rejects(raw: str) -> None:
    with pytest.raises(ValueError):
        normalise_address(raw)


@given(st.ip_addresses())
def test_normalise_address_round_trips(address: IPv4Address | IPv6Address) -> None:
    got = normalise_address(str(address))
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        assert got == address.ipv4_mapped
    else:
        assert got == address
    assert normalise_address(str(got)) == got


# parse_network / parse_cidrs


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("203.0.113.7", "203.0.113.7/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("::/0", "::/0"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:203.0.113.7", "203.0.113.7/32"),
    ],
)
def test_parse_network(raw: str, expected: str) -> None:
    assert str(parse_network(raw)) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "010.0.0.0/8",
        "10.0.0.0/08",
        "10.0.0.0/",
        "10.0.0.0/33",
        "10.0.0.0/255.0.0.0",
        "10.0.0.0/+8",
        "10.0.0.0/ 8",
        "2001:db8::/129",
        "fe80::%eth0/64",
        "10.0.0.0/٨",
        "garbage",
        "",
    ],
)
def test_parse_network_rejects(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_network(raw)


def test_parse_cidrs_normalises_and_dedupes() -> None:
    got = parse_cidrs(["10.1.0.0/16", " 10.1.2.3/16 ", "2001:db8::/32", "::ffff:1.2.3.4"], "x")
    assert got == ("10.1.0.0/16", "2001:db8::/32", "1.2.3.4/32")


def test_parse_cidrs_names_each_bad_item() -> None:
    with pytest.raises(ValidationError) as exc:
        parse_cidrs(["10.0.0.0/8", "010.0.0.0/8", 7, None, "nope"], "policy.origins.allow_cidrs")
    assert [e.field for e in exc.value.errors] == [
        "policy.origins.allow_cidrs[1]",
        "policy.origins.allow_cidrs[2]",
        "policy.origins.allow_cidrs[3]",
        "policy.origins.allow_cidrs[4]",
    ]


def test_parse_cidrs_refuses_a_bare_string() -> None:
    with pytest.raises(ValidationError) as exc:
        parse_cidrs("10.0.0.0/8", "trusted_proxies")
    assert exc.value.errors[0].field == "trusted_proxies"


def test_parse_countries() -> None:
    assert parse_countries(["de", "FR", " ch ", "DE"], "c") == ("DE", "FR", "CH")
    with pytest.raises(ValidationError) as exc:
        parse_countries(["DEU", "D", "", 49, "Ä1", "ÄB"], "c")
    assert [e.field for e in exc.value.errors] == [f"c[{i}]" for i in range(6)]
    with pytest.raises(ValidationError):
        parse_countries("DE", "c")


# CompiledOrigins


def rules(
    allow: tuple[str, ...] = (), deny: tuple[str, ...] = (), countries: tuple[str, ...] = ()
) -> CompiledOrigins:
    return CompiledOrigins.from_rules(OriginRules(allow, deny, countries))


@pytest.mark.parametrize(
    ("compiled", "address", "country", "expected"),
    [
        (rules(), "203.0.113.7", None, None),
        (rules(), "2001:db8::1", None, None),
        (rules(allow=("203.0.113.0/24",)), "203.0.113.7", None, None),
        (rules(allow=("203.0.113.0/24",)), "198.51.100.1", None, DenyReason.ORIGIN_DENIED),
        # Deny wins over a broader or an equal allow.
        (
            rules(allow=("203.0.113.0/24",), deny=("203.0.113.7/32",)),
            "203.0.113.7",
            None,
            DenyReason.ORIGIN_DENIED,
        ),
        (
            rules(allow=("203.0.113.7/32",), deny=("203.0.113.7/32",)),
            "203.0.113.7",
            None,
            DenyReason.ORIGIN_DENIED,
        ),
        (rules(deny=("203.0.113.0/24",)), "203.0.113.8", None, DenyReason.ORIGIN_DENIED),
        (rules(deny=("203.0.113.0/24",)), "198.51.100.1", None, None),
        # A mapped address is caught by an IPv4 deny rule, and a mapped rule by IPv4.
        (rules(deny=("203.0.113.0/24",)), "::ffff:203.0.113.8", None, DenyReason.ORIGIN_DENIED),
        (rules(deny=("::ffff:203.0.113.0/120",)), "203.0.113.8", None, DenyReason.ORIGIN_DENIED),
        # IPv6 rules.
        (rules(allow=("2001:db8::/32",)), "2001:db8:1::5", None, None),
        (rules(allow=("2001:db8::/32",)), "2001:db9::5", None, DenyReason.ORIGIN_DENIED),
        (rules(allow=("2001:db8::/32",)), "203.0.113.7", None, DenyReason.ORIGIN_DENIED),
        (
            rules(allow=("2001:db8::/32",), deny=("2001:db8:bad::/48",)),
            "2001:db8:bad::1",
            None,
            DenyReason.ORIGIN_DENIED,
        ),
        # Countries: unknown country is denied when a list exists.
        (rules(countries=("DE", "CH")), "203.0.113.7", "DE", None),
        (rules(countries=("DE", "CH")), "203.0.113.7", "ch", None),
        (rules(countries=("DE", "CH")), "203.0.113.7", "FR", DenyReason.COUNTRY_DENIED),
        (rules(countries=("DE",)), "203.0.113.7", None, DenyReason.COUNTRY_DENIED),
        (rules(), "203.0.113.7", "FR", None),
        # Address rules come before country rules.
        (
            rules(deny=("203.0.113.0/24",), countries=("DE",)),
            "203.0.113.7",
            "FR",
            DenyReason.ORIGIN_DENIED,
        ),
    ],
)
def test_check(
    compiled: CompiledOrigins, address: str, country: str | None, expected: DenyReason | None
) -> None:
    assert compiled.check(normalise_address(address), country) == expected


def test_compiled_rules_are_frozen_and_memoised() -> None:
    stored = OriginRules(allow_cidrs=("10.0.0.0/8",))
    compiled = compile_origins(stored)
    assert compile_origins(OriginRules(allow_cidrs=("10.0.0.0/8",))) is compiled
    with pytest.raises(AttributeError):
        compiled.allow = ()


def test_unparsable_stored_rule_raises() -> None:
    with pytest.raises(ValueError):
        CompiledOrigins.from_rules(OriginRules(deny_cidrs=("not a network",)))


@given(st.ip_addresses(), st.ip_addresses())
def test_deny_always_wins(address: IPv4Address | IPv6Address, other: IPv4Address | IPv6Address) -> None:
    address = normalise_address(str(address))
    host = f"{address}/{address.max_prefixlen}"
    compiled = rules(allow=(host, "0.0.0.0/0", "::/0"), deny=(host,))
    assert compiled.check(address, None) == DenyReason.ORIGIN_DENIED
    other = normalise_address(str(other))
    if other != address:
        assert compiled.check(other, None) is None


# client_address


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        # Untrusted peer: the header is the client's own writing and is ignored.
        ("203.0.113.7", ["1.1.1.1"], "203.0.113.7"),
        ("203.0.113.7", ["10.0.0.5, 1.1.1.1"], "203.0.113.7"),
        ("203.0.113.7", [], "203.0.113.7"),
        # Trusted peer without header: the proxy itself.
        ("10.0.0.2", [], "10.0.0.2"),
        # One proxy.
        ("10.0.0.2", ["198.51.100.9"], "198.51.100.9"),
        # Spoofed left-most value: the right-most untrusted hop wins.
        ("10.0.0.2", ["6.6.6.6, 198.51.100.9"], "198.51.100.9"),
        # Multi-hop chain through several trusted proxies, across header lines.
        ("10.0.0.2", ["6.6.6.6, 198.51.100.9", "10.1.1.1", "fd00::7"], "198.51.100.9"),
        ("10.0.0.2", ["6.6.6.6,198.51.100.9,10.1.1.1"], "198.51.100.9"),
        # All hops trusted: the left-most trusted one (a client inside the proxy range).
        ("10.0.0.2", ["10.9.9.9, 10.1.1.1"], "10.9.9.9"),
        # IPv6 and mapped forms.
        ("fd00::1", ["2001:db8::42"], "2001:db8::42"),
        ("::ffff:10.0.0.2", ["::ffff:198.51.100.9"], "198.51.100.9"),
        # Ports some proxies append.
        ("10.0.0.2", ["198.51.100.9:51234"], "198.51.100.9"),
        ("10.0.0.2", ["[2001:db8::42]:443"], "2001:db8::42"),
        ("10.0.0.2", ["[2001:db8::42]"], "2001:db8::42"),
        # Garbage stops at the last trusted address seen, never beyond it.
        ("10.0.0.2", ["garbage"], "10.0.0.2"),
        ("10.0.0.2", ["unknown"], "10.0.0.2"),
        ("10.0.0.2", [""], "10.0.0.2"),
        ("10.0.0.2", ["6.6.6.6, garbage"], "10.0.0.2"),
        ("10.0.0.2", ["6.6.6.6, garbage, 10.1.1.1"], "10.1.1.1"),
        ("10.0.0.2", ["6.6.6.6,,10.1.1.1"], "10.1.1.1"),
        ("10.0.0.2", ["010.0.0.1"], "10.0.0.2"),
        ("10.0.0.2", ["198.51.100.9:99999"], "10.0.0.2"),
        ("10.0.0.2", ["2001:db8::42:443"], "2001:db8::42:443"),
        ("10.0.0.2", ["[2001:db8::42]:x"], "10.0.0.2"),
        ("10.0.0.2", ["::ffff:1.2.3.4:80"], "10.0.0.2"),
    ],
)
def test_client_address(peer: str, xff: list[str], expected: str) -> None:
    assert client_address(peer, xff, PROXIES) == ipaddress.ip_address(expected)


def test_client_address_without_trusted_proxies_ignores_header() -> None:
    assert client_address("10.0.0.2", ["198.51.100.9"], []) == IPv4Address("10.0.0.2")


def test_client_address_rejects_bad_peer() -> None:
    with pytest.raises(ValueError):
        client_address("", [], PROXIES)


@given(
    st.lists(st.ip_addresses(v=4).map(str), max_size=5),
    st.lists(st.text(max_size=20), max_size=5),
)
def test_untrusted_peer_is_never_overridden(spoofed: list[str], junk: list[str]) -> None:
    header = [", ".join(spoofed), *junk]
    assert client_address("203.0.113.7", header, PROXIES) == IPv4Address("203.0.113.7")


@given(st.lists(st.text(max_size=40), max_size=6))
def test_trusted_peer_answer_comes_from_the_chain_or_the_peer(header: list[str]) -> None:
    got = client_address("10.0.0.2", header, PROXIES)
    hops = [h.strip() for value in header for h in value.split(",")]
    candidates = {IPv4Address("10.0.0.2")}
    for hop in hops:
        try:
            candidates.add(normalise_address(hop.strip("[]").rsplit("]:", 1)[0]))
        except ValueError:
            continue
    assert got in candidates or any(str(got) in hop for hop in hops)
