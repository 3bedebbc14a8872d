"""Strict reading of JSON bodies: unknown fields rejected, every problem named by field.

A :class:`Reader` collects every field error of a body before raising one 422, so a
client (or the admin console) can show all of them next to their fields at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from ..errors import BadRequest, FieldError, PayloadTooLarge, ValidationError

__all__ = ["MAX_BODY", "Reader", "read_json"]

MAX_BODY = 1024 * 1024

_EMAIL = re.compile(
    r"^[^@\s<>\"',;]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+$"
)
_PHONE = re.compile(r"^\+[1-9][0-9]{6,14}$")
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


async def read_json(request: web.Request) -> dict[str, Any]:
    """Read a JSON object body: 413 over 1 MiB, 400 for bad UTF-8, bad JSON or non-objects."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"The body is larger than {MAX_BODY} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_BODY:
            raise PayloadTooLarge(f"The body is larger than {MAX_BODY} bytes.")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise BadRequest("A JSON object body is required.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest("The body is not valid UTF-8.") from exc
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise BadRequest("The JSON body is nested too deeply.") from exc
    except ValueError as exc:
        raise BadRequest(f"The body is not valid JSON: {exc.args[0] if exc.args else exc}") from exc
    if not isinstance(value, dict):
        raise BadRequest("The body must be a JSON object.")
    try:
        # "\ud800" is valid JSON but no UTF-8 string: the store or the mailer would fail on it.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest("The body contains a lone UTF-16 surrogate escape.") from exc
    except RecursionError as exc:
        raise BadRequest("The JSON body is nested too deeply.") from exc
    return value


class Reader:
    """Typed access to one JSON object with error collection under a field prefix."""

    def __init__(self, data: Any, prefix: str = "", errors: list[FieldError] | None = None) -> None:
        self.errors: list[FieldError] = errors if errors is not None else []
        self.prefix = prefix
        if not isinstance(data, dict):
            self.errors.append(FieldError(prefix or "body", "must be an object"))
            data = {}
        self.data: dict[str, Any] = data

    def field(self, name: str) -> str:
        """The dotted path of ``name`` under this reader's prefix."""
        return self._f(name)

    def _f(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def fail(self, name: str, message: str) -> None:
        self.errors.append(FieldError(self._f(name), message))

    def only(self, allowed: Iterable[str]) -> None:
        allowed_set = set(allowed)
        for key in self.data:
            if key not in allowed_set:
                self.errors.append(FieldError(self._f(str(key)), "unknown field"))

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str) -> Any:
        return self.data.get(name)

    def string(
        self,
        name: str,
        *,
        required: bool = True,
        max_len: int = 1000,
        min_len: int = 1,
        default: str | None = None,
    ) -> str | None:
        if name not in self.data or self.data[name] is None:
            if required:
                self.fail(name, "is required")
            return default
        value = self.data[name]
        if not isinstance(value, str):
            self.fail(name, "must be a string")
            return default
        # Length and control characters as sent (the schema's maxLength is about what is
        # sent, and strip() would quietly drop control characters such as \x1f at the ends).
        if len(value) > max_len:
            self.fail(name, f"must be at most {max_len} characters")
            return default
        if any(ord(c) < 32 and c not in "\t\n" for c in value) or "\x7f" in value:
            self.fail(name, "must not contain control characters")
            return default
        value = value.strip()
        if len(value) < min_len:
            self.fail(name, "must not be empty" if min_len == 1 else f"must be at least {min_len} characters")
            return default
        return value

    def slug(self, name: str, *, required: bool = True) -> str | None:
        value = self.string(name, required=required, max_len=63)
        if value is not None and not _NAME.match(value):
            self.fail(name, "must be lowercase letters, digits and dashes (for example db-prod-01)")
            return None
        return value

    def email(self, name: str, *, required: bool = False) -> str | None:
        value = self.string(name, required=required, max_len=254)
        if value is not None and not _EMAIL.match(value):
            self.fail(name, "must be an e-mail address like alice@example.com")
            return None
        return value

    def phone(self, name: str, *, required: bool = False) -> str | None:
        value = self.string(name, required=required, max_len=20)
        if value is not None:
            value = value.replace(" ", "").replace("-", "")
            if not _PHONE.match(value):
                self.fail(name, "must be an international number like +41791234567")
                return None
        return value

    def integer(
        self, name: str, *, required: bool = True, lo: int = 0, hi: int = 2**31, default: int | None = None
    ) -> int | None:
        if name not in self.data or self.data[name] is None:
            if required:
                self.fail(name, "is required")
            return default
        value = self.data[name]
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, "must be an integer")
            return default
        if not lo <= value <= hi:
            self.fail(name, f"must be between {lo} and {hi}")
            return default
        return value

    def boolean(self, name: str, *, default: bool) -> bool:
        if name not in self.data or self.data[name] is None:
            return default
        value = self.data[name]
        if not isinstance(value, bool):
            self.fail(name, "must be true or false")
            return default
        return value

    def choice(
        self, name: str, choices: Iterable[str], *, required: bool = True, default: str | None = None
    ) -> str | None:
        options = list(choices)
        value = self.string(name, required=required, max_len=64, default=default)
        if value is not None and value not in options:
            self.fail(name, "must be one of " + ", ".join(options))
            return None
        return value

    def string_list(self, name: str, *, max_items: int = 256, max_len: int = 200) -> list[str] | None:
        if name not in self.data or self.data[name] is None:
            return None
        value = self.data[name]
        if not isinstance(value, list):
            self.fail(name, "must be a list")
            return None
        if len(value) > max_items:
            self.fail(name, f"must have at most {max_items} items")
            return None
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip() or len(item) > max_len:
                self.fail(f"{name}[{i}]", "must be a non-empty string")
                continue
            out.append(item.strip())
        return out

    def child(self, name: str) -> Reader | None:
        if name not in self.data or self.data[name] is None:
            return None
        return Reader(self.data[name], self._f(name), self.errors)

    def check(self) -> None:
        if self.errors:
            raise ValidationError(self.errors)
