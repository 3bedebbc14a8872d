"""Secret helpers: generation, hashing, constant-time matching, strict parsing, masking."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domum_gateway.auth.secrets import (
    hash_secret,
    link_code_from,
    mask_email,
    mask_phone,
    matches,
    new_api_token,
    new_id,
    new_link,
    new_otp,
    new_session_id,
    normalise_otp,
)

URLSAFE = re.compile(r"[A-Za-z0-9_-]+")


def test_new_link_is_128_bits_urlsafe() -> None:
    link = new_link()
    assert URLSAFE.fullmatch(link)
    assert len(link) == 22  # 16 bytes in unpadded base64
    assert link_code_from(link) == link


def test_new_session_id_is_256_bits() -> None:
    sid = new_session_id()
    assert URLSAFE.fullmatch(sid)
    assert len(sid) == 43


def test_new_api_token_has_prefix() -> None:
    token = new_api_token()
    assert token.startswith("dgw_")
    assert URLSAFE.fullmatch(token[4:])
    assert len(token) == 4 + 43


def test_new_otp_is_eight_ascii_digits() -> None:
    for _ in range(200):
        otp = new_otp()
        assert len(otp) == 8
        assert set(otp) <= set("0123456789")
        assert normalise_otp(otp) == otp


def test_new_id_shape() -> None:
    ident = new_id("req")
    assert re.fullmatch(r"req_[0-9a-f]{16}", ident)


def test_generated_values_differ() -> None:
    for make in (new_link, new_session_id, new_api_token, lambda: new_id("x")):
        assert len({make() for _ in range(100)}) == 100


def test_hash_secret_is_sha256_hex() -> None:
    assert hash_secret("abc") == hashlib.sha256(b"abc").hexdigest()
    assert hash_secret("ä") == hashlib.sha256("ä".encode()).hexdigest()
    assert len(hash_secret("\udcff")) == 64  # a lone surrogate does not raise


def test_matches() -> None:
    stored = hash_secret("s3cret")
    assert matches("s3cret", stored)
    assert not matches("s3cret ", stored)
    assert not matches("S3cret", stored)
    assert not matches("s3cret", stored.upper())
    assert not matches("s3cret", "")
    assert not matches("s3cret", "ä" * 64)
    assert not matches("s3cret", "s3cret")  # the plain value is not its hash


@given(st.text(), st.text())
def test_matches_only_the_same_value(a: str, b: str) -> None:
    assert matches(a, hash_secret(b)) == (a == b)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("12345678", "12345678"),
        ("00000000", "00000000"),
        (" 12345678\n", "12345678"),
        ("1234 5678", "12345678"),
        ("1234-5678", "12345678"),
        ("12 34-56 78", "12345678"),
        ("\t1234 - 5678 ", "12345678"),
    ],
)
def test_normalise_otp_accepts(raw: str, expected: str) -> None:
    assert normalise_otp(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "1234567",
        "123456789",
        "1234567a",
        "1234_5678",
        "1234.5678",
        "1234\t5678",
        "\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18",  # full-width digits
        "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668",  # Arabic-Indic digits
        "\u0967\u0968\u0969\u096a\u096b\u096c\u096d\u096e",  # Devanagari digits
        "1234567\u00b2",  # superscript: isdigit() is True
        "1234\u20135678",  # en dash
        "+12345678",
        "-" * 100 + "12345678",
    ],
)
def test_normalise_otp_rejects(raw: str) -> None:
    assert normalise_otp(raw) is None


@given(st.text(max_size=30))
def test_normalise_otp_output_is_ascii_digits(raw: str) -> None:
    got = normalise_otp(raw)
    assert got is None or (len(got) == 8 and set(got) <= set("0123456789"))


CODE = "AbCdEfGhIjKlMnOp_-12"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (CODE, CODE),
        (f"  {CODE}\n", CODE),
        (f"https://gw.example.com:8443/a/{CODE}", CODE),
        (f"https://gw.example.com:8443/a/{CODE}/", CODE),
        (f"https://gw.example.com:8443/a/{CODE}/token", CODE),
        (f"https://gw.example.com/a/{CODE}?utm=x#frag", CODE),
        (f"https://gw.example.com/prefix/a/{CODE}", CODE),
        (f"gw.example.com:8443/a/{CODE}", CODE),
        (f"/a/{CODE}", CODE),
        ("x" * 16, "x" * 16),
        ("x" * 64, "x" * 64),
        # Not a code.
        ("", None),
        ("x" * 15, None),
        ("x" * 65, None),
        (f"{CODE}!", None),
        (f"{CODE}\n{CODE}", None),
        (f"https://gw.example.com/b/{CODE}", None),
        (f"https://gw.example.com/a/{CODE}%00", None),
        ("https://gw.example.com/a/short", None),
        ("https://gw.example.com/a/", None),
        ("https://[bad/a/" + CODE, None),
        ("ÄbCdEfGhIjKlMnOp_-12", None),
        (f"https://gw.example.com/a/{CODE}" + "x" * 3000, None),
    ],
)
def test_link_code_from(raw: str, expected: str | None) -> None:
    assert link_code_from(raw) == expected


@given(st.text(max_size=200))
def test_link_code_from_never_raises(raw: str) -> None:
    got = link_code_from(raw)
    assert got is None or re.fullmatch(r"[A-Za-z0-9_-]{16,64}", got)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("alice@example.com", "a***@example.com"),
        ("a@example.com", "a***@example.com"),
        ("first.last+tag@sub.example.org", "f***@sub.example.org"),
        ('odd"@"name@example.com', "o***@example.com"),
        ("no-at-sign", "***"),
        ("@example.com", "***"),
        ("alice@", "***"),
        ("", "***"),
    ],
)
def test_mask_email(raw: str, expected: str) -> None:
    assert mask_email(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+14155554567", "+*******4567"),
        ("+1 415 555 4567", "+*******4567"),
        ("+1 (415) 555-4567", "+*******4567"),
        ("015112344567", "********4567"),
        ("+4567", "+****"),
        ("", "****"),
    ],
)
def test_mask_phone(raw: str, expected: str) -> None:
    assert mask_phone(raw) == expected


@given(st.from_regex(r"\+[0-9]{8,15}", fullmatch=True))
def test_mask_phone_shows_only_last_four(number: str) -> None:
    masked = mask_phone(number)
    assert masked.endswith(number[-4:])
    assert len(masked) == len(number)
    assert set(masked[1:-4]) == {"*"}
