"""Origin rules: which network addresses and countries may use a grant.

Why a module of its own: address parsing is where spoofing and bypasses hide (an IPv4
address written as ``::ffff:10.0.0.1`` to dodge a deny list, ``010.0.0.1`` read as octal
by one parser and decimal by another, a client-written ``X-Forwarded-For`` trusted as if
a proxy wrote it). Every address that reaches a decision goes through
``normalise_address`` first, and the client's address behind proxies is derived only by
``client_address``, right to left, trusting nothing a client could have written.

Rules are compiled once (``CompiledOrigins``) so the hot path does no parsing.
Pure: no I/O, no clock, no logging.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from domum_gateway.auth.decide import DenyReason
from domum_gateway.errors import FieldError, ValidationError
from domum_gateway.model import OriginRules

__all__ = [
    "CompiledOrigins",
    "IPAddress",
    "IPNetwork",
    "client_address",
    "compile_origins",
    "normalise_address",
    "parse_cidrs",
    "parse_countries",
    "parse_network",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAX_ADDRESS_CHARS = 64
_MAX_NETWORK_CHARS = 96
_DIGITS = frozenset("0123456789")
_UPPER = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")
_CIDR_HINT = "must be an IP address or network, e.g. 203.0.113.0/24 or 2001:db8::/32"


def normalise_address(raw: str) -> IPAddress:
    """Parse one IP address into the form every rule compares against.

    An IPv4-mapped IPv6 address (``::ffff:1.2.3.4``) becomes the IPv4 address, so a rule
    written for IPv4 also catches it; an IPv6 zone (``%eth0``) is dropped; surrounding
    brackets (``[2001:db8::1]``) are accepted.

    Raises:
        ValueError: anything else that is not exactly an address, including IPv4 octets
            with leading zeros (``010.0.0.1``), which other software reads as octal.
    """
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if "%" in text:
        text, _, zone = text.partition("%")
        if not zone or ":" not in text:
            raise ValueError(f"not an IP address: {raw!r}")
    if not text or len(text) > _MAX_ADDRESS_CHARS or not text.isascii():
        raise ValueError(f"not an IP address: {raw!r}")
    _reject_leading_zero_octets(text, raw)
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _reject_leading_zero_octets(text: str, raw: str) -> None:
    # The stdlib already refuses these (3.9.5+); checking here keeps that guarantee
    # independent of the interpreter version, including in the dotted tail of IPv6.
    tail = text.rsplit(":", 1)[-1]
    if "." not in tail:
        return
    for octet in tail.split("."):
        if len(octet) > 1 and octet[0] == "0":
            raise ValueError(f"leading zeros are ambiguous in {raw!r}")


def parse_network(raw: str) -> IPNetwork:
    """Parse ``address[/prefix]`` into a network (host bits are cleared).

    An IPv4-mapped IPv6 network (``::ffff:10.0.0.0/104``) becomes the IPv4 network,
    matching how ``normalise_address`` treats addresses. Netmask notation and prefixes
    with leading zeros are refused: one spelling per network.

    Raises:
        ValueError: not a network.
    """
    text = raw.strip()
    if not text or len(text) > _MAX_NETWORK_CHARS or not text.isascii() or "%" in text:
        raise ValueError(f"not an IP network: {raw!r}")
    address_part, slash, prefix = text.partition("/")
    if slash and (not prefix or not set(prefix) <= _DIGITS or (len(prefix) > 1 and prefix[0] == "0")):
        raise ValueError(f"bad prefix length in {raw!r}")
    _reject_leading_zero_octets(address_part, raw)
    network = ipaddress.ip_network(text, strict=False)
    if (
        isinstance(network, ipaddress.IPv6Network)
        and network.prefixlen >= _MAPPED_V4.prefixlen
        and network.subnet_of(_MAPPED_V4)
    ):
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - _MAPPED_V4.prefixlen))
    return network


def parse_cidrs(values: Iterable[object], field: str) -> tuple[str, ...]:
    """Validate a list of networks from configuration or a group policy.

    Returns:
        The canonical string forms (``10.0.0.0/8``, ``2001:db8::/32``), duplicates
        dropped, order kept.

    Raises:
        ValidationError: one entry per bad item, named ``field[i]``.
    """
    if isinstance(values, str | bytes):
        raise ValidationError.one(field, "must be a list of networks")
    errors: list[FieldError] = []
    seen: dict[str, None] = {}
    for index, value in enumerate(values):
        if not isinstance(value, str):
            errors.append(FieldError(f"{field}[{index}]", _CIDR_HINT))
            continue
        try:
            seen.setdefault(str(parse_network(value)), None)
        except ValueError:
            errors.append(FieldError(f"{field}[{index}]", _CIDR_HINT))
    if errors:
        raise ValidationError(errors)
    return tuple(seen)


def parse_countries(values: Iterable[object], field: str) -> tuple[str, ...]:
    """Validate ISO 3166-1 alpha-2 country codes; returns them upper-case, deduplicated.

    Raises:
        ValidationError: one entry per bad item, named ``field[i]``.
    """
    if isinstance(values, str | bytes):
        raise ValidationError.one(field, "must be a list of country codes")
    errors: list[FieldError] = []
    seen: dict[str, None] = {}
    for index, value in enumerate(values):
        code = value.strip().upper() if isinstance(value, str) else ""
        if len(code) != 2 or not set(code) <= _UPPER:
            errors.append(FieldError(f"{field}[{index}]", "must be a two-letter country code, e.g. DE"))
            continue
        seen.setdefault(code, None)
    if errors:
        raise ValidationError(errors)
    return tuple(seen)


@dataclass(frozen=True, slots=True)
class CompiledOrigins:
    """Origin rules parsed once, ready for the hot path.

    Deny wins over allow; an empty allow list means any address; a non-empty country
    list admits only those countries, and an unknown country is denied (fail closed).
    """

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    countries: frozenset[str] = frozenset()

    @classmethod
    def from_rules(cls, rules: OriginRules) -> CompiledOrigins:
        """Compile stored rules.

        Raises:
            ValueError: a stored rule does not parse. Callers must treat this as deny;
                skipping the rule could silently drop a deny entry.
        """
        return cls(
            allow=tuple(parse_network(c) for c in rules.allow_cidrs),
            deny=tuple(parse_network(c) for c in rules.deny_cidrs),
            countries=frozenset(c.strip().upper() for c in rules.countries),
        )

    def check(self, address: IPAddress, country: str | None = None) -> DenyReason | None:
        """Return why ``address`` (already normalised) may not use the grant, or None."""
        for network in self.deny:
            if address in network:
                return DenyReason.ORIGIN_DENIED
        if self.allow and not any(address in network for network in self.allow):
            return DenyReason.ORIGIN_DENIED
        if self.countries and (country is None or country.upper() not in self.countries):
            return DenyReason.COUNTRY_DENIED
        return None


@functools.lru_cache(maxsize=4096)
def compile_origins(rules: OriginRules) -> CompiledOrigins:
    """``CompiledOrigins.from_rules`` memoised: rules are frozen, so reuse is safe."""
    return CompiledOrigins.from_rules(rules)


def client_address(
    peer: str,
    forwarded_for: Sequence[str],
    trusted: Sequence[IPNetwork],
) -> IPAddress:
    """The client's address, honouring ``X-Forwarded-For`` only as far as it is trusted.

    If the direct peer is not a trusted proxy, its address is the answer and the header
    is ignored (a client can write anything there). Otherwise the hops are read right to
    left, skipping trusted proxies; the first untrusted hop is the client. A malformed
    hop stops the walk at the last trusted address seen, so a garbled header can only
    ever yield one of our own proxies, never a value the client chose.

    Args:
        peer: the socket peer's address.
        forwarded_for: every ``X-Forwarded-For`` header value, in the order received.
        trusted: the networks of the proxies in front of the gateway.

    Raises:
        ValueError: ``peer`` is not an IP address.
    """
    last_trusted = normalise_address(peer)
    if not trusted or not _is_trusted(last_trusted, trusted):
        return last_trusted
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for raw_hop in reversed(hops):
        try:
            hop = _parse_hop(raw_hop)
        except ValueError:
            return last_trusted
        if not _is_trusted(hop, trusted):
            return hop
        last_trusted = hop
    return last_trusted


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def _parse_hop(raw: str) -> IPAddress:
    # Some proxies append the client's port: "203.0.113.7:51234" or "[2001:db8::1]:443".
    text = raw.strip()
    if text.startswith("["):
        host, bracket, port = text[1:].partition("]")
        if bracket and (not port or (port[0] == ":" and _is_port(port[1:]))):
            return normalise_address(host)
        raise ValueError(f"not an address: {raw!r}")
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _is_port(port):
            raise ValueError(f"not an address: {raw!r}")
        address = normalise_address(host)
        if isinstance(address, ipaddress.IPv6Address):
            raise ValueError(f"not an address: {raw!r}")
        return address
    return normalise_address(text)


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and set(text) <= _DIGITS and int(text) <= 65535
