"""Secret values: how they are made, stored, compared, read back from people and masked.

One place for this so that every secret (personal link, session id, API token, one-time
token) gets the same treatment: drawn from the OS CSPRNG (stdlib ``secrets``), stored
only as a SHA-256 hash, compared in constant time with ``hmac.compare_digest``, and
parsed from user input strictly (ASCII only: a full-width or Arabic-Indic digit is not a
digit here, whatever ``str.isdigit`` says). Pure apart from drawing randomness.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from urllib.parse import urlsplit

__all__ = [
    "API_TOKEN_PREFIX",
    "OTP_DIGITS",
    "hash_secret",
    "link_code_from",
    "mask_email",
    "mask_phone",
    "matches",
    "new_api_token",
    "new_id",
    "new_link",
    "new_otp",
    "new_session_id",
    "normalise_otp",
]

API_TOKEN_PREFIX = "dgw_"
"""Marks control API tokens so secret scanners and people recognise them."""

OTP_DIGITS = 8

_ASCII_DIGITS = frozenset("0123456789")
_OTP_SEPARATORS = str.maketrans("", "", " -")
_MAX_OTP_INPUT = 64
_MAX_LINK_INPUT = 2048
_LINK_CODE = re.compile(r"[A-Za-z0-9_-]{16,64}")


def new_link() -> str:
    """A personal-link code: 128 random bits, URL-safe (22 characters)."""
    return secrets.token_urlsafe(16)


def new_session_id() -> str:
    """A session cookie value: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def new_api_token() -> str:
    """A control API bearer token: ``dgw_`` plus 256 random bits, URL-safe."""
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_otp() -> str:
    """A one-time token: 8 decimal digits, uniformly drawn, zero-padded."""
    return f"{secrets.randbelow(10**OTP_DIGITS):0{OTP_DIGITS}d}"


def new_id(prefix: str) -> str:
    """A public identifier such as ``req_3f9c0a1b2c3d4e5f`` (64 random bits, lowercase hex).

    Identifiers are not secrets, but random ones do not leak how many records exist.
    """
    return f"{prefix}_{secrets.token_hex(8)}"


def hash_secret(value: str) -> str:
    """The SHA-256 hex digest under which a secret is stored."""
    # surrogatepass: input from people may hold lone surrogates; hashing must not raise.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def matches(value: str, expected_hash: str) -> bool:
    """Whether ``value`` hashes to ``expected_hash``, compared in constant time."""
    return hmac.compare_digest(
        hash_secret(value).encode("ascii"),
        expected_hash.encode("utf-8", "surrogatepass"),
    )


def normalise_otp(raw: str) -> str | None:
    """Read a one-time token as typed: ``1234 5678`` and ``1234-5678`` are accepted.

    Returns:
        The 8 ASCII digits, or None if the input is anything else.
    """
    if len(raw) > _MAX_OTP_INPUT:
        return None
    digits = raw.strip().translate(_OTP_SEPARATORS)
    if len(digits) != OTP_DIGITS or not set(digits) <= _ASCII_DIGITS:
        return None
    return digits


def link_code_from(raw: str) -> str | None:
    """The personal-link code from what a user pasted: the bare code or the full URL.

    A URL is searched for ``/a/{code}`` (trailing path, query and fragment ignored), so
    ``https://gw.example.com:8443/a/CODE/token`` works, with or without a scheme.

    Returns:
        The code if it is 16 to 64 of ``A-Z a-z 0-9 _ -``, else None.
    """
    text = raw.strip()
    if not text or len(text) > _MAX_LINK_INPUT:
        return None
    if _LINK_CODE.fullmatch(text):
        return text
    try:
        path = urlsplit(text).path
    except ValueError:
        return None
    segments = path.split("/")
    for index, segment in enumerate(segments[:-1]):
        if segment == "a" and _LINK_CODE.fullmatch(segments[index + 1]):
            return segments[index + 1]
    return None


def mask_email(address: str) -> str:
    """``alice@example.com`` -> ``a***@example.com``: enough to recognise, not to harvest."""
    local, at, domain = address.strip().rpartition("@")
    if not at or not local or not domain:
        return "***"
    return f"{local[0]}***@{domain}"


def mask_phone(number: str) -> str:
    """``+1 415 555 4567`` -> ``+*******4567``: only the last four digits are shown."""
    digits = [c for c in number if c in _ASCII_DIGITS]
    prefix = "+" if number.strip().startswith("+") else ""
    if len(digits) <= 4:
        return prefix + "****"
    return prefix + "*" * (len(digits) - 4) + "".join(digits[-4:])
