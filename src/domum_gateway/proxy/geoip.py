"""Country of a client address, from a MaxMind DB file (``geoip.database``).

Country origin rules are optional: with no database configured no lookup is made, and a
grant that lists countries is refused everywhere (``decide`` denies an unknown country,
failing closed). The reader memory-maps the file, so a lookup is a few hundred
nanoseconds of tree walking and never blocks on I/O; callers still look up once per
session (the address is fixed for a session's life) rather than once per request.

Both MaxMind layouts are understood: GeoIP2/GeoLite2 Country and City records
(``{"country": {"iso_code": "DE"}}``, falling back to ``registered_country``) and flat
records (``{"country_code": "DE"}`` or ``{"iso_code": "DE"}``) that many free
databases use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import maxminddb
from maxminddb.errors import InvalidDatabaseError

from ..auth.origin import IPAddress
from ..errors import ConfigError

__all__ = ["CountryLookup", "open_country_lookup"]

log = logging.getLogger("domum.geoip")


class CountryLookup:
    """Reads ISO 3166-1 alpha-2 country codes from an open MaxMind DB."""

    def __init__(self, reader: maxminddb.Reader, path: Path) -> None:
        self._reader = reader
        self.path = path

    @classmethod
    def open(cls, path: Path) -> CountryLookup:
        """Open ``path``.

        Raises:
            ConfigError: the file is missing or is not a MaxMind DB.
        """
        try:
            reader = maxminddb.open_database(str(path))
        except FileNotFoundError as exc:
            raise ConfigError(f"geoip.database: {path} does not exist") from exc
        except (InvalidDatabaseError, OSError, ValueError) as exc:
            raise ConfigError(f"geoip.database: {path} is not a readable MaxMind DB file") from exc
        return cls(reader, path)

    def country(self, address: IPAddress) -> str | None:
        """The upper-case country code for ``address``, or None when the file has none."""
        try:
            record: Any = self._reader.get(address)
        except (InvalidDatabaseError, ValueError, OSError):
            # A corrupt file or an IPv6 address in an IPv4-only file: unknown, so any
            # country rule denies (fail closed).
            return None
        return _iso_code(record)

    def close(self) -> None:
        self._reader.close()


def open_country_lookup(path: Path | None) -> CountryLookup | None:
    """The lookup for ``geoip.database``, or None when country rules are off."""
    if path is None:
        return None
    lookup = CountryLookup.open(path)
    log.info("geoip.opened database=%s", path.name)
    return lookup


def _iso_code(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    for key in ("country", "registered_country"):
        nested = record.get(key)
        if isinstance(nested, dict):
            code = _valid(nested.get("iso_code"))
            if code is not None:
                return code
    for key in ("country_code", "iso_code"):
        code = _valid(record.get(key))
        if code is not None:
            return code
    return None


def _valid(value: object) -> str | None:
    if isinstance(value, str) and len(value) == 2 and value.isascii() and value.isalpha():
        return value.upper()
    return None
