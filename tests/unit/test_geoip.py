"""CountryLookup against MaxMind DB files written by the test writer (tests/peers/mmdb.py)."""

from __future__ import annotations

from pathlib import Path

import maxminddb
import pytest

from domum_gateway.auth.origin import normalise_address
from domum_gateway.errors import ConfigError
from domum_gateway.proxy.geoip import CountryLookup, open_country_lookup

from ..peers.mmdb import country_record, write_mmdb


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return write_mmdb(
        tmp_path / "c.mmdb",
        {
            "203.0.113.0/24": country_record("DE"),
            "203.0.113.128/25": country_record("FR"),  # more specific inside the /24
            "198.51.100.7/32": {"country_code": "gb"},  # flat layout of free databases
            "192.0.2.0/24": {"registered_country": {"iso_code": "NL"}},
            "10.0.0.0/8": {"country": {"iso_code": "not a code"}},
            "2001:db8::/32": country_record("JP"),
        },
    )


@pytest.mark.parametrize(
    ("address", "country"),
    [
        ("203.0.113.1", "DE"),
        ("203.0.113.127", "DE"),
        ("203.0.113.128", "FR"),
        ("203.0.113.255", "FR"),
        ("198.51.100.7", "GB"),
        ("198.51.100.8", None),
        ("192.0.2.44", "NL"),
        ("10.1.2.3", None),
        ("8.8.8.8", None),
        ("2001:db8::1", "JP"),
        ("2001:db9::1", None),
        ("::ffff:203.0.113.1", "DE"),  # normalised to IPv4 before the lookup
    ],
)
def test_country_of_an_address(db: Path, address: str, country: str | None) -> None:
    lookup = CountryLookup.open(db)
    try:
        assert lookup.country(normalise_address(address)) == country
    finally:
        lookup.close()


def test_the_written_file_is_valid_for_both_readers(db: Path) -> None:
    for mode in (maxminddb.MODE_FILE, maxminddb.MODE_MEMORY, maxminddb.MODE_AUTO):
        reader = maxminddb.open_database(str(db), mode)
        try:
            assert reader.metadata().ip_version == 6
            assert reader.get("203.0.113.200")["country"]["iso_code"] == "FR"  # type: ignore[index]
        finally:
            reader.close()


def test_no_database_means_no_lookup() -> None:
    assert open_country_lookup(None) is None


def test_missing_or_broken_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        CountryLookup.open(tmp_path / "absent.mmdb")
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(b"not a database at all" * 10)
    with pytest.raises(ConfigError, match="not a readable MaxMind DB"):
        CountryLookup.open(bad)
